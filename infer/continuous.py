"""Continuous batching for the diffusion sampler: rows join and leave a running batch between forwards.

`generate` (mmdlm/sampling.py) takes all its rows at once and moves them through the blocks
together, so a server that calls it holds every new request until the slowest row of the batch
ends. Here each row keeps its own block and step: a forward runs the rows there are, a row leaves
at the forward that finishes it, and waiting requests join before the next forward (Orca's
iteration-level scheduling, for a masked-diffusion sampler).

Each step is the sampler's own: its `_logits`, `_predict` and `_commit_rule` over the window it
uses without a cache, so at temperature 0 a row gets the tokens, commit steps and forward count
that `generate` gives it alone. Why joining mid-flight cannot change them: rows are left-padded to
the batch's longest prompt with padded keys masked and each row's RoPE positions its own (as in
`generate`'s batches); without a cache no state is shared between forwards but the canvas itself;
and the commit rules act row by row. Padding is trimmed as long prompts leave.

The prefix cache (exact: it comes with prefix-DLM attention, so a prefix's keys and values never
depend on the answer) runs here too: a row's first forward runs all its positions, as `generate`'s
does, and stores its prefix's keys and values, re-padded with the batch's; later forwards run only
the canvas over them. Rows that joined run their first forward apart from the others, whose
window is the canvas. The block cache (refreshed per block, approximate) and classifier-free
guidance are not supported (`supports`): those configs are decoded by `generate` in whole batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mmdlm.cache import KVCache
from mmdlm.decoding import finished, first_stop
from mmdlm.sampling import (
    SamplerConfig,
    _commit_rule,
    _logits,
    _predict,
    _Rows,
    _Run,
    _Window,
    before_stop,
    shifts_logits,
    tokens_per_step,
)


def supports(config: SamplerConfig) -> bool:
    """Return whether rows with `config` can join a RunningBatch: the uncached sampler, or the prefix cache
    (exact: it comes with prefix-DLM attention) without classifier-free guidance."""
    return config.cache == "none" or (config.cache == "prefix" and config.cfg_scale == 0)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Return `tensor` with zeros in front along `dim` up to `width` (left padding)."""
    extra = width - tensor.shape[dim]
    if extra <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


@dataclass
class Finished:
    key: object  # the caller's handle of the row, as given to join
    tokens: list[int]  # [G] the canvas; after an early stop the tail holds eos_id
    commit_step: list[int]  # [G] the row's forward (1-based) that committed each position; 0 given, -1 dropped
    length: int  # position of the first stop token, G when it has none
    forwards: int  # forwards the row took part in


class RunningBatch:
    """The rows being decoded with one SamplerConfig, each at its own block and step."""

    def __init__(self, model, config: SamplerConfig, mask_id: int):
        config.validate()
        if not supports(config):
            raise ValueError(f"cache={config.cache!r}: a running batch decodes without a cache, or with the prefix "
                             "cache and no classifier-free guidance")
        self.model, self.config, self.mask_id = model, config, mask_id
        self.device = next(model.parameters()).device
        self.stop_ids = torch.tensor([i for i in (config.eos_id, *config.stop_ids) if i is not None],
                                     device=self.device)
        self.num_blocks = config.gen_length // config.block_length
        self.steps_per_block = config.steps // self.num_blocks
        self.keys: list = []
        G = config.gen_length
        long = dict(dtype=torch.long, device=self.device)
        self.prompt_len = torch.zeros(0, **long)  # [n] real prompt tokens of each row
        self.embeds: torch.Tensor | None = None  # [n, P, D] prefix embeddings, left-padded to P
        self.cache: KVCache | None = None  # prefix cache: keys/values [n - fresh, H_kv, P, d] of the rows' prefixes
        self.fresh = 0  # rows at the end that joined since the last forward: theirs is not cached yet
        self.canvas = torch.zeros(0, G, **long)  # [n, G]
        self.commit_step = torch.zeros(0, G, **long)  # [n, G]
        self.block = torch.zeros(0, **long)  # [n] the block each row is filling
        self.step = torch.zeros(0, **long)  # [n] steps taken in that block
        self.forwards = torch.zeros(0, **long)  # [n]
        self.schedule = torch.zeros(0, self.steps_per_block, **long)  # [n, steps] LLaDA's tokens per step

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def prefix_len(self) -> int:
        return 0 if self.embeds is None else self.embeds.shape[1]

    def join(self, keys: list, prefixes: list[torch.Tensor]) -> None:
        """Add rows before the next forward: each one's prefix embeddings [p, D] (Answerer.prefix_rows)."""
        k, P, G = len(keys), self.prefix_len, self.config.gen_length
        width = max(P, *(len(prefix) for prefix in prefixes))
        embeds = prefixes[0].new_zeros(k, width, prefixes[0].shape[-1])  # [k, P, D] left-padded
        for row, prefix in enumerate(prefixes):
            embeds[row, width - len(prefix) :] = prefix
        prompt_len = torch.tensor([len(p) for p in prefixes], device=self.device)
        if self.cache is not None and width > P:  # the others take more left padding, in their keys too
            self.cache.keys = [_pad_left(t, width, 2) for t in self.cache.keys]
            self.cache.values = [_pad_left(t, width, 2) for t in self.cache.values]
        self.fresh += k
        self.embeds = embeds if self.embeds is None else torch.cat([_pad_left(self.embeds, width, 1), embeds])
        canvas = torch.full((k, G), self.mask_id, dtype=torch.long, device=self.device)
        self.keys += keys
        self.prompt_len = torch.cat([self.prompt_len, prompt_len])
        self.canvas = torch.cat([self.canvas, canvas])
        self.commit_step = torch.cat([self.commit_step, torch.full_like(canvas, -1)])
        zeros = torch.zeros(k, dtype=torch.long, device=self.device)
        self.block, self.step, self.forwards = (torch.cat([t, zeros]) for t in (self.block, self.step, self.forwards))
        self.schedule = torch.cat([self.schedule, self._schedule(canvas, zeros)])

    def _schedule(self, canvas: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """Return [k, steps per block]: LLaDA's tokens per step for the holes of each row's `block`."""
        L = self.config.block_length
        holes = (canvas.view(len(canvas), self.num_blocks, L) == self.mask_id).sum(2)  # [k, blocks]
        in_block = holes.gather(1, block.clamp(max=self.num_blocks - 1)[:, None]).squeeze(1)
        return tokens_per_step(in_block, self.steps_per_block)

    @torch.no_grad()
    def step_all(self) -> list[Finished]:
        """Run one forward over every row, commit each row's tokens by its rule; return the rows it finished."""
        config, mask_id, L, P = self.config, self.mask_id, self.config.block_length, self.prefix_len
        rows, run, window = self._sampler_view()
        logits = _logits(run, rows, window) if config.cache == "none" else self._cached_logits(rows, run, window)
        self.forwards += 1
        for b in self.block.unique().tolist():  # rows in one block commit together, as in `generate`
            sel = (self.block == b).nonzero().squeeze(1)
            first, end = P + b * L, P + (b + 1) * L
            chosen, confidence = _predict(run, logits[sel], window, first, end)  # [k, L] each
            block = self.canvas[sel, b * L : (b + 1) * L]  # [k, L] (a copy: written back below)
            holes = block == mask_id
            if config.mask_tail:  # earlier blocks hold no stop: a row that committed one has finished
                holes = before_stop(holes, chosen, block, run.stop_ids)
            scheduled = None if config.parallel else self.schedule[sel, self.step[sel]]
            commit = _commit_rule(config, confidence, holes, scheduled)
            block[commit] = chosen[commit]
            steps = self.commit_step[sel, b * L : (b + 1) * L]
            steps[commit] = self.forwards[sel][:, None].expand_as(steps)[commit]
            self.canvas[sel, b * L : (b + 1) * L], self.commit_step[sel, b * L : (b + 1) * L] = block, steps
        self.step += 1
        self._advance()
        done = self.block == self.num_blocks  # [n] every block filled
        if config.early_stop:
            done |= finished(self.canvas, mask_id, self.stop_ids)
        return self._leave(done) if done.any() else []

    def _cached_logits(self, rows: _Rows, run: _Run, window: _Window) -> torch.Tensor:
        """Return every row's logits [n, P + G - window.logits_from, V] with the prefix cache.

        The rows that have a cache run the canvas `window` over it; the fresh ones run every position, as
        `generate`'s first forward does, and their prefix's keys and values join the cache (with prefix-DLM
        attention they never depend on the answer; the canvas's are recomputed at every forward).
        """
        n, P = len(self), self.prefix_len
        old, new = torch.arange(n - self.fresh, device=self.device), torch.arange(n - self.fresh, n, device=self.device)
        parts = [_logits(replace(run, cache=self.cache), rows.select(old), window)] if len(old) else []
        if len(new):
            cache = KVCache()
            whole = replace(window, start=0, fill_cache=True)
            parts.append(_logits(replace(run, cache=cache), rows.select(new), whole))
            cache.keys, cache.values = ([t[:, :, :P] for t in store] for store in (cache.keys, cache.values))
            if self.cache is not None:
                cache.keys = [torch.cat(pair) for pair in zip(self.cache.keys, cache.keys)]
                cache.values = [torch.cat(pair) for pair in zip(self.cache.values, cache.values)]
            self.cache, self.fresh = cache, 0
        return torch.cat(parts)

    def _sampler_view(self) -> tuple[_Rows, _Run, _Window]:
        """Return the rows, run and window as the sampler's step reads them (no cache: every position)."""
        config, mask_id = self.config, self.mask_id
        n, P, G = len(self), self.prefix_len, config.gen_length
        tokens = torch.cat([torch.full((n, P), mask_id, dtype=torch.long, device=self.device), self.canvas], 1)
        is_prompt = torch.zeros_like(tokens, dtype=torch.bool)
        is_prompt[:, :P] = True
        key_mask = position_ids = None
        if bool((self.prompt_len < P).any()):  # as `read_prompt`: no mask when no row is padded
            key_mask = torch.arange(P + G, device=self.device)[None, :] >= (P - self.prompt_len)[:, None]
            position_ids = (key_mask.long().cumsum(1) - 1).clamp(min=0)  # [n, P+G] each row's own positions
        rows = _Rows(torch.arange(n, device=self.device), torch.ones(n, dtype=torch.bool, device=self.device),
                     tokens, None, is_prompt, key_mask, position_ids, self.embeds)
        run = _Run(self.model, config, mask_id, P, self.stop_ids, None, None, None, None,
                   torch.zeros((), dtype=torch.long, device=self.device))
        # With the prefix cache the window is the canvas (from P - 1 when logits shift), as `_window` runs it.
        start = 0 if config.cache == "none" else P - int(shifts_logits(self.model))
        # Greedy low-confidence decoding reads logits from the earliest current block on (`_window`'s rule).
        greedy = config.temperature == 0 and config.remasking == "low_confidence"
        logits_from = P + int(self.block.min()) * config.block_length if greedy else start
        return rows, run, _Window(start, P + G, logits_from, False)

    def _advance(self) -> None:
        """Move each row whose block is done (filled, or its steps taken) to its next block."""
        L, n = self.config.block_length, len(self)
        for _ in range(self.num_blocks):  # a block may already be filled (never with a canvas of masks)
            holes = (self.canvas.view(n, self.num_blocks, L) == self.mask_id).any(2)  # [n, blocks]
            open_block = holes.gather(1, self.block.clamp(max=self.num_blocks - 1)[:, None]).squeeze(1)
            live = self.block < self.num_blocks
            if self.config.parallel:
                done = live & ~open_block
            else:
                done = live & (self.step == self.steps_per_block)
            if not done.any():
                return
            self.block = self.block + done.long()
            self.step = torch.where(done, 0, self.step)
            self.schedule = torch.where(done[:, None], self._schedule(self.canvas, self.block), self.schedule)

    def _leave(self, done: torch.Tensor) -> list[Finished]:
        """Remove the `done` rows [n] and return them (early stop: the tail after the stop token dropped)."""
        config, G = self.config, self.config.gen_length
        stops = first_stop(self.canvas, self.stop_ids) if len(self.stop_ids) else torch.full_like(self.block, G)
        out = []
        for row in done.nonzero().squeeze(1).tolist():
            tokens, steps, stop = self.canvas[row].tolist(), self.commit_step[row].tolist(), int(stops[row])
            if config.early_stop:
                tokens = tokens[: stop + 1] + [config.eos_id] * (G - stop - 1)
                steps = steps[: stop + 1] + [-1] * (G - stop - 1)
            out.append(Finished(self.keys[row], tokens, steps, stop, int(self.forwards[row])))
        keep = (~done).nonzero().squeeze(1)
        self.keys = [self.keys[row] for row in keep.tolist()]
        for name in ("prompt_len", "canvas", "commit_step", "block", "step", "forwards", "schedule"):
            setattr(self, name, getattr(self, name)[keep])
        if not len(keep):
            self.embeds = self.cache = None
            return out
        trim = self.prefix_len - int(self.prompt_len.max())  # columns that are padding in every row left
        self.embeds = self.embeds[keep, trim:]
        if self.cache is not None:
            self.cache = self.cache.select(keep)
            self.cache.keys = [t[:, :, trim:] for t in self.cache.keys]
            self.cache.values = [t[:, :, trim:] for t in self.cache.values]
        return out

    def committed(self) -> list[int]:
        """Return each row's committed answer so far: positions before its first hole, up to its first stop."""
        filled = (self.canvas != self.mask_id).long().cumprod(1).sum(1)  # [n]
        stops = first_stop(self.canvas, self.stop_ids) if len(self.stop_ids) else filled
        return torch.minimum(filled, stops).tolist()
