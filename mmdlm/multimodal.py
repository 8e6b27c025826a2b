"""MMDLM = vision tower + projector + diffusion LM: images become unmasked prefix tokens.

The collator writes each image as a run of `num_image_tokens` copies of the `<image>` id; `embed`
replaces those embeddings, in row-major order, by the projected features of the images in order
of appearance. Everything downstream (loss, sampler, cache) sees only embeddings and ids.

With any-resolution images (`vision.anyres_max`, LLaDA-V) an image's run length depends on its
size: `image_tokens(size)` gives it, `pixel_values` holds every image's views one after another
and `image_sizes` [N, 2] (width, height) says which views belong to which image.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from mmdlm.cache import KVCache
from mmdlm.config import ConfigError, from_dict, load_yaml
from mmdlm.encoders.cache import TowerCache
from mmdlm.encoders.processor import anyres_grid, image_transform
from mmdlm.encoders.projector import Projector, ProjectorConfig
from mmdlm.encoders.tower import VisionConfig, VisionTower
from mmdlm.files import ReadableWeights
from mmdlm.model import DiffusionLM, DLMConfig, LMConfig


class MMDLMConfig(PretrainedConfig):
    """The three parts as plain dicts (VisionConfig, ProjectorConfig, DLMConfig fields), so config.json rebuilds all."""

    model_type = "mmdlm"

    def __init__(self, vision: dict | None = None, projector: dict | None = None, lm: dict | None = None,
                 image_token_id: int = 0, prefix_dlm: bool = False, sampler: dict | None = None,
                 system_prompt: str | None = None, image_position: str = "before", **kwargs):
        self.vision = dict(vision or {})
        self.prefix_dlm = prefix_dlm  # trained with prefix-DLM attention: the sampler's prefix cache is exact
        self.projector = dict(projector or {})
        self.lm = dict(lm or {})
        self.image_token_id = image_token_id
        # What the model's makers sample with (SamplerConfig fields, e.g. LLaDA-V's suppress_ids) and
        # prompt with (a system turn before the conversation); infer.py starts from these.
        self.sampler = dict(sampler or {})
        self.system_prompt = system_prompt
        # Where a question's image goes when a request gives no '<image>': "before" the text (LLaVA) or
        # "after" it; training records what its data did (train/build.py).
        self.image_position = image_position
        super().__init__(**kwargs)


# What other model folders are, and what to do with them instead of loading them as a vision-language model.
OTHER_MODEL_TYPES = {
    "llava_llada": "an original LLaDA-V checkpoint: convert it with mmdlm-convert-llada-v first",
    "llada": "an original LLaDA checkpoint: convert it with mmdlm-convert-llada, then use it as model.lm_path",
    "mmdlm_lm": "a language model alone: sample it with mmdlm.sampling.generate (README: Sampling from the "
                "language model), or train a vision-language model on it with model.lm_path",
}


def check_model_type(folder: Path) -> None:
    """Raise ConfigError saying what `folder` is when its config.json is not an mmdlm vision-language model's."""
    try:
        kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"{folder / 'config.json'}: not a readable model config ({error})") from error
    if kind != MMDLMConfig.model_type:
        what = OTHER_MODEL_TYPES.get(kind, "not an mmdlm model folder: give the folder training exported")
        raise ConfigError(f"{folder}: model_type {kind!r} is {what}")


class MMDLM(ReadableWeights, PreTrainedModel):
    """Vision tower -> projector -> diffusion LM; forward returns logits [B, L, V]."""

    config_class = MMDLMConfig
    base_model_prefix = "mmdlm"
    supports_gradient_checkpointing = True

    def __init__(self, config: MMDLMConfig, lm: DiffusionLM | None = None):
        super().__init__(config)
        self.vision = VisionTower(from_dict(VisionConfig, config.vision, "vision"))
        self.lm = lm if lm is not None else DiffusionLM(DLMConfig(**config.lm))
        projector = from_dict(ProjectorConfig, config.projector, "projector")
        self.projector = Projector(projector, self.vision.hidden_size, self.lm.config.hidden_size,
                                   self.vision.num_tokens)
        self.num_image_tokens = self.projector.num_tokens(self.vision.num_tokens)
        self.anyres = anyres_grid(self.vision)  # None: every image is one view of num_image_tokens tokens
        self.tower_cache: TowerCache | None = None  # training with a frozen tower may set one (tower_cache_gb)
        if (self.anyres is None) != (projector.merge == "flat"):
            raise ValueError("vision.anyres_max and projector.merge=spatial_unpad go together: set both or neither")

    def _init_weights(self, module) -> None:  # each part initialises itself (timm, open_clip, DiffusionLM)
        pass

    def train(self, mode: bool = True) -> MMDLM:
        super().train(mode)
        if not any(p.requires_grad for p in self.vision.parameters()):
            # A frozen tower must stay frozen whole: BatchNorm statistics and dropout included.
            self.vision.eval()
        return self

    def image_transform(self):
        """Return the tower's preprocessing: PIL image -> FloatTensor [3, H, W]."""
        return image_transform(self.vision)

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Return the length of the `<image>` run of an image of `size` (width, height)."""
        return self.num_image_tokens if self.anyres is None else self.anyres.num_tokens(tuple(size))

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Return projected image tokens [N, num_image_tokens, D] for pixel_values [N, 3, H, W].

        Any resolution: pixel_values [sum of views, 3, H, W] and image_sizes [N, 2] give the merged
        tokens of all images one after another, [sum of image_tokens(size), D].

        In training, N = 0 (a text-only batch) still runs the tower and projector, on one blank
        image, and returns an empty slice of that output: every rank runs and gathers the same
        modules each step (ZeRO-3 gathers each module's weights collectively, ZeRO-2 / DDP reduce
        every gradient, so a rank that skipped the tower would hang or mismatch the others), and the
        tower's weights get zero gradients instead of none. LLaVA's fix, in one place.
        """
        if pixel_values.shape[0] == 0 and self.training:
            blank = torch.zeros(1, 3, *self.vision.input_size, device=pixel_values.device, dtype=self.dtype)
            tower_training = self.vision.training
            self.vision.eval()  # the blank image must not move BatchNorm's running statistics
            try:  # with any resolution the newline too, so that every parameter runs every step
                touch = None if self.anyres is None else lambda tokens, newline: tokens + 0.0 * newline
                return self.projector(self.vision(blank), touch)[:0]  # [0, T, D], still in the autograd graph
            finally:
                self.vision.train(tower_training)
        tower = self.vision if self.tower_cache is None else lambda pixels: self.tower_cache(self.vision, pixels)
        if self.anyres is None:
            return self.projector(tower(pixel_values))  # [N, T, D]
        if image_sizes is None:
            raise ValueError("any-resolution images need image_sizes [N, 2] (width, height) beside pixel_values")
        sizes = [tuple(size) for size in image_sizes.tolist()]
        views = [self.anyres.num_crops(size) for size in sizes]
        if sum(views) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views, the image sizes call for {views}")

        def merge(features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:  # [views, T, D] -> [sum runs, D]
            parts = features.split(views)
            return torch.cat([self.anyres.merge(part, size, newline) for part, size in zip(parts, sizes)])

        return self.projector(tower(pixel_values), merge)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Return inputs_embeds [B, L, D]: token embeddings with every `<image>` run replaced by image features.

        Runs are filled in row-major order, one image per `num_image_tokens` ids (per image_tokens(size)
        with any resolution), so adjacent images may form one longer run. `image_features` (from
        encode_images) skips the tower.
        """
        is_image = input_ids == self.config.image_token_id  # [B, L]
        if image_features is None and pixel_values is None and self.training:
            pixel_values = torch.zeros(0, 3, *self.vision.input_size, device=input_ids.device)  # text only
        if image_features is None and pixel_values is not None and (pixel_values.shape[0] or self.training):
            image_features = self.encode_images(pixel_values, image_sizes)  # the tower first, on every batch
        if image_features is None or image_features.shape[0] == 0:
            counts = []
        elif image_features.dim() == 2:  # any resolution: merged tokens of all images, [sum T, D]
            counts = ([self.image_tokens(s) for s in image_sizes.tolist()] if image_sizes is not None
                      else [image_features.shape[0]])
        else:
            counts = [image_features.shape[1]] * image_features.shape[0]
        self._check_runs(is_image, counts)
        embeds = self.lm.get_input_embeddings()(input_ids)  # [B, L, D]
        if image_features is None:
            return embeds
        return embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))

    def _check_runs(self, is_image: torch.Tensor, counts: list[int]) -> None:
        """Raise ValueError unless the `<image>` runs are the images' runs (`counts` ids each) in order."""
        flat = torch.nn.functional.pad(is_image, (1, 1)).flatten().int()  # a False on each side of every row
        edges = flat.diff().nonzero().flatten().tolist()  # alternating run starts and ends, row-major
        lengths = [end - start for start, end in zip(edges[::2], edges[1::2])]
        fits, k = sum(lengths) == sum(counts), 0
        for length in lengths if fits else []:  # each run is whole images, consecutive ones
            while length > 0 and k < len(counts):
                length, k = length - counts[k], k + 1
            fits = fits and length == 0
        if not fits:
            shown = lengths[:8] + (["..."] if len(lengths) > 8 else [])
            wanted = counts[:8] + (["..."] if len(counts) > 8 else [])
            each = f" of {wanted} tokens" if len(set(counts)) > 1 else f" x {counts[0]} tokens each" if counts else ""
            raise ValueError(
                f"{len(lengths)} <image> runs of lengths {shown} ({sum(lengths)} tokens), but {len(counts)} images"
                f"{each}: expand every <image> to its image's run (model.image_tokens) and pass one image per "
                "placeholder"
            )

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, prefix_len: torch.Tensor | int | None = None,
                image_features: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int = 0, fill_cache: bool = False,
                causal: bool | None = None, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits [B, L, V]; see DiffusionLM.forward for masks, prefix-DLM, the cache and `causal`."""
        embeds = self.embed(input_ids, pixel_values, image_features, image_sizes)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, prefix_len=prefix_len,
                       position_ids=position_ids, cache=cache, start=start, fill_cache=fill_cache, causal=causal)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *_: Any, dtype: torch.dtype | str | None = None,
                        torch_dtype: torch.dtype | str | None = None, **__: Any) -> MMDLM:
        """Return the model saved in `folder` by save_pretrained, in the saved dtype unless `dtype` is given
        (a torch dtype or its name; "auto" or None keep the saved one; `torch_dtype` is transformers' older name).

        Overridden because the generic loader initialises on the meta device, which leaves the
        non-persistent buffers of timm/open_clip towers empty. The tower is rebuilt from its
        config (random init, offline); the LM, which has no buffers, is built on the meta device
        so that billions of weights are not initialised only to be overwritten.
        """
        folder = Path(folder)
        weights = sorted(folder.glob("model*.safetensors"))
        if not (folder / "config.json").is_file() or not weights:
            raise ConfigError(f"{folder}: not a model folder (needs config.json and model*.safetensors)")
        check_model_type(folder)
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype, dtype)
        if dtype is not None and dtype != "auto" and not isinstance(dtype, torch.dtype):
            raise ConfigError(f"dtype={dtype!r}: give a torch dtype (torch.bfloat16), its name or 'auto'")
        dtype = None if dtype == "auto" else dtype
        config = MMDLMConfig.from_pretrained(folder)
        config.vision["weights"] = None  # the folder's own weights replace the tower's original file
        with torch.device("meta"):
            lm = DiffusionLM(DLMConfig(**config.lm))
        model = cls(config, lm=lm)
        state: dict[str, torch.Tensor] = {}
        for f in weights:
            state.update(load_file(str(f)))
        tied = model.lm.config.tie_word_embeddings
        if tied:
            state.setdefault("lm.lm_head.weight", state.get("lm.embed_tokens.weight"))
        model.load_state_dict(state, strict=True, assign=True)
        if tied:
            model.lm.tie_weights()
        if dtype is not None:
            model.to(dtype)
        return model.eval()


@dataclasses.dataclass
class ModelConfig:
    """configs/model/*.yaml: the three parts, and optional local weights for the LM."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    lm_path: str | None = None  # a converted LLaDA folder (mmdlm-convert-llada) or any DiffusionLM folder


LM_KEYS = frozenset(f.name for f in dataclasses.fields(LMConfig))


def build_model(spec: str | Path | dict | ModelConfig, vocab_size: int | None = None,
                image_token_id: int | None = None, mask_token_id: int | None = None) -> MMDLM:
    """Return a new MMDLM from a model YAML (or its dict); tokenizer sizes and ids override the config's.

    With `lm_path` the LM is loaded from that folder (its embeddings grown if the tokenizer is
    larger); otherwise it is built from the `lm` sizes with random init.
    """
    where = str(spec)[:80] if isinstance(spec, (str, Path)) else "model config"
    if not isinstance(spec, ModelConfig):
        spec = from_dict(ModelConfig, spec if isinstance(spec, dict) else load_yaml(spec), where)
    lm = None
    if spec.lm_path:
        if not (Path(spec.lm_path) / "config.json").is_file():
            raise ConfigError(f"lm_path={spec.lm_path!r} is not a model folder: convert LLaDA first "
                                    "(mmdlm-convert-llada SRC DST) and set lm_path to DST")
        lm = DiffusionLM.from_pretrained(spec.lm_path)
        if vocab_size is not None and vocab_size > lm.config.vocab_size:
            lm.resize_token_embeddings(vocab_size)
        if mask_token_id is not None:
            lm.config.mask_token_id = mask_token_id
        lm_cfg = {k: v for k, v in lm.config.to_dict().items() if k in LM_KEYS}
        differ = {k: (v, lm_cfg.get(k)) for k, v in spec.lm.given().items()
                  if k not in ("vocab_size", "mask_token_id") and lm_cfg.get(k) != v}
        if differ:
            raise ConfigError(f"{where}: lm sizes disagree with lm_path={spec.lm_path!r} "
                              f"(yaml, folder): {differ}; drop them from lm or fix them")
    else:
        lm_cfg = spec.lm.given()
        if vocab_size is not None:
            lm_cfg["vocab_size"] = vocab_size
        if mask_token_id is not None:
            lm_cfg["mask_token_id"] = mask_token_id
        lm_cfg.setdefault("vocab_size", DLMConfig().vocab_size)
    vocab = lm_cfg["vocab_size"]
    image_token_id = vocab - 1 if image_token_id is None else image_token_id
    if not 0 <= image_token_id < vocab:
        raise ConfigError(f"{where}: image_token_id={image_token_id} is outside the LM vocabulary of {vocab}")
    config = MMDLMConfig(vision=dataclasses.asdict(spec.vision), projector=dataclasses.asdict(spec.projector),
                         lm=lm_cfg, image_token_id=image_token_id)
    return MMDLM(config, lm=lm)


def describe(model: MMDLM) -> str:
    """Return a one-line summary: parameters per part and image tokens."""
    def count(m):
        return sum(p.numel() for p in m.parameters())
    return json.dumps({"vision": count(model.vision), "projector": count(model.projector), "lm": count(model.lm),
                       "image_tokens": model.num_image_tokens})


AutoConfig.register(MMDLMConfig.model_type, MMDLMConfig)
AutoModel.register(MMDLMConfig, MMDLM)
