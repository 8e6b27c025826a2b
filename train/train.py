"""Train an MMDLM with the masked-diffusion objective under DeepSpeed.

    deepspeed --num_gpus 8 train/train.py --config configs/train/sft.yaml [--set key.sub=value ...]
    deepspeed --module mmdlm.train --config ...          # the same, from an installed package
    mmdlm-train --config ...                             # one process (CPU or one GPU)

Data flow: YAML -> TrainConfig -> tokenizer + model (+ frozen parts, LoRA) -> DeepSpeed engine;
batches from train/loader.py; loss from mmdlm/diffusion.py; checkpoints and export from
train/checkpoint.py; one JSON line of metrics per logged step in <output_dir>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mmdlm.config import ConfigError, apply_overrides, from_dict, load_config, load_yaml
from mmdlm.data.collate import Collator
from mmdlm.data.errors import DataError
from mmdlm.data.tokenizer import load_tokenizer, special_ids
from mmdlm.diffusion import masked_diffusion_loss, next_token_loss
from mmdlm.multimodal import MMDLM, ModelConfig, build_model
from mmdlm.train import checkpoint
from mmdlm.train.config import TrainConfig
from mmdlm.train.loader import build_loader

T_BUCKETS = 4  # loss is logged per quarter of the masking ratio t


def init_distributed() -> None:
    """Join the process group the launcher set up, or make a one-process group for `mmdlm-train`."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python`/`mmdlm-train`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build(cfg: TrainConfig):
    """Return (tokenizer, model) for the config: a saved folder when init_from is set, else the model YAML."""
    tokenizer_dir = cfg.init_from if cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").is_file() \
        else cfg.data.tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = special_ids(tokenizer)
    if cfg.init_from:
        model = MMDLM.from_pretrained(cfg.init_from)
    else:
        spec = from_dict(ModelConfig, apply_overrides(load_yaml(cfg.model), list(cfg.model_overrides)), cfg.model)
        model = build_model(spec, vocab_size=max(len(tokenizer), spec.lm.get("vocab_size", 0)),
                            image_token_id=ids.image, mask_token_id=ids.mask)
    if len(tokenizer) > model.lm.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, the model only {model.lm.config.vocab_size}")
    if (cfg.objective == "autoregressive") != (model.lm.config.attention == "causal"):
        raise ConfigError("objective=autoregressive needs lm.attention=causal (and diffusion needs bidirectional)")
    model.config.image_token_id = ids.image
    model.config.prefix_dlm = cfg.prefix_dlm or bool(getattr(model.config, "prefix_dlm", False))
    model.lm.config.mask_token_id = ids.mask
    for name in ("vision", "projector", "lm"):
        getattr(model, name).requires_grad_(name in cfg.trainable)
    if cfg.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules)
        model.lm = get_peft_model(model.lm, lora)  # freezes the LM except the adapters
    if cfg.activation_checkpointing:
        model.set_activation_checkpointing(True)
    model.train()
    return tokenizer, model


def param_groups(model: MMDLM, cfg: TrainConfig) -> list[dict]:
    """Return optimizer groups of trainable parameters, one per top-level module with its lr multiplier."""
    groups = []
    for name in ("vision", "projector", "lm"):
        params = [p for p in getattr(model, name).parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": cfg.optim.lr * cfg.optim.lr_multipliers.get(name, 1.0),
                           "name": name})
    if not groups:
        raise ConfigError(f"nothing to train: trainable={cfg.trainable} (and no LoRA)")
    return groups


def lr_lambda(cfg: TrainConfig):
    """Return step -> lr factor: linear warmup, then cosine down to min_lr_ratio."""
    def factor(step: int) -> float:
        if step < cfg.optim.warmup_steps:
            return (step + 1) / cfg.optim.warmup_steps
        progress = (step - cfg.optim.warmup_steps) / max(1, cfg.max_steps - cfg.optim.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * cosine
    return factor


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """Return the DeepSpeed config: the stage file plus concrete numbers from the training config."""
    ds = json.loads(Path(cfg.deepspeed).read_text())
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    ds.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        train_batch_size=cfg.micro_batch_size * cfg.grad_accum * world,
        gradient_clipping=cfg.optim.grad_clip,
        bf16={"enabled": bf16},
    )
    return ds


def loss_of(engine, batch: dict, cfg: TrainConfig, mask_id: int, generator: torch.Generator):
    """Return (loss, t [B] or None, per-sequence loss or None) for one micro-batch."""
    model: MMDLM = engine.module
    ids, attention, maskable = batch["input_ids"], batch["attention_mask"], batch["maskable"]
    pixels = batch["pixel_values"]
    if cfg.objective == "autoregressive":
        return next_token_loss(engine(ids, pixels, attention_mask=attention), ids, maskable), None, None
    prefix_len = batch["prompt_length"] if model.config.prefix_dlm else None  # [B]
    # One vision pass, reused by both masks of a complementary pair.
    features = model.encode_images(pixels) if pixels.shape[0] else None

    def logits_fn(noisy: torch.Tensor) -> torch.Tensor:
        k = noisy.shape[0] // ids.shape[0]
        feats = None if features is None else features.repeat(k, 1, 1)
        prefix = None if prefix_len is None else prefix_len.repeat(k)
        return engine(noisy, attention_mask=attention.repeat(k, 1), image_features=feats, prefix_len=prefix)

    out = masked_diffusion_loss(logits_fn, ids, maskable, mask_id, eps=cfg.mask_eps,
                                complementary=cfg.complementary_masking, generator=generator)
    return out.loss, out.t, out.per_sequence


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(description="Train an MMDLM under DeepSpeed.")
    parser.add_argument("--config", required=True, help="configs/train/*.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    cfg.validate()
    return cfg, args.resume


def train(cfg: TrainConfig, resume: bool) -> Path:
    """Run the training loop; return the exported model folder."""
    import deepspeed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    torch.manual_seed(cfg.seed)
    tokenizer, model = build(cfg)
    mask_id = special_ids(tokenizer).mask
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world))
    step = checkpoint.resume(engine, ckpt_dir) if resume else 0
    collator = Collator(tokenizer, model.image_transform(), model.num_image_tokens, cfg.data.max_length,
                        mode="sft" if cfg.data.json else "pretrain")
    batches = iter(build_loader(cfg, collator, rank, world, skip_batches=step * cfg.grad_accum))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.__dict__, default=lambda o: o.__dict__, indent=1))
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 (closed at the end)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    nonfinite_run = nonfinite_total = 0
    tokens, started = 0, time.time()
    dtype = next(p for p in engine.module.parameters()).dtype
    while step < cfg.max_steps:
        losses, buckets = [], [[] for _ in range(T_BUCKETS)]
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(engine.device) for k, v in next(batches).items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            # Mask randomness is a function of (seed, rank, step, micro-batch): a resumed run
            # draws exactly the masks the uninterrupted run would have drawn.
            generator = torch.Generator(device=engine.device).manual_seed(
                cfg.seed * 1_000_003 + rank * 10_007 + step * 101 + micro)
            loss, t, per_sequence = loss_of(engine, batch, cfg, mask_id, generator)
            finite = torch.tensor(float(torch.isfinite(loss)), device=engine.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips together, or none does
            if finite.item() == 0:
                break
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum()) * world
            if t is not None:
                for tb, ls in zip((t * T_BUCKETS).long().clamp_max(T_BUCKETS - 1).tolist(), per_sequence.tolist()):
                    buckets[tb].append(ls)
        if len(losses) < cfg.grad_accum:
            nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
            if nonfinite_run >= cfg.max_nonfinite:
                raise RuntimeError(f"{nonfinite_run} non-finite losses in a row at step {step}: lower optim.lr, "
                                   "check the data (mmdlm-data check) or use precision=fp32")
            continue
        nonfinite_run = 0
        step += 1
        if rank == 0:
            elapsed = time.time() - started
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[-1],
                      "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens_per_s": tokens / elapsed,
                      "nonfinite_skipped": nonfinite_total,
                      "loss_by_t": [sum(b) / len(b) if b else None for b in buckets]}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            checkpoint.save(engine, ckpt_dir, step, cfg.keep_checkpoints)
    bar.close()
    checkpoint.save(engine, ckpt_dir, step, cfg.keep_checkpoints)
    export_dir = Path(cfg.export_dir or out / "model")
    checkpoint.export(engine, export_dir, tokenizer, merge_lora=cfg.lora.r > 0)
    if metrics:
        metrics.close()
        print(f"exported {export_dir}", flush=True)
    return export_dir


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume = parse_args(argv)
        train(cfg, resume)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
