"""What the diffusion sampler (sampling.py) and the autoregressive decoder (autoregressive.py) share.

Both take a batch of prompts as token ids or as embeddings (an image's projected features spliced
into the prompt), left-padded to one length, and both return a SampleOutput, so infer.py and the
benchmarks treat the two models alike. The preamble that reads such a batch, Gumbel sampling and
the stop-token rules live here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B, gen_length] the filled canvas; after an early stop the tail holds eos_id
    forward_passes: int  # model calls for the batch (a CFG step counts once: one batched call)
    commit_step: torch.Tensor  # [B, gen_length] forward (1-based) that committed each position; 0 given, -1 dropped
    row_forwards: torch.Tensor  # [B] forwards each row took part in (rows leave the batch when they stop)
    lengths: torch.Tensor  # [B] position of the first stop token (the answer's length), gen_length if none

    @property
    def tokens_per_forward(self) -> float:
        """Tokens the model committed per forward it ran, over the batch (dropped tails excluded)."""
        return (self.commit_step > 0).sum().item() / max(self.row_forwards.sum().item(), 1)


@dataclass
class Prompt:
    """A batch of prompts before a canvas of `gen_length` positions, as both decoders read it."""

    ids: torch.Tensor | None  # [B, P] token ids, or None when the prompt comes as embeddings
    embeds: torch.Tensor | None  # [B, P, D]
    key_mask: torch.Tensor | None  # [B, P+G] False = left padding; None when no row is padded
    position_ids: torch.Tensor | None  # [B, P+G] RoPE positions of the unpadded rows; None when no row is padded
    stop_ids: torch.Tensor  # [k] the ids that end an answer: eos_id, then stop_ids

    @property
    def batch_size(self) -> int:
        return (self.ids if self.ids is not None else self.embeds).shape[0]

    @property
    def length(self) -> int:
        return (self.ids if self.ids is not None else self.embeds).shape[1]

    @property
    def device(self) -> torch.device:
        return (self.ids if self.ids is not None else self.embeds).device


def read_prompt(
    prefix_ids: torch.Tensor | None,
    prefix_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    gen_length: int,
    stop_ids: tuple[int | None, ...],
) -> Prompt:
    """Return the Prompt of `prefix_ids` [B, P] or `prefix_embeds` [B, P, D] (exactly one) and its padding.

    attention_mask [B, P] marks real prompt tokens (False = left padding); a padded row keeps the
    RoPE positions it has alone, so its tokens do not depend on its batch. `stop_ids` may hold None
    (an unset eos_id), which is dropped.
    """
    if (prefix_ids is None) == (prefix_embeds is None):
        raise ValueError("pass exactly one of prefix_ids or prefix_embeds")
    prefix = prefix_ids if prefix_ids is not None else prefix_embeds
    batch, device = prefix.shape[0], prefix.device
    key_mask = position_ids = None
    if attention_mask is not None and not attention_mask.bool().all():
        key_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(batch, gen_length).bool()], dim=1)
        position_ids = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    stops = torch.tensor([i for i in stop_ids if i is not None], device=device)
    return Prompt(prefix_ids, prefix_embeds, key_mask, position_ids, stops)


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


def first_stop(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Return [B]: the position of each row's first stop token in `tokens` [B, G], G when it has none."""
    hit = torch.isin(tokens, stop_ids)
    return torch.where(hit.any(1), hit.long().argmax(1), tokens.shape[1])


def finished(canvas: torch.Tensor, mask_id: int, stop_ids: torch.Tensor) -> torch.Tensor:
    """Return [B]: rows of `canvas` [B, G] with a stop token before their first hole (the answer is complete)."""
    filled = (canvas != mask_id).long().cumprod(1).bool()  # [B, G] positions before the first hole
    return (torch.isin(canvas, stop_ids) & filled).any(1)


def answer_lengths(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Return [B]: each answer's length, up to its first stop token (all of `tokens` [B, G] without stop ids)."""
    if len(stop_ids):
        return first_stop(tokens, stop_ids)
    return torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
