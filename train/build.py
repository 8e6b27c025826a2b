"""What a run is made of: tokenizer and model (frozen parts, LoRA), optimizer groups, schedule, DeepSpeed config.

Freezing happens here, before `deepspeed.initialize`, and only trainable parameters reach the
optimizer: ZeRO-3 then partitions frozen weights like any other but never gives them gradient or
optimizer state (LLaVA-family code that freezes after wrapping is what breaks under ZeRO-3).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import torch

from mmdlm.config import ConfigError
from mmdlm.data.llava import read_json_list
from mmdlm.data.template import ROLES, image_position_of
from mmdlm.data.tokenizer import load_tokenizer, special_ids
from mmdlm.multimodal import MMDLM, build_model
from mmdlm.train.config import MODULES, TrainConfig


def read_conversations(cfg: TrainConfig) -> list[list[dict]]:
    """Return the conversations of every data.json file (what `build` reads of the data), [] for shards."""
    return [entry.get("conversations") or [] for path in cfg.data.json for entry in read_json_list(Path(path))
            if isinstance(entry, dict)]


def build(cfg: TrainConfig, conversations: list[list[dict]] | None = None):
    """Return (tokenizer, model in train mode): a saved folder when init_from is set, else the model YAML.

    With the training `conversations`, the model records where they put images (image_position)
    and, with data.answer_tokens, the tokenizer gains their long answer words.
    """
    if cfg.init_from and not (Path(cfg.init_from) / "config.json").is_file():
        relative = "" if Path(cfg.init_from).is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"init_from={cfg.init_from}{relative} is not a model folder (no config.json): give the "
                          "folder a training run exported or mmdlm-convert-* wrote")
    has_own_tokenizer = cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").is_file()
    if cfg.init_from and not has_own_tokenizer:
        print(f"note: init_from={cfg.init_from} has no tokenizer.json; using data.tokenizer={cfg.data.tokenizer}",
              file=sys.stderr, flush=True)
    tokenizer = load_tokenizer(cfg.init_from if has_own_tokenizer else cfg.data.tokenizer)
    ids = special_ids(tokenizer)
    if cfg.init_from:
        model = MMDLM.from_pretrained(cfg.init_from)
        saved = {p.dtype for p in model.parameters() if p.dtype != torch.float32}
        if saved and not use_bf16(cfg):  # fp32 training keeps fp32 weights: a 1e-5 step rounds away in bf16
            print(f"note: init_from holds {', '.join(sorted(map(str, saved)))} weights; precision={cfg.precision} "
                  "trains in fp32 here, so they are cast to float32", file=sys.stderr, flush=True)
            model.float()
    else:
        model = build_model(cfg.model, vocab_size=max(len(tokenizer), cfg.model.lm.vocab_size or 0),
                            image_token_id=ids.image, mask_token_id=ids.mask)
    if cfg.init_vision_from:
        load_vision(model.vision, Path(cfg.init_vision_from))
    if conversations:  # infer.py puts a question's image where this data does
        model.config.image_position = image_position_of(conversations)
        # Trained with masks after the answer's EOS, the model has never seen anything else there: the
        # sampler then leaves the positions after a stop token masked (SamplerConfig.mask_tail).
        model.config.sampler = {**(getattr(model.config, "sampler", None) or {}),
                                "mask_tail": cfg.data.sft_padding == "mask"}
    added = add_answer_tokens(tokenizer, model.lm, conversations) if conversations and cfg.data.answer_tokens else []
    if len(tokenizer) > model.lm.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, the model only {model.lm.config.vocab_size}: "
                          "use the tokenizer the model was trained with (data.tokenizer)")
    if (cfg.objective == "autoregressive") != (model.lm.config.attention == "causal"):
        raise ConfigError("objective=autoregressive needs lm.attention=causal (and diffusion needs bidirectional)")
    model.config.image_token_id = ids.image
    model.config.prefix_dlm = cfg.prefix_dlm or bool(getattr(model.config, "prefix_dlm", False))
    if model.lm.config.prefix_attention == "causal" and not model.config.prefix_dlm:
        raise ConfigError("model.lm.prefix_attention=causal shapes prefix-DLM attention: set prefix_dlm: true")
    model.lm.config.mask_token_id = ids.mask
    for name in MODULES:
        getattr(model, name).requires_grad_(name in cfg.trainable)
    if cfg.activation_checkpointing:
        model.lm.set_activation_checkpointing(True)
    if cfg.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules))
        model.lm = get_peft_model(model.lm, lora)  # freezes the LM except the adapters
        if added:  # new token rows must learn: the embedding tables train beside the adapters
            for table in (model.lm.get_input_embeddings(), model.lm.get_output_embeddings()):
                table.requires_grad_(True)
    if cfg.compile:
        (model.lm.get_base_model() if cfg.lora.r > 0 else model.lm).compile_blocks()
    return tokenizer, model.train()


MAX_ANSWER_TOKENS = 1000
MIN_PIECES = 3


def add_answer_tokens(tokenizer, lm, conversations: list[list[dict]]) -> list[str]:
    """Make each answer word that the tokenizer splits into MIN_PIECES or more pieces a token of its own; return them.

    Why: a small tokenizer (the demo's knows ~40 words) spells an unseen answer in 3-9 pieces, often
    single letters every answer shares; a short fine-tune then learns the pieces' order too weakly,
    and parallel decoding mixes pieces of two words ("speckless", "ringss"). One token per answer word
    makes the answer one choice among the set's words. A new row starts at the mean of its pieces'
    rows (input and output embeddings), so the model's first guess is what it knew of the word; the
    table grows only when the tokenizer outgrows it. Large tokenizers (LLaDA's 126k) split few words
    this much: the option then adds little or nothing.
    """
    words = sorted({word for turns in conversations for turn in turns
                    if isinstance(turn, dict) and ROLES.get(turn.get("from")) == "assistant"
                    for word in str(turn.get("value", "")).split()})
    pieces = {word: tokenizer.encode(word, add_special_tokens=False) for word in words}
    new = [word for word in words if len(pieces[word]) >= MIN_PIECES and word not in tokenizer.get_vocab()]
    if len(new) > MAX_ANSWER_TOKENS:
        raise ConfigError(f"data.answer_tokens would add {len(new)} tokens (answer words of {MIN_PIECES}+ pieces; "
                          f"at most {MAX_ANSWER_TOKENS}): free-form answers need the tokenizer as it is, set it false")
    if not new:
        return []
    tokenizer.add_tokens(new)
    if len(tokenizer) > lm.config.vocab_size:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for table in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
            for word in new:
                table[tokenizer.convert_tokens_to_ids(word)] = table[pieces[word]].mean(0)
    return new


def load_vision(tower: torch.nn.Module, folder: Path) -> None:
    """Replace the tower's weights by the `vision.*` tensors of `folder`'s safetensors (all of them, or an error)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"init_vision_from={str(folder)!r} holds no *.safetensors: give the model folder that "
                          "a tower-pretraining run (or any training run) exported")
    state = {}
    for f in files:
        state.update({k.removeprefix("vision."): v for k, v in load_file(str(f)).items() if k.startswith("vision.")})
    own = tower.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"init_vision_from={str(folder)!r}: its tower does not fit the model's vision config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]})")
    tower.load_state_dict(state)


def param_groups(model: MMDLM, cfg: TrainConfig) -> list[dict]:
    """Return optimizer groups of trainable parameters, one per top-level module with its lr multiplier."""
    groups = []
    for name in MODULES:
        params = [p for p in getattr(model, name).parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": cfg.optim.lr * cfg.optim.lr_multipliers.get(name, 1.0),
                           "name": name})
    if not groups:
        raise ConfigError(f"nothing to train: trainable={cfg.trainable} and lora.r=0")
    return groups


def lr_lambda(cfg: TrainConfig):
    """Return step -> lr factor: linear warmup, then cosine down to min_lr_ratio at max_steps."""
    def factor(step: int) -> float:
        if step < cfg.optim.warmup_steps:
            return (step + 1) / cfg.optim.warmup_steps
        progress = (step - cfg.optim.warmup_steps) / max(1, cfg.max_steps - cfg.optim.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * cosine
    return factor


def use_bf16(cfg: TrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """Return the DeepSpeed config: the stage file plus concrete numbers from the training config.

    A plain `deepspeed.initialize` does not resolve the HF Trainer's "auto" values, so every number
    is written here and the JSON files hold only the ZeRO settings.
    """
    ds = json.loads(Path(cfg.deepspeed).read_text())
    autos = [k for k, v in ds.items() if v == "auto"]
    if autos:
        raise ConfigError(f"{cfg.deepspeed}: 'auto' values {autos} only work with the HF Trainer; "
                          "remove them, the training config sets batch size, clipping and precision")
    ds.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        train_batch_size=cfg.micro_batch_size * cfg.grad_accum * world,
        gradient_clipping=cfg.optim.grad_clip,
        bf16={"enabled": use_bf16(cfg)},
    )
    if cfg.compile and ds.get("zero_optimization", {}).get("stage") == 3:
        # ZeRO-3's per-module gather hooks break the compiled graphs (measured: 0.93 s per step
        # against 0.65 s eager, 1.1 B model on one H100): compile pays off under ZeRO-0/1/2 only.
        warnings.warn("compile: true under ZeRO-3 is slower than eager (see README, Benchmarks)", stacklevel=2)
    if cfg.tower_cache_gb and world > 1 and ds.get("zero_optimization", {}).get("stage") == 3:
        # ZeRO-3 gathers the tower's weights collectively: a rank whose images all hit its cache
        # would skip the gather the other ranks wait in.
        raise ConfigError("tower_cache_gb needs ZeRO stage < 3 with more than one rank (deepspeed: zero2.json)")
    ds.setdefault("steps_per_print", 10**9)  # progress is ours (tqdm + metrics.jsonl), not DeepSpeed's
    return ds


def make_optimizer(model: MMDLM, cfg: TrainConfig):
    """Return (AdamW over the trainable groups, warmup + cosine LambdaLR)."""
    # fused: one kernel for the whole update on GPU instead of a loop of foreach kernels.
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, fused=torch.cuda.is_available())
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
