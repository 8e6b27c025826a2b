"""Vision towers from timm or open_clip, returning patch features [N, T, C] of a chosen layer.

One code path with a backend switch: both libraries expose `forward_intermediates`, so the tower
asks for the wanted layer (LLaVA takes the penultimate one) and prunes the layers after it, which
keeps unused parameters out of the optimizer and out of ZeRO's bookkeeping. Weights come only
from a local file (`vision.weights`); building never touches the network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class VisionConfig:
    backend: str = "timm"  # "timm" | "open_clip"
    model: str = "resnet18"  # a timm model name or an open_clip model name
    image_size: int | None = None  # None: the model's own size
    overrides: dict[str, Any] = field(default_factory=dict)  # constructor kwargs (depth, width, vision_cfg...)
    feature_layer: int = -2  # index into the model's intermediates; -2 = penultimate (LLaVA)
    use_cls: bool = False  # keep prefix (class/register) tokens in front of the patch tokens
    frozen: bool = False
    weights: str | None = None  # local checkpoint file; None = random init

    def validate(self) -> None:
        if self.backend not in ("timm", "open_clip"):
            raise ValueError(f"vision.backend={self.backend!r} must be 'timm' or 'open_clip'")
        if self.weights is not None and not Path(self.weights).is_file():
            raise FileNotFoundError(
                f"vision.weights={self.weights!r} is not a file: set vision.weights to a local checkpoint "
                "(this project never downloads weights) or to null for random init"
            )


def _create(cfg: VisionConfig) -> nn.Module:
    """Return the backbone module (for open_clip: its visual tower)."""
    if cfg.backend == "timm":
        import timm

        kwargs = dict(cfg.overrides)
        if cfg.image_size is not None:
            kwargs.setdefault("img_size", cfg.image_size) if _takes_img_size(cfg.model) else None
        if cfg.weights:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=cfg.weights))
        return timm.create_model(cfg.model, num_classes=0, **kwargs)
    import open_clip

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "no pretrained weights" noise
    kwargs = dict(cfg.overrides)
    if cfg.image_size is not None:
        kwargs["force_image_size"] = cfg.image_size
    return open_clip.create_model(cfg.model, pretrained=cfg.weights, **kwargs).visual


def _takes_img_size(name: str) -> bool:
    # Transformers take img_size (position embeddings are sized by it); CNNs take any size as is.
    return any(key in name for key in ("vit", "deit", "eva", "siglip", "swin", "beit"))


class VisionTower(nn.Module):
    """Backbone + layer selection: pixel_values [N, 3, H, W] -> features [N, T, C]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = _create(cfg)
        if hasattr(self.backbone, "prune_intermediate_layers"):
            # The final norm only serves the pooled head: intermediates are taken before it (LLaVA's
            # hidden_states[-2]), so it is pruned with the head and the later blocks.
            kept = self.backbone.prune_intermediate_layers([cfg.feature_layer], prune_norm=True, prune_head=True)
            self.layer = kept[0] if isinstance(kept, (list, tuple)) else cfg.feature_layer
        else:
            self.layer = cfg.feature_layer
        if cfg.frozen:
            self.requires_grad_(False)
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, *self.input_size, device=self._device()))
        self.num_tokens, self.hidden_size = probe.shape[1], probe.shape[2]

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def input_size(self) -> tuple[int, int]:
        if self.cfg.image_size is not None:
            return (self.cfg.image_size, self.cfg.image_size)
        if self.cfg.backend == "timm":
            return tuple(self.backbone.pretrained_cfg["input_size"][1:])
        size = self.backbone.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(next(self.parameters()).dtype)
        if self.cfg.backend == "timm":
            kwargs = {"output_fmt": "NLC"} if _takes_img_size(self.cfg.model) else {}
            if self.cfg.use_cls and kwargs:
                kwargs["return_prefix_tokens"] = True
            out = self.backbone.forward_intermediates(x, indices=[self.layer], intermediates_only=True, **kwargs)[0]
            if isinstance(out, tuple):  # (patch tokens, prefix tokens)
                out = torch.cat([out[1], out[0]], dim=1)
        else:
            result = self.backbone.forward_intermediates(
                x, indices=[self.layer], intermediates_only=True, output_fmt="NLC",
                output_extra_tokens=self.cfg.use_cls,
            )
            out = result["image_intermediates"][0]
            if self.cfg.use_cls and result.get("image_intermediates_prefix"):
                out = torch.cat([result["image_intermediates_prefix"][0], out], dim=1)
        if out.dim() == 4:  # a CNN feature map [N, C, h, w] -> tokens in raster order
            out = out.flatten(2).transpose(1, 2)
        return out  # [N, T, C]
