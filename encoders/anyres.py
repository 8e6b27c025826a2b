"""Images of any resolution as tiles (LLaVA-NeXT's `anyres`, LLaDA-V's `anyres_max_N`), and their tokens merged back.

Tiling: among the grid resolutions `pinpoints` ([width, height] multiples of the crop size), pick
the one that keeps the most of the image's pixels and, among those, wastes the least; resize the
image into it (aspect kept, bicubic, the scaled side rounded up), centre it on black and cut it
into crop-size tiles row by row. A base view of the whole image squashed to one crop comes first.

Merging (`spatial_unpad`): the tiles' patch grids are stitched into one grid of the padded image,
the rows or columns that only saw padding are cut away, the grid is shrunk bilinearly when it
holds over 1.1x the patches of `max_crops` crops, and a learned newline embedding ends every row.
The base view's tokens go first. The token count is a function of the image size alone, so the
prompt's `<image>` run can be sized before the tower runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class AnyresGrid:
    crop: int  # side of one tile in pixels (the tower's input size)
    pinpoints: tuple[tuple[int, int], ...]  # candidate (width, height) of the tiled image
    max_crops: int  # anyres_max_N: a merged grid over ~N crops' worth of patches is shrunk
    patches_per_side: int  # the tower's patch grid side per tile

    def best_resolution(self, size: tuple[int, int]) -> tuple[int, int]:
        """Return the pinpoint (width, height) that keeps the most of an image of `size` (width, height)."""
        width, height = size
        best, most_kept, least_wasted = None, 0, math.inf
        for w, h in self.pinpoints:
            scale = min(w / width, h / height)
            kept = min(int(width * scale) * int(height * scale), width * height)
            wasted = w * h - kept
            if kept > most_kept or (kept == most_kept and wasted < least_wasted):
                best, most_kept, least_wasted = (w, h), kept, wasted
        return best

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Return (tiles across, tiles down) for an image of `size`."""
        w, h = self.best_resolution(size)
        return w // self.crop, h // self.crop

    def num_crops(self, size: tuple[int, int]) -> int:
        """Return the views one image becomes: the base view and its tiles."""
        across, down = self.grid(size)
        return 1 + across * down

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """Return [base view, tiles in row-major order], each crop x crop pixels."""
        target_w, target_h = self.best_resolution(image.size)
        width, height = image.size
        scale_w, scale_h = target_w / width, target_h / height  # the scale first: LLaVA's rounding, bit for bit
        if scale_w < scale_h:  # the width fills, the height is padded
            new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
        else:
            new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
        padded = Image.new("RGB", (target_w, target_h), (0, 0, 0))
        padded.paste(image.resize((new_w, new_h), Image.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))
        c = self.crop
        tiles = [padded.crop((x, y, x + c, y + c)) for y in range(0, target_h, c) for x in range(0, target_w, c)]
        return [image.resize((c, c), Image.BICUBIC), *tiles]

    def _unpadded(self, size: tuple[int, int]) -> tuple[slice, slice, int, int]:
        """Return (row slice, column slice, rows, columns) of the stitched patch grid that shows the image."""
        across, down = self.grid(size)
        n = self.patches_per_side
        rows, cols = down * n, across * n
        width, height = size
        if width / height > cols / rows:  # padding went above and below
            pad = (rows - int(height * (cols / width))) // 2
            keep_rows, keep_cols = slice(pad, rows - pad), slice(0, cols)
        else:
            pad = (cols - int(width * (rows / height))) // 2
            keep_rows, keep_cols = slice(0, rows), slice(pad, cols - pad)
        r = len(range(rows)[keep_rows])
        k = len(range(cols)[keep_cols])
        return keep_rows, keep_cols, r, k

    def _shrunk(self, rows: int, cols: int) -> tuple[int, int] | None:
        """Return the bilinear target (rows, cols) when the grid is over 1.1x max_crops crops, else None."""
        times = math.sqrt(rows * cols / (self.max_crops * self.patches_per_side**2))
        return (int(rows // times), int(cols // times)) if times > 1.1 else None

    def num_tokens(self, size: tuple[int, int]) -> int:
        """Return how many tokens an image of `size` merges into (base view, then rows plus a newline each)."""
        _, _, rows, cols = self._unpadded(size)
        rows, cols = self._shrunk(rows, cols) or (rows, cols)
        return self.patches_per_side**2 + rows * (cols + 1)

    def merge(self, features: torch.Tensor, size: tuple[int, int], newline: torch.Tensor) -> torch.Tensor:
        """Return one image's tokens [num_tokens(size), D] from its views' features [1 + tiles, n*n, D]."""
        across, down = self.grid(size)
        n = self.patches_per_side
        base, tiles = features[0], features[1:]
        D = features.shape[-1]
        grid = tiles.view(down, across, n, n, D).permute(4, 0, 2, 1, 3).reshape(D, down * n, across * n)  # [D, R, C]
        keep_rows, keep_cols, rows, cols = self._unpadded(size)
        grid = grid[:, keep_rows, keep_cols]
        target = self._shrunk(rows, cols)
        if target is not None:
            grid = F.interpolate(grid[None], list(target), mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(D, grid.shape[1], 1).to(grid.dtype)], dim=-1)
        return torch.cat([base, grid.flatten(1).transpose(0, 1)], dim=0)  # [n*n + rows * (cols + 1), D]
