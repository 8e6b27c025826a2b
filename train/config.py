"""Training configuration: one dataclass tree, filled from configs/train/*.yaml and `--set` overrides.

Stages (align, pretrain, sft, finetune) are YAML files over this one schema, not code branches:
they differ in data, in which modules train (`trainable`) and in where the weights start. The
model config is a section of it: `model: configs/model/tiny.yaml` reads that file, and
`--set model.lm.hidden_size=32` changes one of its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from mmdlm.config import ConfigError, check_choices, load_config, load_yaml
from mmdlm.data.collate import SftPadding
from mmdlm.data.errors import OnError
from mmdlm.diffusion import Schedule
from mmdlm.multimodal import ModelConfig

Module = Literal["vision", "projector", "lm"]
MODULES = get_args(Module)


@dataclass
class DataConfig:
    json: list[str] = field(default_factory=list)  # LLaVA JSON files (conversations: SFT)
    fractions: list[float] = field(default_factory=list)  # per JSON file: train on a seeded subset ([] = all)
    image_folder: str | None = None  # None: each JSON's own folder
    shards: str | None = None  # webdataset shards, brace pattern or folder (documents: pretraining)
    tokenizer: str = "runs/demo/world/tokenizer"  # local folder; an init_from folder's own tokenizer wins
    max_length: int = 128
    num_workers: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False  # shards sampled with replacement (very large corpora, many nodes)
    log_sample_ids: bool = False  # write <output_dir>/samples/rank<r>.jsonl: the ids of every micro-batch
    # SFT padding after each answer: "eos" = LLaDA's EOS runs, attended and targets; "mask" = one EOS
    # target, then mask tokens that are attended but never targets (see data/collate.py).
    sft_padding: SftPadding = "eos"
    # Batches by data file: each epoch's order is cut into groups of this many samples, each ordered by
    # file, so a batch mostly holds one file's rows (short VQA rows are not padded to a caption's
    # length) in random order (train/loader.py). 0 = off.
    group_by_file: int = 0
    # Answer words the tokenizer splits into 3+ pieces become tokens of their own (train/build.py:
    # add_answer_tokens): for small tokenizers, like the demo's, fine-tuned on new words.
    answer_tokens: bool = False
    on_error: OnError = "stop"  # a broken JSON entry: stop (with its name) or skip (one warning line, counted)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    # Learning-rate multiplier per top-level module; LLaDA-V trains the tower at a fifth of the LM's.
    lr_multipliers: dict[str, float] = field(default_factory=lambda: {"vision": 0.2})


@dataclass
class LoraConfig:
    r: int = 0  # 0 = no LoRA (full fine-tuning of the `trainable` modules)
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    # A new model: a model YAML (configs/model/*.yaml) or its content; `--set model.lm.hidden_size=32`
    # changes one field. Unused with init_from, which rebuilds the saved model from its config.json.
    model: ModelConfig | None = None
    init_from: str | None = None  # a saved model folder to start from (align -> sft, finetune)
    trainable: list[Module] = field(default_factory=lambda: ["projector", "lm"])
    objective: Literal["diffusion", "autoregressive"] = "diffusion"  # autoregressive: the causal twin
    # The tower's weights from another run's model folder (the tower-pretraining stage): every
    # `vision.*` tensor of its safetensors replaces the new model's.
    init_vision_from: str | None = None
    # "ratio": t ~ U(eps, 1], each token masked with probability t, weight 1/t (LLaDA's training);
    # "count": l ~ U{1..L} tokens masked, weight L/l (LLaDA's eq. 6; lower variance on short answers).
    mask_schedule: Schedule = "ratio"
    # Autoregressive help for the diffusion model, on the same weights with causal attention:
    # the first `ar_warmup_steps` steps train next-token prediction only (Dimple's AR-then-diffusion),
    # and `ar_loss_weight` > 0 adds that loss to every diffusion step (joint AR + diffusion).
    ar_warmup_steps: int = 0
    ar_loss_weight: float = 0.0
    # With model.lm.shift_logits and prefix_dlm: w x the cross-entropy of each answer's first token at
    # the prompt's last position, in every row of a diffusion step (it never sees the answer, so it is
    # a next-token loss from the same forward); the diffusion loss scores it only where it is masked.
    first_token_weight: float = 0.0
    complementary_masking: bool = False
    # Prefix-DLM attention (image + prompt never attend to the answer): makes the sampler's prefix
    # KV cache exact at inference. Stored in the exported model's config.
    prefix_dlm: bool = False
    mask_eps: float = 1e-3
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: str = "configs/deepspeed/zero2.json"  # ZeRO settings; numbers come from this config
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    micro_batch_size: int = 16  # per rank
    grad_accum: int = 1
    max_steps: int = 300  # optimizer steps
    save_every: int = 100  # resumable checkpoint every N optimizer steps (0 = only at the end)
    keep_checkpoints: int = 2
    activation_checkpointing: bool = False
    # Keep a frozen tower's outputs in memory (encoders/cache.py), up to this many GiB, so each image
    # goes through the tower once per run; needs "vision" out of `trainable`, and ZeRO stage < 3.
    tower_cache_gb: float = 0.0
    # With tower_cache_gb (unused without): a folder where the memo is kept between runs (one file per
    # tower and rank), loaded at the start and written at the end, so a later stage on the same frozen
    # tower starts warm.
    tower_cache_dir: str | None = None
    compile: bool = False  # torch.compile each LM block (GPU: fuses elementwise kernels; first steps compile)
    output_dir: str = "runs/train"
    export_dir: str | None = None  # default: <output_dir>/model
    seed: int = 0
    log_every: int = 1  # metrics line every N optimizer steps
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix when the config cannot run."""
        check_choices(self)
        unknown = set(self.optim.lr_multipliers) - set(MODULES)
        if unknown:
            raise ConfigError(f"optim.lr_multipliers: unknown modules {sorted(unknown)} (of {list(MODULES)})")
        if self.data.fractions and (len(self.data.fractions) != len(self.data.json)
                                    or not all(0 < f <= 1 for f in self.data.fractions)):
            raise ConfigError(f"data.fractions={self.data.fractions} needs one number in (0, 1] per data.json file "
                              f"({len(self.data.json)} given); --set data.fractions=[] uses every file whole")
        if self.ar_warmup_steps < 0 or self.ar_loss_weight < 0 or self.first_token_weight < 0:
            raise ConfigError("ar_warmup_steps, ar_loss_weight and first_token_weight must be >= 0")
        if (self.ar_warmup_steps or self.ar_loss_weight) and self.objective != "diffusion":
            raise ConfigError("ar_warmup_steps / ar_loss_weight help a diffusion model: they need objective=diffusion")
        if bool(self.data.json) == bool(self.data.shards):
            raise ConfigError("set exactly one of data.json (conversations) or data.shards (documents)")
        if self.data.group_by_file < 0 or (self.data.group_by_file and self.data.shards):
            raise ConfigError(f"data.group_by_file={self.data.group_by_file} must be >= 0 and groups data.json "
                              "files only (shards stream in order)")
        if self.tower_cache_gb < 0 or (self.tower_cache_gb and "vision" in self.trainable):
            raise ConfigError(f"tower_cache_gb={self.tower_cache_gb} caches a frozen tower's outputs: it must be >= 0, "
                              "and 0 while 'vision' is in trainable")
        if self.data.answer_tokens and not self.data.json:
            raise ConfigError("data.answer_tokens reads the answers of data.json conversations: set data.json")
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every", "max_nonfinite", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.save_every < 0 or self.lora.r < 0:
            raise ConfigError("save_every and lora.r must be >= 0")
        if not Path(self.deepspeed).is_file():
            raise ConfigError(f"deepspeed={self.deepspeed!r}: file not found (see configs/deepspeed/*.json)")
        if self.init_from is None and self.model is None:
            raise ConfigError("no model: set model (a configs/model/*.yaml, e.g. model: configs/model/tiny.yaml) "
                              "or init_from (a saved model folder)")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Return the TrainConfig of a YAML file and `--set` overrides, refusing model changes a run would ignore."""
    overrides = list(overrides or [])
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    if "model_overrides" in keys or (path is not None and "model_overrides" in load_yaml(path)):
        raise ConfigError("model_overrides is gone: set a model field directly, e.g. --set model.lm.hidden_size=32 "
                          "(in YAML: model: {base: configs/model/tiny.yaml, lm: {hidden_size: 32}})")
    cfg = load_config(TrainConfig, path, overrides)
    changed = [key for key in keys if key.startswith("model.")]
    if cfg.init_from is not None and changed:
        raise ConfigError(f"--set {changed[0]} changes the model config, but init_from={cfg.init_from!r} builds the "
                          "model from its own config.json: drop one of them")
    return cfg
