"""The masked-diffusion sampler: a canvas of mask tokens after a prefix, unmasked step by step.

Text-only by design: the prefix arrives as token ids or as embeddings (an image's projected
features spliced into the prompt), the canvas is token ids, and the model is any callable with
DiffusionLM's signature. With the defaults it reproduces LLaDA's reference `generate` bit for bit
(same draws from the global RNG, in the same order and shapes).

One loop serves every option, each a switch:
- which tokens a step commits: LLaDA's fixed schedule (`steps`), or Fast-dLLM's parallel rules:
  every masked token of the block whose confidence >= `threshold`, or the `factor` rule; both
  commit at least the most confident token per forward;
- what "confidence" is: probability of the chosen token, top-2 margin, or exp(-entropy) (Dimple);
- early stop: a row is finished once a stop token is committed with every position before it
  filled; its tail is dropped and it leaves the batch, so later blocks are never computed for it;
- which positions a forward recomputes (`cache`): all of them, only the canvas (exact prefix
  cache, prefix-DLM attention), or only the current block (Fast-dLLM DualCache, approximate).
Rows of a batch move through the blocks together (a row that has filled its block waits, and
commits nothing); left-padded rows get their unpadded RoPE positions, so a row's tokens do not
depend on its batch. `commit_step` records when each token was committed (for --show-steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmdlm.cache import KVCache

CONFIDENCES = ("probability", "margin", "entropy")
CACHES = ("none", "prefix", "block")


@dataclass
class SamplerConfig:
    gen_length: int = 128
    block_length: int = 128
    steps: int = 128  # over the whole canvas, split evenly over the blocks; unused by the parallel rules
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"  # or "random"
    threshold: float | None = None  # Fast-dLLM: commit every block token with confidence >= threshold
    factor: float | None = None  # Fast-dLLM factor rule: top n while (n + 1)(1 - c_n) <= factor
    confidence: str = "probability"  # or "margin" (top-2) or "entropy" (exp(-H), ranks as -H)
    early_stop: bool = False  # stop a row once a stop token is committed and all before it is filled
    eos_id: int | None = None  # a stop token, and what fills a dropped tail
    stop_ids: tuple[int, ...] = ()  # further stop tokens (end of turn)
    cache: str = "none"  # "prefix" (exact, needs prefix_dlm) or "block" (DualCache, approximate)
    prefix_dlm: bool = False  # prefix queries attend only the prefix (the model's prefix_len=)
    # LLaDA-V's rule: these ids may never be chosen at a masked position (its BOS, EOS and header ids)
    suppress_ids: tuple[int, ...] = ()
    float64_confidence: bool = False  # LLaDA-V ranks by a float64 softmax (LLaDA by float32)

    @property
    def parallel(self) -> bool:
        return self.threshold is not None or self.factor is not None

    def validate(self) -> None:
        """Raise ValueError naming the inconsistent options."""
        if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
            raise ValueError(f"gen_length, block_length and steps must be positive, got {self}")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length={self.gen_length} is not divisible by block_length={self.block_length}")
        num_blocks = self.gen_length // self.block_length
        if not self.parallel and self.steps % num_blocks:
            raise ValueError(f"steps={self.steps} is not divisible by the number of blocks ({num_blocks})")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={self.remasking!r} must be 'low_confidence' or 'random'")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("set threshold or factor, not both")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor={self.factor} must be positive")
        if self.parallel and self.remasking != "low_confidence":
            raise ValueError("threshold/factor decoding ranks by confidence: use remasking='low_confidence'")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence={self.confidence!r} must be one of {CONFIDENCES}")
        if self.early_stop and self.eos_id is None:
            raise ValueError("early_stop needs eos_id (the token that ends an answer and fills its tail)")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r} must be one of {CACHES}")
        if self.cache == "prefix" and not self.prefix_dlm:
            raise ValueError("the prefix cache is exact only with prefix-DLM attention: set prefix_dlm=True")


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


def confidence_of(logits: torch.Tensor, chosen: torch.Tensor, kind: str) -> torch.Tensor:
    """Return [B, L] confidence in [0, 1] of the predictions `chosen` [B, L] from logits [B, L, V].

    probability: p(chosen), LLaDA's low-confidence remasking; margin: p1 - p2 (top-2 gap);
    entropy: exp(-H) of the distribution, which orders positions as Dimple's negative entropy
    does while staying on the probability scale, so one threshold works for all three.
    """
    if kind == "probability":
        return F.softmax(logits, dim=-1).gather(-1, chosen[..., None]).squeeze(-1)
    if kind == "margin":
        top2 = F.softmax(logits, dim=-1).topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return torch.special.entr(F.softmax(logits.float(), dim=-1)).sum(-1).neg().exp()  # entr(0) = 0, no NaN


def parallel_count(confidence: torch.Tensor, threshold: float | None, factor: float | None) -> torch.Tensor:
    """Return [B]: how many of the most confident candidates a Fast-dLLM rule commits (>= 1 if any).

    confidence [B, L] is -inf off the candidates; the caller caps the count at their number.
    Threshold: all with c >= threshold. Factor: the top n while the n-th largest c_n satisfies
    (n + 1)(1 - c_n) <= factor.
    """
    ranked = confidence.sort(dim=1, descending=True).values  # [B, L]
    if threshold is not None:
        passes = ranked >= threshold
    else:
        n = torch.arange(1, ranked.shape[1] + 1, device=ranked.device)
        passes = ranked >= 1 - factor / (n + 1)
    passes[:, 0] = True  # at least one token per forward, else a block could stall
    return passes.long().cumprod(1).sum(1)


def stopped(canvas: torch.Tensor, mask_id: int, stop_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (done [B], first stop position [B] or G): rows with a stop token before their first hole."""
    filled = (canvas != mask_id).long().cumprod(1).bool()  # [B, G] positions before the first hole
    hit = torch.isin(canvas, stop_ids)
    first = torch.where(hit.any(1), hit.long().argmax(1), canvas.shape[1])
    return (hit & filled).any(1), first


@dataclass
class _Rows:
    """The rows still being generated; every per-row tensor, so a finished row leaves them all."""

    index: torch.Tensor  # [n] row in the caller's batch
    x: torch.Tensor  # [n, P+G] tokens (prefix ids or placeholders, canvas)
    step: torch.Tensor  # [n, P+G] commit step per position (0 given, -1 still masked)
    is_prefix: torch.Tensor  # [n, P+G] positions that belong to the prompt
    key_mask: torch.Tensor | None  # [n, P+G] False = left padding
    position_ids: torch.Tensor | None  # [n, P+G] RoPE positions of the unpadded rows
    prefix_embeds: torch.Tensor | None  # [n, P, D]
    schedule: torch.Tensor | None = None  # [n, steps per block] LLaDA's tokens per step

    def select(self, keep: torch.Tensor) -> _Rows:
        fields = {k: None if v is None else v[keep] for k, v in vars(self).items()}
        return _Rows(**fields)


def _forward(model, rows: _Rows, a: int, b: int, P: int, config: SamplerConfig, mask_id: int, cache, fill: bool,
             skip: int = 0):
    """Return logits [n, b-a-skip, V] for positions a+skip..b-1; keys outside [a, b) come from `cache`."""
    n_copies = 2 if config.cfg_scale > 0 else 1
    ids = rows.x[:, a:b]
    if n_copies == 2:  # unconditional row: the prompt replaced by masks
        ids = torch.cat([ids, torch.where(rows.is_prefix[:, a:b], mask_id, ids)])
    kwargs = {"logits_from": skip} if skip else {}
    if rows.key_mask is not None:
        kwargs["attention_mask"] = rows.key_mask.repeat(n_copies, 1)
        kwargs["position_ids"] = rows.position_ids[:, a:b].repeat(n_copies, 1)
    if config.prefix_dlm and a < P:  # queries after the prefix see every key anyway: no mask, a faster kernel
        kwargs["prefix_len"] = P
    if cache is not None:
        kwargs.update(cache=cache, start=a, fill_cache=fill)
    if rows.prefix_embeds is not None and a < P:  # windows start at 0 or at/after the prefix
        embed = model.get_input_embeddings()
        prefix = rows.prefix_embeds.repeat(n_copies, 1, 1)
        if n_copies == 2:
            prefix[len(rows.index) :] = embed(torch.full_like(ids[len(rows.index) :, :P], mask_id))
        logits = model(inputs_embeds=torch.cat([prefix, embed(ids[:, P:])], dim=1), **kwargs)
    else:
        logits = model(input_ids=ids, **kwargs)
    if n_copies == 2:
        cond, uncond = logits.chunk(2)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
    return logits


@torch.no_grad()
def generate(
    model,
    prefix_ids: torch.Tensor | None = None,
    *,
    mask_id: int,
    config: SamplerConfig,
    prefix_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    canvas: torch.Tensor | None = None,
    on_forward=None,
) -> SampleOutput:
    """Return the generated canvas [B, gen_length] after `prefix_ids [B, P]` or `prefix_embeds [B, P, D]`.

    attention_mask [B, P] marks real prefix tokens (False = left padding). `canvas` [B or 1,
    gen_length] is a template: its mask ids are holes to fill, every other token stays fixed.
    `on_forward(row index [n], canvas [n, G], commit_step [n, G])`, if given, sees after every forward the rows
    that took part in it (read-only views; committed tokens never change): a server streams answers from it.
    """
    config.validate()
    if (prefix_ids is None) == (prefix_embeds is None):
        raise ValueError("pass exactly one of prefix_ids or prefix_embeds")
    prefix = prefix_ids if prefix_ids is not None else prefix_embeds
    B, P = prefix.shape[:2]
    device = prefix.device
    G = config.gen_length
    x = torch.full((B, P + G), mask_id, dtype=torch.long, device=device)  # [B, P+G] token view
    if canvas is not None:
        if canvas.shape[-1] != G:
            raise ValueError(f"canvas has {canvas.shape[-1]} positions, gen_length is {G}")
        x[:, P:] = canvas
    is_prefix = torch.zeros_like(x, dtype=torch.bool)
    if prefix_ids is not None:
        x[:, :P] = prefix_ids
        is_prefix[:, :P] = prefix_ids != mask_id  # masks written into the prompt stay fillable, as in LLaDA
    else:
        is_prefix[:, :P] = True
    prompt_holes = bool((x[:, :P] == mask_id).any()) and prefix_ids is not None
    if prompt_holes and config.cache != "none":
        raise ValueError("the prompt holds mask tokens, which a cached prefix cannot refill: pass them as `canvas`")
    key_mask = position_ids = None
    if attention_mask is not None and not attention_mask.bool().all():
        key_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(B, G).bool()], dim=1)  # [B, P+G]
        position_ids = (key_mask.long().cumsum(1) - 1).clamp(min=0)  # a padded row keeps its unpadded RoPE
    step = torch.where(x == mask_id, -1, 0)
    rows = _Rows(torch.arange(B, device=device), x, step, is_prefix, key_mask, position_ids, prefix_embeds)
    stop_ids = torch.tensor([i for i in (config.eos_id, *config.stop_ids) if i is not None], device=device)
    suppress = torch.tensor(config.suppress_ids, device=device) if config.suppress_ids else None

    out_tokens, out_step = x[:, P:].clone(), step[:, P:].clone()
    row_forwards = torch.zeros(B, dtype=torch.long, device=device)
    cache = None if config.cache == "none" else KVCache()
    forward_passes = 0

    def retire(done: torch.Tensor) -> None:  # write finished rows out, dropping their tails
        tokens, steps = rows.x[done, P:], rows.step[done, P:]
        if config.early_stop:
            tail = torch.arange(G, device=device) > stopped(tokens, mask_id, stop_ids)[1][:, None]
            tokens, steps = tokens.masked_fill(tail, config.eos_id), steps.masked_fill(tail, -1)
        out_tokens[rows.index[done]], out_step[rows.index[done]] = tokens, steps

    num_blocks = G // config.block_length
    steps_per_block = config.steps // num_blocks
    for block in range(num_blocks):
        lo, hi = P + block * config.block_length, P + (block + 1) * config.block_length
        first = 0 if prompt_holes else lo  # the positions this block may commit: [first, hi)
        if not config.parallel:
            rows.schedule = tokens_per_step((rows.x[:, lo:hi] == mask_id).sum(1), steps_per_block)
        i = 0
        while len(rows.index) and (
            (rows.x[:, lo:hi] == mask_id).any() if config.parallel else i < steps_per_block
        ):
            # The window of positions recomputed: all, or (cached) the canvas / the current block.
            refresh = cache is not None and (cache.length == 0 or (config.cache == "block" and i == 0))
            if cache is None or refresh:
                a, b = (P if config.prefix_dlm and cache is not None and cache.length else 0), P + G
            else:
                a, b = (P, P + G) if config.cache == "prefix" else (lo, hi)
            # Greedy low-confidence decoding draws nothing over the window: the logits before `first` are never read.
            skip = first - a if config.temperature == 0 and config.remasking == "low_confidence" else 0
            logits = _forward(model, rows, a, b, P, config, mask_id, cache, refresh, skip)  # [n, b-a-skip, V]
            a += skip
            forward_passes += 1
            row_forwards[rows.index] += 1
            # Noise over the whole window (LLaDA draws it so), then only [first, hi) matters.
            scores = add_gumbel_noise(logits, config.temperature)[:, first - a : hi - a]
            window = logits[:, first - a : hi - a]  # [n, hi-first, V]
            if suppress is not None:  # only masked positions are ever committed: the rule may cover them all
                scores = scores.index_fill(-1, suppress, -torch.inf)
                window = window.index_fill(-1, suppress, -torch.inf)
            if config.parallel:  # a committed mask id would stay a hole, and the block never fill
                scores = scores.index_fill(-1, torch.tensor([mask_id], device=device), -torch.inf)
            x0 = scores.argmax(-1)  # [n, hi-first]
            if config.remasking == "low_confidence":
                conf = confidence_of(window.double() if config.float64_confidence else window, x0, config.confidence)
            else:
                conf = torch.rand(logits.shape[:2], device=device)[:, first - a : hi - a]
            region = rows.x[:, first:hi]  # a view: writes land in rows.x
            masked = (region == mask_id) & ~rows.is_prefix[:, first:hi]
            conf = torch.where(masked, conf, -torch.inf)
            if config.parallel:
                count = torch.minimum(parallel_count(conf, config.threshold, config.factor), masked.sum(1))
            else:
                count = rows.schedule[:, i]
            commit = torch.zeros_like(masked)
            top = conf.topk(int(count.max()), dim=1).indices  # [n, k] the most confident first
            commit.scatter_(1, top, torch.arange(top.shape[1], device=device) < count[:, None])
            commit &= masked
            region[commit] = x0[commit]
            rows.step[:, first:hi][commit] = forward_passes
            i += 1
            if on_forward is not None:
                on_forward(rows.index, rows.x[:, P:], rows.step[:, P:])
            if config.early_stop:
                done = stopped(rows.x[:, P:], mask_id, stop_ids)[0]
                if done.any():
                    retire(done)
                    keep = (~done).nonzero().squeeze(1)
                    if cache is not None:  # CFG rows sit after the conditional ones
                        n = len(rows.index)
                        cache = cache.select(keep if config.cfg_scale == 0 else torch.cat([keep, keep + n]))
                    rows = rows.select(keep)
    if len(rows.index):
        retire(torch.ones(len(rows.index), dtype=torch.bool, device=device))
    lengths = stopped(out_tokens, mask_id, stop_ids)[1] if len(stop_ids) else torch.full((B,), G, device=device)
    return SampleOutput(out_tokens, forward_passes, out_step, row_forwards, lengths)
