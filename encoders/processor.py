"""Image preprocessing taken from the tower's own config, so real weights get their own transform.

timm: `resolve_model_data_config` (size, mean, std, interpolation, crop_pct); open_clip: the
visual tower's `preprocess_cfg`. When the config overrides the image size (the demo's 64 px
scenes), the whole image is resized without a crop: objects near the border must stay in view.
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
        if cfg.image_size is not None:
            data.update(input_size=(3, *tower.input_size), crop_pct=1.0)
        transform = create_transform(**data, is_training=False)
    else:
        from open_clip import image_transform as clip_transform

        pre = tower.backbone.preprocess_cfg
        transform = clip_transform(
            tower.input_size, is_train=False, mean=pre["mean"], std=pre["std"],
            resize_mode=pre.get("resize_mode"), interpolation=pre.get("interpolation"),
        )

    def apply(image: Image.Image) -> torch.Tensor:
        return transform(image.convert("RGB"))

    return apply
