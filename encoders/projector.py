"""Projector: vision features [N, T, C] -> LM-width tokens [N, T', D].

`mlp2x_gelu` is LLaVA-1.5's (Linear-GELU-Linear); `linear` is LLaVA-1's. `pool: 2` averages
2x2 neighbourhoods of the patch grid first (LaViDa's token compression: SigLIP's 27x27 = 729
tokens become 14x14 = 196; a window hanging over an odd edge averages the cells it covers).
`merge: spatial_unpad` (LLaVA-NeXT, LLaDA-V) adds the learned `image_newline` that ends every row
of an any-resolution image's merged grid (encoders/anyres.py does the merging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ProjectorConfig:
    type: str = "mlp2x_gelu"  # "mlp2x_gelu" | "linear"
    pool: int = 1  # side of the average-pooling window over the patch grid (1 = none)
    merge: str = "flat"  # "flat" (one view, its tokens as they are) | "spatial_unpad" (needs vision.anyres_max)


class Projector(nn.Module):
    """Vision features [N, T, C] -> (optionally pooled) LM-width tokens [N, num_tokens(T), D]."""

    def __init__(self, cfg: ProjectorConfig, vision_width: int, lm_width: int):
        super().__init__()
        if cfg.type == "mlp2x_gelu":
            self.proj = nn.Sequential(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
        elif cfg.type == "linear":
            self.proj = nn.Linear(vision_width, lm_width)
        else:
            raise ValueError(f"projector.type={cfg.type!r} must be 'mlp2x_gelu' or 'linear'")
        if cfg.pool < 1:
            raise ValueError(f"projector.pool={cfg.pool} must be >= 1")
        self.pool = cfg.pool
        if cfg.merge not in ("flat", "spatial_unpad"):
            raise ValueError(f"projector.merge={cfg.merge!r} must be 'flat' or 'spatial_unpad'")
        if cfg.merge == "spatial_unpad":
            if cfg.pool != 1:
                raise ValueError("projector.merge=spatial_unpad keeps every patch: set projector.pool=1")
            self.image_newline = nn.Parameter(torch.zeros(lm_width))  # [D] ends each row of the merged grid

    def num_tokens(self, vision_tokens: int) -> int:
        """Return how many tokens one image becomes."""
        if self.pool == 1:
            return vision_tokens
        side = math.isqrt(vision_tokens)
        if side * side != vision_tokens:
            raise ValueError(f"projector.pool={self.pool} needs a square grid of patch tokens, got {vision_tokens} "
                             "(with vision.use_cls=true the class token breaks the grid)")
        return math.ceil(side / self.pool) ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            N, T, C = features.shape
            side = math.isqrt(T)
            grid = features.transpose(1, 2).reshape(N, C, side, side)  # [N, C, s, s]
            features = F.avg_pool2d(grid, self.pool, ceil_mode=True).flatten(2).transpose(1, 2)  # [N, ceil(s/p)^2, C]
        return self.proj(features)
