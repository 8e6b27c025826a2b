"""The masked-diffusion sampler: a canvas of mask tokens after a prefix, unmasked step by step.

`generate` is LLaDA's semi-autoregressive loop: the canvas is split into blocks, and each block
is unmasked over a number of steps, each step one forward of the model that predicts every masked
position and commits the most confident predictions. With the defaults it reproduces LLaDA's
reference `generate` bit for bit (same draws from the global RNG, in the same order and shapes).
Text-only by design: the prefix arrives as token ids or as embeddings (an image's projected
features spliced into the prompt), and the model is any callable with DiffusionLM's signature.

Every option hangs off that loop as a small named helper:
- `_window`: which positions a forward recomputes (`cache`): all of them, only the canvas (exact
  prefix cache, prefix-DLM attention), or only the current block (Fast-dLLM DualCache, approximate);
- `_predict`: the predicted token and its confidence per position: probability of the chosen
  token, top-2 margin, or exp(-entropy) (Dimple); Gumbel noise at a temperature; CFG;
- `_commit_rule`: which predictions a step commits: LLaDA's fixed schedule (`steps`), or
  Fast-dLLM's parallel rules (every one with confidence >= `threshold`, or the `factor` rule),
  both at least the most confident one per forward; `mask_tail` keeps them from the positions
  after the first stop token (committed or predicted), which a model trained with mask padding
  only ever saw as masks;
- `_retire`: early stop: a row is finished once a stop token is committed with every position
  before it filled; its tail is dropped and it leaves the batch, so later blocks never run for it.
Rows of a batch move through the blocks together (a row that has filled its block waits, and
commits nothing); left-padded rows get their unpadded RoPE positions, so a row's tokens do not
depend on its batch. `commit_step` records when each token was committed (for --show-steps).

`static=True` is the same loop with fixed shapes, for CUDA graphs: `_step` (forward, prediction,
commit rule, counters) runs on the device without reading anything back, a finished row stays in
the batch frozen instead of leaving it, the KV cache is written in place, and the host checks
whether a block is filled or every row finished only every `check_every` steps. A step taken after
everything was done commits nothing and counts nowhere, so both paths return the same output.
On a GPU the tensors a step writes (canvas, counters, KV cache) live in buffers kept per model and
shape (`_graph_buffers`), so a CUDA graph recorded for one request replays for the next one.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from mmdlm.cache import KVCache, reuse
from mmdlm.config import check_choices
from mmdlm.decoding import (
    Prompt,
    SampleOutput,
    add_gumbel_noise,
    answer_lengths,
    finished,
    first_stop,
    read_prompt,
)

Remasking = Literal["low_confidence", "random"]
Confidence = Literal["probability", "margin", "entropy"]
Cache = Literal["none", "prefix", "block"]
CONFIDENCES, CACHES = get_args(Confidence), get_args(Cache)
GRAPH_DEVICES = ("cuda",)  # where the static path compiles its step (torch.compile, CUDA graphs)
GRAPH_MODES = {False: "reduce-overhead", True: "max-autotune"}  # torch.compile's mode, by SamplerConfig.autotune
GRAPH_SHAPES = 4  # per model, the (batch, length) shapes whose step buffers stay allocated between requests
_GRAPH_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict[shape, buffers]

__all__ = ["SampleOutput", "SamplerConfig", "add_gumbel_noise", "confidence_of", "generate", "parallel_count",
           "release_graph_buffers", "tokens_per_step"]


@dataclass
class SamplerConfig:
    gen_length: int = 128
    block_length: int = 128
    steps: int = 128  # over the whole canvas, split evenly over the blocks; unused by the parallel rules
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: Remasking = "low_confidence"  # LLaDA's rule, or "random" (its baseline)
    threshold: float | None = None  # Fast-dLLM: commit every block token with confidence >= threshold
    factor: float | None = None  # Fast-dLLM factor rule: top n while (n + 1)(1 - c_n) <= factor
    confidence: Confidence = "probability"  # or "margin" (top-2) or "entropy" (exp(-H), ranks as -H)
    early_stop: bool = False  # stop a row once a stop token is committed and all before it is filled
    eos_id: int | None = None  # a stop token, and what fills a dropped tail
    stop_ids: tuple[int, ...] = ()  # further stop tokens (end of turn)
    # For models trained with sft_padding=mask (after the answer's EOS, masks that are never targets): never
    # commit a position after the first stop token, committed or predicted. Those positions stay masks, as in
    # training; the model's guesses there are untrained, and committing them misleads the answer's own positions.
    # Needs early_stop (the row ends when everything up to its stop token is filled).
    mask_tail: bool = False
    cache: Cache = "none"  # "prefix" (exact, needs prefix_dlm: see with_cache) or "block" (DualCache, approximate)
    prefix_dlm: bool = False  # prefix queries attend only the prefix (the model's prefix_len=)
    # LLaDA-V's rule: these ids may never be chosen at a masked position (its BOS, EOS and header ids)
    suppress_ids: tuple[int, ...] = ()
    float64_confidence: bool = False  # LLaDA-V ranks by a float64 softmax (LLaDA by float32)
    # Static shapes for CUDA graphs: finished rows stay in the batch (frozen), the KV cache is written in place,
    # and the host looks at the canvas (is the block filled, is every row finished?) only every check_every steps.
    # A check reads one bool; a step run past the end is a whole forward wasted (a VQA answer takes ~2 forwards).
    static: bool = False
    check_every: int = 1
    # Static path on a GPU: compile the step with mode="max-autotune" (Triton matmuls tuned per shape, which
    # can convert int8 weights as they load them; torchao's int8 layer otherwise converts the whole weight
    # first) instead of "reduce-overhead" (cuBLAS). Both record CUDA graphs; autotuning adds minutes per shape.
    autotune: bool = False

    @property
    def parallel(self) -> bool:
        return self.threshold is not None or self.factor is not None

    def with_cache(self, cache: Cache) -> SamplerConfig:
        """Return a copy that uses `cache`; the prefix cache brings the prefix-DLM attention it needs.

        The one rule: the prefix cache is exact only when prefix queries never attend to the answer
        (prefix-DLM attention), so asking for it switches that attention on; `validate` refuses a
        config that has one without the other.
        """
        return replace(self, cache=cache, prefix_dlm=self.prefix_dlm or cache == "prefix")

    def validate(self) -> None:
        """Raise ValueError naming the inconsistent options."""
        check_choices(self)
        if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
            raise ValueError(f"gen_length, block_length and steps must be positive, got {self}")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length={self.gen_length} is not divisible by block_length={self.block_length}")
        num_blocks = self.gen_length // self.block_length
        if not self.parallel and self.steps % num_blocks:
            raise ValueError(f"steps={self.steps} is not divisible by the number of blocks ({num_blocks})")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("set threshold or factor, not both")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor={self.factor} must be positive")
        if self.parallel and self.remasking != "low_confidence":
            raise ValueError("threshold/factor decoding ranks by confidence: use remasking='low_confidence'")
        if self.early_stop and self.eos_id is None:
            raise ValueError("early_stop needs eos_id (the token that ends an answer and fills its tail)")
        if self.mask_tail and not self.early_stop:
            raise ValueError("mask_tail leaves the positions after the stop token masked: it needs early_stop")
        if self.autotune and not self.static:
            raise ValueError("autotune compiles the static path's step: it needs static")
        if self.check_every < 1:
            raise ValueError(f"check_every={self.check_every} must be at least 1")
        if self.cache == "prefix" and not self.prefix_dlm:
            raise ValueError("the prefix cache is exact only with prefix-DLM attention: set prefix_dlm=True "
                             "(SamplerConfig.with_cache('prefix') does)")


def tokens_per_step(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Return [B, steps]: how many tokens each step commits, the remainder going to the first steps."""
    base = num_masked[:, None] // steps
    extra = torch.arange(steps, device=num_masked.device)[None, :] < (num_masked[:, None] % steps)
    return base + extra.long()


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


@dataclass
class _Rows:
    """The rows still being generated; every per-row tensor, so a finished row leaves them all."""

    index: torch.Tensor  # [n] row in the caller's batch
    active: torch.Tensor  # [n] bool: still generating (only the static path keeps finished rows, frozen)
    tokens: torch.Tensor  # [n, P+G] the prompt (ids, or placeholders for embeddings), then the canvas
    commit_step: torch.Tensor  # [n, P+G] forward that committed each position (0 given, -1 still masked)
    is_prompt: torch.Tensor  # [n, P+G] positions of the prompt, never committed
    key_mask: torch.Tensor | None  # [n, P+G] False = left padding
    position_ids: torch.Tensor | None  # [n, P+G] RoPE positions of the unpadded rows
    prefix_embeds: torch.Tensor | None  # [n, P, D]
    schedule: torch.Tensor | None = None  # [n, steps per block] LLaDA's tokens per step in the current block

    def select(self, keep: torch.Tensor) -> _Rows:
        return _Rows(**{k: None if v is None else v[keep] for k, v in vars(self).items()})


@dataclass
class _Run:
    """One `generate` call: what every forward shares, and the output the finished rows are written to."""

    model: Callable
    config: SamplerConfig
    mask_id: int
    prefix_len: int  # P
    stop_ids: torch.Tensor  # [k]
    cache: KVCache | None
    tokens: torch.Tensor  # [B, G] the output canvas
    commit_step: torch.Tensor  # [B, G]
    row_forwards: torch.Tensor  # [B]
    forward_passes: torch.Tensor  # [] forwards that had work to do, on the device (the static path takes no others)


@dataclass(frozen=True)
class _Window:
    """The positions [start, end) one forward runs; the keys and values of the others come from the cache."""

    start: int
    end: int
    logits_from: int  # the first position whose logits are computed (start <= logits_from < end)
    fill_cache: bool  # store this forward's keys/values: the cache is empty, or refreshed at a block start


def _start_rows(prompt: Prompt, mask_id: int, canvas: torch.Tensor | None, gen_length: int) -> _Rows:
    """Return every row before the first step: its prompt, then a canvas of mask ids (or the template `canvas`)."""
    B, P, G = prompt.batch_size, prompt.length, gen_length
    tokens = torch.full((B, P + G), mask_id, dtype=torch.long, device=prompt.device)  # [B, P+G]
    if canvas is not None:
        if canvas.shape[-1] != G:
            raise ValueError(f"canvas has {canvas.shape[-1]} positions, gen_length is {G}")
        tokens[:, P:] = canvas
    is_prompt = torch.zeros_like(tokens, dtype=torch.bool)
    if prompt.ids is not None:
        tokens[:, :P] = prompt.ids
        is_prompt[:, :P] = prompt.ids != mask_id  # masks written into the prompt stay fillable, as in LLaDA
    else:
        is_prompt[:, :P] = True
    commit_step = torch.where(tokens == mask_id, -1, 0)
    return _Rows(torch.arange(B, device=prompt.device), torch.ones(B, dtype=torch.bool, device=prompt.device),
                 tokens, commit_step, is_prompt, prompt.key_mask, prompt.position_ids, prompt.embeds)


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
    On the static path that is every row; a finished row's canvas no longer changes.
    """
    config.validate()
    prompt = read_prompt(prefix_ids, prefix_embeds, attention_mask, config.gen_length,
                         (config.eos_id, *config.stop_ids))
    rows = _start_rows(prompt, mask_id, canvas, config.gen_length)
    P, G = prompt.length, config.gen_length
    # Mask ids inside the prompt are holes too (LLaDA fills them): then every step may commit from position 0.
    prompt_holes = prompt.ids is not None and bool((prompt.ids == mask_id).any())
    if prompt_holes and config.cache != "none":
        raise ValueError("the prompt holds mask tokens, which a cached prefix cannot refill: pass them as `canvas`")
    device = prompt.device
    graphs = config.static and device.type in GRAPH_DEVICES  # on a CPU the same static code runs eagerly
    buffers = _graph_buffers(model, (rows.tokens.shape, config.cfg_scale > 0)) if graphs else None
    cache = None if config.cache == "none" else KVCache(static=config.static, buffers=buffers)
    run = _Run(model, config, mask_id, P, prompt.stop_ids, cache, rows.tokens[:, P:].clone(),
               rows.commit_step[:, P:].clone(), torch.zeros(prompt.batch_size, dtype=torch.long, device=device),
               torch.zeros((), dtype=torch.long, device=device))
    if graphs:
        rows.tokens, rows.commit_step, rows.active, run.row_forwards, run.forward_passes = (
            reuse(buffers, name, tensor) for name, tensor in (
                ("tokens", rows.tokens), ("commit_step", rows.commit_step), ("active", rows.active),
                ("row_forwards", run.row_forwards), ("forward_passes", run.forward_passes)))
        _pin(run, rows)
    steps_per_block = config.steps // (G // config.block_length)
    for start in range(P, P + G, config.block_length):
        end = start + config.block_length
        first = 0 if prompt_holes else start  # this block's steps commit positions [first, end)
        if not config.parallel:
            rows.schedule = tokens_per_step((rows.tokens[:, start:end] == mask_id).sum(1), steps_per_block)
        step = 0
        while _block_open(run, rows, start, end, step, steps_per_block):
            window = _window(run, step, start, end, first)
            # A forward that fills the cache allocates its buffers: it runs eagerly, the steps between replay graphs.
            step_fn = _step_graph(mode=GRAPH_MODES[config.autotune]) if graphs and not window.fill_cache else _step
            scheduled = None if config.parallel else rows.schedule[:, step]
            if graphs and scheduled is not None:  # own memory: a column's stride (steps per block) would be guarded
                scheduled = scheduled.clone(memory_format=torch.contiguous_format)
            step_fn(run, rows, window, start, first, end, scheduled)
            if graphs and window.fill_cache:
                _pin(run, rows)
            step += 1
            if on_forward is not None:
                on_forward(rows.index, rows.tokens[:, P:], rows.commit_step[:, P:])
            if config.early_stop and not config.static and not rows.active.all():
                rows = _retire(run, rows, ~rows.active)
        # Here the block [start, end) is committed: every row still generating has filled it.
    if len(rows.index):
        _retire(run, rows, torch.ones(len(rows.index), dtype=torch.bool, device=device))
    return SampleOutput(run.tokens, int(run.forward_passes), run.commit_step, run.row_forwards.clone(),
                        answer_lengths(run.tokens, run.stop_ids))


def _block_open(run: _Run, rows: _Rows, start: int, end: int, step: int, steps_per_block: int) -> bool:
    """Return whether the block [start, end) needs another step: some row still generating has work in it.

    A fixed schedule has `steps_per_block` steps; a parallel rule runs until the block is filled. This
    is the loop's one read from the device: the static path makes it only every `check_every` steps.
    """
    config = run.config
    if not config.parallel and step >= steps_per_block:
        return False
    if config.static and step % config.check_every:
        return True  # between checks the device runs on without waiting for the host
    if not config.parallel:  # eager: finished rows have left the batch; static without early stop: none finish
        return bool(rows.active.any()) if config.static and config.early_stop else len(rows.index) > 0
    return bool((rows.active & (rows.tokens[:, start:end] == run.mask_id).any(1)).any())


def _step(run: _Run, rows: _Rows, window: _Window, start: int, first: int, end: int,
          scheduled: torch.Tensor | None) -> None:
    """Run one forward over `window` and commit into [first, end) what the rule allows, without a host sync.

    A forward counts when some row still generating has work in the block [start, end) (a hole under a
    parallel rule, a step under the schedule): in the eager loop always, in the static loop all but the
    steps taken after everything was done, which commit nothing. Frozen (finished) rows commit nothing.
    """
    config, mask_id = run.config, run.mask_id
    logits = _logits(run, rows, window)  # [n, end of window - logits_from, V]
    chosen, confidence = _predict(run, logits, window, first, end)  # [n, end - first] each
    working = rows.active & (rows.tokens[:, start:end] == mask_id).any(1) if config.parallel else rows.active
    counts = working.any()  # [] bool
    run.forward_passes += counts
    run.row_forwards[rows.index] += rows.active & counts
    holes = (rows.tokens[:, first:end] == mask_id) & ~rows.is_prompt[:, first:end] & rows.active[:, None]
    if config.mask_tail:
        holes = before_stop(holes, chosen, rows.tokens[:, first:end], run.stop_ids, max(run.prefix_len - first, 0))
    commit = _commit_rule(config, confidence, holes, scheduled)  # [n, end - first]
    rows.tokens[:, first:end] = torch.where(commit, chosen, rows.tokens[:, first:end])
    rows.commit_step[:, first:end] = torch.where(commit, run.forward_passes, rows.commit_step[:, first:end])
    if config.early_stop:
        rows.active &= ~finished(rows.tokens[:, run.prefix_len :], mask_id, run.stop_ids)


def _pin(run: _Run, rows: _Rows) -> None:
    """Mark the tensors a step writes in place as fixed inputs: a CUDA graph then replays on them, not on copies."""
    cache = [] if run.cache is None else [*run.cache.keys, *run.cache.values]
    for tensor in (rows.tokens, rows.commit_step, rows.active, run.row_forwards, run.forward_passes, *cache):
        torch._dynamo.mark_static_address(tensor)


def _graph_buffers(model, shape) -> dict[str, torch.Tensor]:
    """Return the buffers `model`'s graph path writes at one shape; the same dict, request after request.

    A CUDA graph replays on the addresses it was recorded with, and torch records it again when a
    static input moved: with a fresh canvas and KV cache per request, every request would pay a
    recording (about an eager step) and leave one more graph behind. The GRAPH_SHAPES most recently
    used shapes keep their buffers; like the model itself, they serve one `generate` call at a time.
    """
    shapes = _GRAPH_BUFFERS.setdefault(model, OrderedDict())
    shapes[shape] = shapes.pop(shape, None) or {}
    while len(shapes) > GRAPH_SHAPES:
        shapes.popitem(last=False)
    return shapes[shape]


def release_graph_buffers(model) -> None:
    """Free the buffers `model`'s graph path keeps between requests (the KV caches of its recent shapes)."""
    _GRAPH_BUFFERS.pop(model, None)


@functools.cache
def _step_graph(backend: str = "inductor", mode: str | None = "reduce-overhead"):
    """Return `_step` compiled whole (fullgraph: no host sync can hide in it); by default into CUDA graphs.

    One graph per window and block (the Python ints of a step are constants to it); the static path's
    tokens and KV buffers keep their addresses within a request, so a replay reads and writes them in place.
    """
    return torch.compile(_step, backend=backend, mode=mode, fullgraph=True)


def _window(run: _Run, step: int, block_start: int, block_end: int, first: int) -> _Window:
    """Return the window of a step's forward: every position, or with a cache the canvas (prefix) or the block."""
    config, cache, P = run.config, run.cache, run.prefix_len
    refresh = cache is not None and (cache.length == 0 or (config.cache == "block" and step == 0))
    if cache is None or refresh:  # all positions, bar a prefix whose exact keys are cached already
        start, end = (P if config.prefix_dlm and cache is not None and cache.length else 0), P + config.gen_length
    elif config.cache == "prefix":
        start, end = P, P + config.gen_length
    else:  # DualCache: the block; prefix and suffix keys stay as they were at the block's start
        start, end = block_start, block_end
    if start > 0 and shifts_logits(run.model):  # position j's logits come from j - 1: run that position too
        start -= 1
    # Greedy low-confidence decoding draws nothing over the window: logits before `first` are never read.
    greedy = config.temperature == 0 and config.remasking == "low_confidence"
    return _Window(start, end, first if greedy else start, refresh)


def shifts_logits(model) -> bool:
    """Return whether `model` (a DiffusionLM or a model holding one as `.lm`) reads token i's logits at i - 1."""
    return bool(getattr(getattr(model, "lm", model).config, "shift_logits", False))


def _logits(run: _Run, rows: _Rows, window: _Window) -> torch.Tensor:
    """Return logits [n, window.end - window.logits_from, V], guided by classifier-free guidance when cfg_scale > 0."""
    config, P, mask_id = run.config, run.prefix_len, run.mask_id
    start, end = window.start, window.end
    copies = 2 if config.cfg_scale > 0 else 1
    ids = rows.tokens[:, start:end]
    if copies == 2:  # the unconditional copy: the prompt replaced by masks
        ids = torch.cat([ids, torch.where(rows.is_prompt[:, start:end], mask_id, ids)])
    kwargs = {"logits_from": window.logits_from - start} if window.logits_from > start else {}
    if rows.key_mask is not None:
        kwargs["attention_mask"] = rows.key_mask.repeat(copies, 1)
        kwargs["position_ids"] = rows.position_ids[:, start:end].repeat(copies, 1)
    if config.prefix_dlm and start < P:  # queries after the prefix see every key anyway: no mask, a faster kernel
        kwargs["prefix_len"] = P
    if run.cache is not None:
        kwargs.update(cache=run.cache, start=start, fill_cache=window.fill_cache)
    if rows.prefix_embeds is not None and start < P:  # windows start at 0, at P - 1 (shift_logits) or after the prefix
        embed = run.model.get_input_embeddings()
        prefix = rows.prefix_embeds[:, start:].repeat(copies, 1, 1)  # [copies*n, P - start, D]
        if copies == 2:
            prefix[len(rows.index) :] = embed(torch.full_like(ids[len(rows.index) :, : P - start], mask_id))
        logits = run.model(inputs_embeds=torch.cat([prefix, embed(ids[:, P - start :])], dim=1), **kwargs)
    else:
        logits = run.model(input_ids=ids, **kwargs)
    if copies == 2:
        cond, uncond = logits.chunk(2)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
    return logits


def _predict(run: _Run, logits: torch.Tensor, window: _Window, first: int, end: int):
    """Return (predicted token, its confidence), each [n, end - first], for the positions [first, end)."""
    config = run.config
    lo, hi = first - window.logits_from, end - window.logits_from  # [first, end) within the logits
    scores = add_gumbel_noise(logits, config.temperature)[:, lo:hi]  # noise over the whole window, as LLaDA draws it
    logits_in = logits[:, lo:hi]  # [n, end - first, V]
    # masked_fill over a vocabulary mask, not index_fill: torch 2.11's inductor cannot lower index_fill (#19)
    vocab = torch.arange(logits.shape[-1], device=logits.device) if config.suppress_ids or config.parallel else None
    if config.suppress_ids:  # only masked positions are ever committed: the rule may cover them all
        suppress = torch.isin(vocab, torch.tensor(config.suppress_ids, device=logits.device))
        scores = scores.masked_fill(suppress, -torch.inf)
        logits_in = logits_in.masked_fill(suppress, -torch.inf)
    if config.parallel:  # a committed mask id would stay a hole, and the block never fill
        scores = scores.masked_fill(vocab == run.mask_id, -torch.inf)
    chosen = scores.argmax(-1)  # [n, end - first]
    if config.remasking == "random":
        return chosen, torch.rand(logits.shape[:2], device=logits.device)[:, lo:hi]
    return chosen, confidence_of(logits_in.double() if config.float64_confidence else logits_in, chosen,
                                 config.confidence)


def before_stop(holes: torch.Tensor, chosen: torch.Tensor, tokens: torch.Tensor, stop_ids: torch.Tensor,
                canvas_from: int = 0) -> torch.Tensor:
    """Return `holes` [n, W] without the positions after each row's first stop token (`mask_tail`).

    A stop token is a committed one in `tokens` or the prediction `chosen` at a hole; columns before
    `canvas_from` are the prompt's (its end-of-turn token is no answer's end). The stop's own position
    stays eligible, so a row always has a hole to commit until everything up to its stop is filled.
    """
    stop = torch.isin(torch.where(holes, chosen, tokens), stop_ids)  # [n, W]
    stop[:, :canvas_from] = False
    after = stop.long().cumsum(1) - stop.long() > 0  # a stop strictly before this position
    return holes & ~after


def _commit_rule(config: SamplerConfig, confidence: torch.Tensor, holes: torch.Tensor,
                 scheduled: torch.Tensor | None) -> torch.Tensor:
    """Return [n, W] bool: the holes a step commits, the most confident first.

    LLaDA's schedule commits `scheduled` [n] per row; Fast-dLLM's rules commit what passes them.
    """
    confidence = torch.where(holes, confidence, -torch.inf)
    if config.parallel:
        count = torch.minimum(parallel_count(confidence, config.threshold, config.factor), holes.sum(1))
    else:
        count = scheduled
    # Each position's rank, ties to the earlier position: the same order whatever the count, read on the device.
    order = confidence.sort(dim=1, descending=True, stable=True).indices  # [n, W] the most confident first
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # [n, W] 0 for the most confident
    return (rank < count[:, None]) & holes


def _retire(run: _Run, rows: _Rows, done: torch.Tensor) -> _Rows:
    """Write the `done` rows to the output (with early stop, the tail after the stop token dropped); return the rest."""
    P, config = run.prefix_len, run.config
    tokens, steps = rows.tokens[done, P:], rows.commit_step[done, P:]
    if config.early_stop:
        tail = torch.arange(config.gen_length, device=tokens.device) > first_stop(tokens, run.stop_ids)[:, None]
        tokens, steps = tokens.masked_fill(tail, config.eos_id), steps.masked_fill(tail, -1)
    run.tokens[rows.index[done]], run.commit_step[rows.index[done]] = tokens, steps
    keep = (~done).nonzero().squeeze(1)
    if run.cache is not None and len(keep):  # CFG rows sit after the conditional ones
        n = len(rows.index)
        run.cache = run.cache.select(keep if config.cfg_scale == 0 else torch.cat([keep, keep + n]))
    return rows.select(keep)
