"""The masked-diffusion sampler: a canvas of mask tokens after a prefix, unmasked step by step.

Text-only by design: the prefix arrives as token ids or as embeddings (an image's projected
features spliced into the prompt), the canvas is token ids, and the model is any callable with
DiffusionLM's signature. With the defaults it reproduces LLaDA's reference `generate` bit for bit
(same draws from the global RNG, in the same order and shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SamplerConfig:
    gen_length: int = 128
    block_length: int = 128
    steps: int = 128  # over the whole canvas, split evenly over the blocks
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"  # or "random"

    def validate(self) -> None:
        """Raise ValueError naming the inconsistent options."""
        if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
            raise ValueError(f"gen_length, block_length and steps must be positive, got {self}")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length={self.gen_length} is not divisible by block_length={self.block_length}")
        num_blocks = self.gen_length // self.block_length
        if self.steps % num_blocks:
            raise ValueError(f"steps={self.steps} is not divisible by the number of blocks ({num_blocks})")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={self.remasking!r} must be 'low_confidence' or 'random'")


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B, gen_length] the filled canvas
    forward_passes: int  # model calls (a CFG step counts once: one batched call)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens.numel() / self.tokens.shape[0] / max(self.forward_passes, 1)


def tokens_per_step(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Return [B, steps]: how many tokens each step commits, the remainder going to the first steps."""
    base = num_masked[:, None] // steps
    extra = torch.arange(steps, device=num_masked.device)[None, :] < (num_masked[:, None] % steps)
    return base + extra.long()


def add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return scores whose argmax is a sample at `temperature` (the logits themselves at 0).

    float64 matters: in low precision the exponentials underflow and sampling turns greedy
    (LLaDA's observation). exp(l) / (-log u)^T is the Gumbel-max trick, written as LLaDA writes it.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits)
    return logits.exp() / (-torch.log(noise)) ** temperature


@torch.no_grad()
def generate(
    model,
    prefix_ids: torch.Tensor | None = None,
    *,
    mask_id: int,
    config: SamplerConfig,
    prefix_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> SampleOutput:
    """Return the generated canvas [B, gen_length] after `prefix_ids [B, P]` or `prefix_embeds [B, P, D]`.

    attention_mask [B, P] marks real prefix tokens (False = left padding).
    """
    config.validate()
    if (prefix_ids is None) == (prefix_embeds is None):
        raise ValueError("pass exactly one of prefix_ids or prefix_embeds")
    prefix = prefix_ids if prefix_ids is not None else prefix_embeds
    B, P = prefix.shape[:2]
    device = prefix.device
    G = config.gen_length
    x = torch.full((B, P + G), mask_id, dtype=torch.long, device=device)  # [B, P+G] token view
    if prefix_ids is not None:
        x[:, :P] = prefix_ids
        is_prefix = x != mask_id  # masks written into the prompt stay fillable, as in LLaDA
    else:
        is_prefix = torch.zeros_like(x, dtype=torch.bool)
        is_prefix[:, :P] = True
    if attention_mask is not None:
        attention_mask = attention_mask.bool()
        attention_mask = None if attention_mask.all() else torch.cat(
            [attention_mask, attention_mask.new_ones(B, G)], dim=1
        )

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:  # [B, P+G, V]
        rows = [tokens]
        if config.cfg_scale > 0:  # unconditional row: the prompt replaced by masks
            rows.append(torch.where(is_prefix, mask_id, tokens))
        batch = torch.cat(rows)
        mask = None if attention_mask is None else attention_mask.repeat(len(rows), 1)
        if prefix_embeds is None:
            logits = model(input_ids=batch, attention_mask=mask)
        else:
            embed = model.get_input_embeddings()
            canvas = embed(batch[:, P:])
            pre = prefix_embeds.repeat(len(rows), 1, 1)
            if config.cfg_scale > 0:
                pre[B:] = embed(torch.full_like(batch[B:, :P], mask_id))
            logits = model(inputs_embeds=torch.cat([pre, canvas], dim=1), attention_mask=mask)
        if config.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
        return logits

    num_blocks = G // config.block_length
    steps_per_block = config.steps // num_blocks
    forward_passes = 0
    for block in range(num_blocks):
        lo, hi = P + block * config.block_length, P + (block + 1) * config.block_length
        schedule = tokens_per_step((x[:, lo:hi] == mask_id).sum(1), steps_per_block)  # [B, steps]
        for step in range(steps_per_block):
            is_masked = (x == mask_id) & ~is_prefix
            logits = logits_of(x)
            forward_passes += 1
            x0 = add_gumbel_noise(logits, config.temperature).argmax(-1)  # [B, P+G]
            if config.remasking == "low_confidence":
                confidence = F.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                confidence = torch.rand(x0.shape, device=device)
            confidence[:, hi:] = -torch.inf  # later blocks wait their turn
            x0 = torch.where(is_masked, x0, x)
            confidence = torch.where(is_masked, confidence, -torch.inf)
            commit = torch.zeros_like(is_masked)
            for row in range(B):
                commit[row, confidence[row].topk(int(schedule[row, step])).indices] = True
            x[commit] = x0[commit]
    return SampleOutput(tokens=x[:, P:], forward_passes=forward_passes)
