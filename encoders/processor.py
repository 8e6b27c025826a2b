"""Image preprocessing taken from the tower's own config, so real weights get their own transform.

Size, mean, std and interpolation come from the library: timm's `resolve_model_data_config`
(the default weights' pretrained config, even for a random init) or open_clip's
`preprocess_cfg` (filled from its pretrained-tag registry by the tower). By default the whole
image is resized to the input size, as SigLIP's own processor does: timm's ImageNet-style 0.9
centre crop would cut off what a question about a corner asks for. `vision.center_crop: true`
restores the tower config's resize + crop.

The transformers backend (SigLIP) preprocesses as SigLIP's image processor does: a bicubic PIL
resize to the input size, x / 255, then (x - mean) / std with 0.5 / 0.5 by default. With
`vision.anyres_max` every image becomes [1 + tiles, 3, H, W] (encoders/anyres.py), each view
through the same per-view transform.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from mmdlm.encoders.anyres import AnyresGrid
from mmdlm.encoders.tower import VisionTower

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def siglip_transform(size: tuple[int, int], mean, std) -> Callable[[Image.Image], torch.Tensor]:
    """Return PIL image -> [3, H, W]: bicubic resize, x / 255 in float64 cast to float32, then (x - mean) / std."""
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def apply(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, H, W] uint8
        # transformers' rescale multiplies in float64 and casts: the same rounding, bit for bit
        return ((pixels.double() * (1 / 255)).float() - mean_t) / std_t

    return apply


def anyres_grid(tower: VisionTower) -> AnyresGrid | None:
    """Return the tiling of this tower's images, or None when an image is one view."""
    cfg = tower.cfg
    if not cfg.anyres_max:
        return None
    side = tower.input_size[0]
    per_side = round(tower.num_tokens**0.5)
    if per_side * per_side != tower.num_tokens or tower.input_size[0] != tower.input_size[1]:
        raise ValueError(f"vision.anyres_max needs a square input and a square patch grid, got {tower.input_size} "
                         f"and {tower.num_tokens} tokens")
    return AnyresGrid(side, tuple(tuple(p) for p in cfg.grid_pinpoints), cfg.anyres_max, per_side)


def image_transform(tower: VisionTower) -> Callable[[Image.Image], torch.Tensor]:
    """Return PIL image -> FloatTensor [3, H, W] for this tower (evaluation transform); [V, 3, H, W] with anyres."""
    view = _view_transform(tower)
    grid = anyres_grid(tower)
    if grid is None:
        return view

    def tiles(image: Image.Image) -> torch.Tensor:
        return torch.stack([view(tile) for tile in grid.tiles(image.convert("RGB"))])  # [1 + tiles, 3, H, W]

    return tiles


def _view_transform(tower: VisionTower) -> Callable[[Image.Image], torch.Tensor]:
    cfg = tower.cfg
    if cfg.backend == "transformers":
        return siglip_transform(tower.input_size, cfg.image_mean or SIGLIP_MEAN, cfg.image_std or SIGLIP_STD)
    if cfg.backend == "timm":
        from timm.data import create_transform, resolve_model_data_config

        data = resolve_model_data_config(tower.backbone)
        data["input_size"] = (3, *tower.input_size)
        if not cfg.center_crop:
            data.update(crop_pct=1.0, crop_mode="squash")
        transform = create_transform(**data, is_training=False)
    else:
        from open_clip import image_transform as clip_transform

        pre = tower.backbone.preprocess_cfg
        transform = clip_transform(
            tower.input_size, is_train=False, mean=pre["mean"], std=pre["std"],
            resize_mode=pre["resize_mode"] if cfg.center_crop else "squash", interpolation=pre["interpolation"],
        )

    def apply(image: Image.Image) -> torch.Tensor:
        return transform(image.convert("RGB"))

    return apply
