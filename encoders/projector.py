"""Projector: vision features [N, T, C] -> LM-width tokens [N, T', D].

`mlp2x_gelu` is LLaVA-1.5's (Linear-GELU-Linear); `linear` is LLaVA-1's. `pool: 2` averages
2x2 neighbourhoods of the patch grid first (LaViDa's token compression: SigLIP's 27x27 = 729
tokens become 14x14 = 196; a window hanging over an odd edge averages the cells it covers).
`grid: G` instead averages the patch grid down to exactly G x G tokens (adaptive pooling), so one
token covers one region of the image whatever the tower's resolution: the demo world's 3x3 grid
of cells becomes 9 tokens, one per cell. `pos_embed: true` adds a learned embedding per image
token (ViT-style), so the LM knows where in the image each token lies without decoding it from
the 1-D rotary positions of a run.
`merge: spatial_unpad` (LLaVA-NeXT, LLaDA-V) adds the learned `image_newline` that ends every row
of an any-resolution image's merged grid (encoders/anyres.py does the merging).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmdlm.config import ConfigError, check_choices


@dataclass
class ProjectorConfig:
    type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    pool: int = 1  # side of the average-pooling window over the patch grid (1 = none)
    grid: int = 0  # average the patch grid down to grid x grid tokens (0 = keep it; excludes pool)
    pos_embed: bool = False  # add a learned embedding per image token
    # flat: one view, its tokens as they are; spatial_unpad: LLaVA's any-resolution merge (needs vision.anyres_max)
    merge: Literal["flat", "spatial_unpad"] = "flat"


class Projector(nn.Module):
    """Vision features [N, T, C] -> (optionally pooled) LM-width tokens [N, num_tokens(T), D]."""

    def __init__(self, cfg: ProjectorConfig, vision_width: int, lm_width: int, vision_tokens: int | None = None):
        super().__init__()
        check_choices(cfg, "projector.")
        if cfg.type == "mlp2x_gelu":
            self.proj = nn.Sequential(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
        else:
            self.proj = nn.Linear(vision_width, lm_width)
        if cfg.pool < 1 or cfg.grid < 0:
            raise ConfigError(f"projector.pool={cfg.pool} must be >= 1 and projector.grid={cfg.grid} >= 0")
        if cfg.pool > 1 and cfg.grid:
            raise ConfigError("set projector.pool or projector.grid, not both")
        self.pool, self.grid = cfg.pool, cfg.grid
        self.pos_embed = None
        if cfg.pos_embed:
            if vision_tokens is None:
                raise ValueError("projector.pos_embed needs the tower's number of tokens (vision_tokens)")
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens(vision_tokens), lm_width))  # [1, T', D]
        if cfg.merge == "spatial_unpad":
            if cfg.pool != 1 or cfg.grid:
                raise ConfigError("projector.merge=spatial_unpad keeps every patch: set projector.pool=1, grid=0")
            self.image_newline = nn.Parameter(torch.zeros(lm_width))  # [D] ends each row of the merged grid

    def num_tokens(self, vision_tokens: int) -> int:
        """Return how many tokens one image becomes."""
        if self.pool == 1 and not self.grid:
            return vision_tokens
        side = math.isqrt(vision_tokens)
        if side * side != vision_tokens:
            raise ConfigError(f"projector.pool/grid need a square grid of patch tokens, got {vision_tokens} "
                              "(with vision.use_cls=true the class token breaks the grid)")
        return self.grid**2 if self.grid else math.ceil(side / self.pool) ** 2

    def forward(self, features: torch.Tensor, merge: Callable | None = None) -> torch.Tensor:
        """Return the tokens; with `merge` (spatial_unpad), merge(tokens, image_newline) instead.

        The newline is read here, inside the forward, because ZeRO-3 gathers a module's parameters
        only while its forward runs: read from outside, it is an empty placeholder."""
        out = self._project(features)
        return out if merge is None else merge(out, self.image_newline)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool > 1 or self.grid:
            N, T, C = features.shape
            side = math.isqrt(T)
            grid = features.transpose(1, 2).reshape(N, C, side, side)  # [N, C, s, s]
            pooled = F.adaptive_avg_pool2d(grid, self.grid) if self.grid else \
                F.avg_pool2d(grid, self.pool, ceil_mode=True)  # [N, C, g, g]
            features = pooled.flatten(2).transpose(1, 2)  # [N, g*g, C]
        out = self.proj(features)  # [N, T', D]
        return out if self.pos_embed is None else out + self.pos_embed.to(out.dtype)
