"""Image preprocessing taken from the tower's own config, so real weights get their own transform.

Size, mean, std and interpolation come from the library: timm's `resolve_model_data_config`
(the default weights' pretrained config, even for a random init) or open_clip's
`preprocess_cfg` (filled from its pretrained-tag registry by the tower). By default the whole
image is resized to the input size, as SigLIP's own processor does: timm's ImageNet-style 0.9
centre crop would cut off what a question about a corner asks for. `vision.center_crop: true`
restores the tower config's resize + crop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from mmdlm.encoders.tower import VisionTower


def image_transform(tower: VisionTower) -> Callable[[Image.Image], torch.Tensor]:
    """Return PIL image -> FloatTensor [3, H, W] for this tower (evaluation transform)."""
    cfg = tower.cfg
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
