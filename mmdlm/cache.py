"""Key/value cache for the sampler: keys and values of positions that need not be recomputed.

One object serves both caches of the design:
- exact prefix cache: with prefix-DLM attention the image + prompt keys/values never depend on the
  answer, so they are computed once per request (`fill_cache` on the prefix) and every step only
  runs the canvas (`start = prefix_len`);
- block cache (Fast-dLLM DualCache) for fully bidirectional models: keys/values of the whole
  sequence are refreshed at each block start and, within the block, only the block is recomputed
  while the cached prefix and suffix stand in for the rest (approximate: they are a block stale).

`static=True` keeps one buffer per layer, sized by the first (full-length) forward, and writes each
later window into it in place instead of concatenating a new tensor: fixed addresses for CUDA
graphs, no allocation per step. It returns the same keys and values, because the sampler's every
forward writes its window before reading it, and no one reads a window that a forward did not store.
With `buffers` (a dict the caller keeps) those per-layer buffers outlive the cache: the next request
of the same shape writes into the same memory, so a recorded CUDA graph replays on it (`reuse`).
"""

from __future__ import annotations

import torch


def reuse(buffers: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> torch.Tensor:
    """Return `value` copied into `buffers[name]` (contiguous), allocated anew only when its shape or dtype changed."""
    held = buffers.get(name)
    if held is None or held.shape != value.shape or held.dtype != value.dtype or held.device != value.device:
        held = buffers[name] = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    return held.copy_(value)


class KVCache:
    """Per-layer keys and values [B, H_kv, T, d] for absolute positions 0..T-1."""

    def __init__(self, static: bool = False, buffers: dict[str, torch.Tensor] | None = None) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.static = static
        self.buffers = buffers  # static only: where the per-layer buffers stay between requests

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values (all layers, all rows)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def splice(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, store: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the keys/values every query sees: cached ones with [start, start+L) replaced by k, v.

        With `store`, the result also becomes the cache of this layer.
        """
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None:
            end = start + k.shape[2]
            if start > old_k.shape[2] or (self.static and end > old_k.shape[2]):
                raise ValueError(f"cache holds {old_k.shape[2]} positions, cannot continue at {start}")
            if self.static:
                old_k[:, :, start:end], old_v[:, :, start:end] = k, v
                return old_k, old_v
            k = torch.cat([old_k[:, :, :start], k, old_k[:, :, end:]], dim=2)
            v = torch.cat([old_v[:, :, :start], v, old_v[:, :, end:]], dim=2)
        elif start != 0:
            raise ValueError(f"empty cache cannot serve queries starting at position {start}")
        if store and self.static:  # the buffer: contiguous, as the concatenations of the dynamic cache are
            if self.buffers is None:
                k, v = k.contiguous(), v.contiguous()
            else:
                k, v = reuse(self.buffers, f"k{layer}", k), reuse(self.buffers, f"v{layer}", v)
            self.keys[layer], self.values[layer] = k, v
        elif store:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> KVCache:
        """Return a cache holding only the given batch rows (for rows that finished early)."""
        out = KVCache(self.static)  # fewer rows: other shapes, no longer the kept buffers
        out.keys = [k[rows] for k in self.keys]
        out.values = [v[rows] for v in self.values]
        return out
