"""Vision towers from timm, open_clip or transformers, returning patch features [N, T, C] of a chosen layer.

One code path with a backend switch: the libraries build the model from its name or config (plus
size overrides); the tower asks for the wanted layer (LLaVA takes the penultimate one) and prunes
the layers after it, which keeps parameters that would never get a gradient out of the optimizer,
out of ZeRO's bookkeeping and out of DDP's unused-parameter check. Weights come only from a local
file (`vision.weights`) or a converted model folder; building never touches the network.

The `transformers` backend is SigLIP as LLaVA-OneVision and LLaDA-V cut it: `overrides` is the
SiglipVisionConfig (the full tower's), the layers after `feature_layer` are dropped, and so are
the post-layernorm and the pooling head. Its parameter names are those of `SiglipVisionModel`'s
vision transformer, so a LLaVA-family checkpoint loads by swapping a prefix (see mmdlm/llada_v.py).
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmdlm.config import ConfigError, check_choices

HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # names that make timm / open_clip fetch configs or weights


@dataclass
class VisionConfig:
    backend: Literal["timm", "open_clip", "transformers"] = "timm"  # transformers: SigLIP
    # a timm model name (timm.list_models), an open_clip one (open_clip.list_models), or "siglip" (transformers)
    model: str = "resnet18"
    image_size: int | None = None  # None: the model's own input size
    # Constructor overrides. timm: create_model kwargs (depth, embed_dim, patch_size, ...).
    # open_clip: model-config entries, merged key by key (vision_cfg: {layers, width, ...}),
    # or create_model arguments (image_mean, force_preprocess_cfg, ...).
    overrides: dict[str, Any] = field(default_factory=dict)
    feature_layer: int = -2  # index into the model's intermediates; -2 = penultimate (LLaVA)
    use_cls: bool = False  # keep prefix (class/register) tokens in front of the patch tokens
    frozen: bool = False
    weights: str | None = None  # local checkpoint file; None = random init
    # Preprocessing: False resizes the whole image to the input size (SigLIP's own processor;
    # nothing near the border is lost, which VQA needs); True keeps the tower config's eval
    # resize + centre crop (timm crop_pct, open_clip resize_mode).
    center_crop: bool = False
    # Normalisation for the transformers backend (SigLIP's 0.5 / 0.5 when None); timm and open_clip use their own.
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    # Any resolution (encoders/anyres.py): 0 = one view per image; N = LLaVA's anyres_max_N over
    # `grid_pinpoints` ([width, height] pairs, multiples of the input size), merged by projector.merge.
    anyres_max: int = 0
    grid_pinpoints: list[list[int]] = field(default_factory=list)

    def validate(self) -> None:
        check_choices(self, "vision.")
        if self.backend == "transformers" and self.model != "siglip":
            raise ConfigError(f"vision.model={self.model!r}: the transformers backend builds 'siglip' "
                             "(SiglipVisionModel from vision.overrides)")
        if self.anyres_max and not self.grid_pinpoints:
            raise ConfigError(f"vision.anyres_max={self.anyres_max} needs vision.grid_pinpoints "
                              "([width, height] pairs)")
        if self.model.startswith(HUB_PREFIXES):
            raise ConfigError(f"vision.model={self.model!r} names a hub model: this project never downloads; "
                             "set vision.model to a library model name and vision.weights to a local file")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError(
                f"vision.weights={self.weights!r} is not a file: set vision.weights to a local checkpoint "
                "(this project never downloads weights) or to null for random init"
            )


def _merge(base: dict, update: dict) -> dict:
    """Return `base` with `update` merged in, nested dicts key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _create_timm(cfg: VisionConfig) -> nn.Module:
    import timm

    kwargs = dict(cfg.overrides)
    if cfg.weights:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=cfg.weights))
    if cfg.image_size is not None:
        try:  # transformers size their position embeddings by img_size (timm resamples loaded ones)
            return timm.create_model(cfg.model, num_classes=0, img_size=cfg.image_size, **kwargs)
        except TypeError as error:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(error):
                raise
    return timm.create_model(cfg.model, num_classes=0, **kwargs)


def _open_clip_preprocess(name: str) -> dict[str, Any]:
    """Return the preprocessing shared by all of open_clip's pretrained tags of `name` ({} if they differ).

    open_clip attaches mean/std/resize_mode only when weights come from a tag (a download); with
    a local file it falls back to OpenAI CLIP's, which is wrong for SigLIP. The tag registry is
    in the package, so reading it needs no network.
    """
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    keys = ("mean", "std", "interpolation", "resize_mode")
    tags = list_pretrained_tags_by_model(name)
    found = {tuple((k, get_pretrained_cfg(name, tag).get(k)) for k in keys) for tag in tags}
    return {k: v for k, v in next(iter(found)) if v is not None} if len(found) == 1 else {}


def _create_open_clip(cfg: VisionConfig) -> nn.Module:
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ConfigError(f"vision.model={cfg.model!r} is not an open_clip model (see open_clip.list_models())")
    structure = {k: v for k, v in cfg.overrides.items() if k in model_cfg}
    arguments = {k: v for k, v in cfg.overrides.items() if k not in model_cfg}
    merged = _merge(model_cfg, structure)
    if cfg.image_size is not None:  # what force_image_size does, lest a merged vision_cfg undo it
        merged["vision_cfg"]["image_size"] = cfg.image_size
    model_kwargs = {k: merged[k] for k in structure}
    if cfg.weights is None:
        # Only `.visual` is kept: a one-layer text tower saves building (and allocating) the real
        # one, and avoids the network for towers whose text side is a Hugging Face model.
        model_kwargs["text_cfg"] = dict(context_length=2, vocab_size=2, width=64, heads=1, layers=1)
    arguments.setdefault("device", torch.get_default_device())  # it moves the model to "cpu" otherwise, meta included
    preprocess = {**_open_clip_preprocess(cfg.model), **arguments.pop("force_preprocess_cfg", {})}
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # silences its "no pretrained weights loaded" warning
    try:
        model = open_clip.create_model(cfg.model, pretrained=cfg.weights, force_image_size=cfg.image_size,
                                       force_preprocess_cfg=preprocess, **arguments, **model_kwargs)
    finally:
        root.setLevel(level)
    return model.visual


def _create_transformers(cfg: VisionConfig) -> nn.Module:
    """Return SiglipVisionModel with the layers after `feature_layer`, the post-layernorm and the head removed."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**{k: v for k, v in cfg.overrides.items() if k not in ("image_mean", "image_std")})
    if cfg.image_size is not None:
        config.image_size = cfg.image_size
    kept = config.num_hidden_layers + 1 + cfg.feature_layer if cfg.feature_layer < 0 else cfg.feature_layer
    if not 0 < kept <= config.num_hidden_layers:
        raise ValueError(f"vision.feature_layer={cfg.feature_layer} is outside the tower's "
                         f"{config.num_hidden_layers} layers")
    config.num_hidden_layers, config.vision_use_head = kept, False
    model = SiglipVisionModel(config)
    model = getattr(model, "vision_model", model)  # transformers 4 wraps the transformer, 5 does not: same names
    model.post_layernorm = nn.Identity()  # LLaVA takes hidden states, not the normed output
    if cfg.weights:  # a SiglipVisionModel safetensors file: its kept layers load, the rest is left out on purpose
        from safetensors.torch import load_file

        state = {k.removeprefix("vision_model."): v for k, v in load_file(cfg.weights).items()}
        wanted = model.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"vision.weights={cfg.weights!r} lacks {missing[:4]}: not a SiglipVisionModel file "
                             "of this size (vision.overrides)")
        model.load_state_dict({k: state[k] for k in wanted})
    return model


class VisionTower(nn.Module):
    """Backbone + layer selection: pixel_values [N, 3, H, W] -> features [N, T, C]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.backend == "transformers":
            if cfg.use_cls:
                raise ValueError("vision.use_cls=true, but SigLIP has no class token: set vision.use_cls=false")
            self.backbone = _create_transformers(cfg)
            if cfg.frozen:
                self.requires_grad_(False)
            self.num_tokens, self.hidden_size = self._probe()
            return
        self.backbone = _create_timm(cfg) if cfg.backend == "timm" else _create_open_clip(cfg)
        # open_clip wraps timm towers (its SigLIPs) in `.trunk` + an adapter head.
        trunk = getattr(self.backbone, "trunk", self.backbone)
        if not hasattr(trunk, "forward_intermediates"):
            raise ConfigError(f"vision.model={cfg.model!r} has no forward_intermediates in this {cfg.backend} version: "
                             "pick a model that has (ViT, SigLIP, ResNet, ConvNeXt, ...)")
        if cfg.use_cls and cfg.backend == "timm" and \
                "return_prefix_tokens" not in inspect.signature(trunk.forward_intermediates).parameters:
            raise ConfigError(f"vision.use_cls=true, but {cfg.model} has no class token: set vision.use_cls=false")
        self.layer = cfg.feature_layer
        if hasattr(trunk, "prune_intermediate_layers"):
            # Intermediates are taken before the final norm (LLaVA's hidden_states[-2]), so the norm
            # goes with the head and the later blocks.
            self.layer = trunk.prune_intermediate_layers([cfg.feature_layer], prune_norm=True, prune_head=True)[0]
            if trunk is not self.backbone:
                self.backbone.head = nn.Identity()
        if cfg.frozen:
            self.requires_grad_(False)
        self.num_tokens, self.hidden_size = self._probe()

    def _probe(self) -> tuple[int, int]:
        """Return (tokens, width) of one image's features; eval mode so BatchNorm statistics stay put."""
        mode = self.training
        self.eval()
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, *self.input_size, device=next(self.parameters()).device))
        self.train(mode)
        return out.shape[1], out.shape[2]

    @property
    def input_size(self) -> tuple[int, int]:
        if self.cfg.image_size is not None:
            return (self.cfg.image_size, self.cfg.image_size)
        if self.cfg.backend == "transformers":
            side = self.backbone.config.image_size
            return (side, side)
        if self.cfg.backend == "timm":
            return tuple(self.backbone.pretrained_cfg["input_size"][1:])
        size = self.backbone.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(next(self.parameters()).dtype)
        if self.cfg.backend == "transformers":
            return self.backbone(pixel_values=x).last_hidden_state  # [N, T, C] the kept layers' output
        if self.cfg.backend == "timm":
            extra = {"return_prefix_tokens": True} if self.cfg.use_cls else {}
            out = self.backbone.forward_intermediates(x, indices=[self.layer], intermediates_only=True, **extra)[0]
            patches, prefix = out if isinstance(out, tuple) else (out, None)
        else:
            out = self.backbone.forward_intermediates(x, indices=[self.layer], intermediates_only=True,
                                                      output_extra_tokens=self.cfg.use_cls)
            patches, prefix = out["image_intermediates"][0], out.get("image_intermediates_prefix", [None])[0]
        if patches.dim() == 4:  # a feature map [N, C, h, w] -> tokens in raster order
            patches = patches.flatten(2).transpose(1, 2)
        if not self.cfg.use_cls:
            return patches  # [N, T, C]
        if prefix is None or prefix.shape[1] == 0:
            raise ConfigError(f"vision.use_cls=true, but {self.cfg.model} has no class token: set vision.use_cls=false")
        return torch.cat([prefix, patches], dim=1)  # [N, P + T, C]
