"""Train an MMDLM with the masked-diffusion objective under DeepSpeed.

    deepspeed --num_gpus 8 train/train.py --config configs/train/sft.yaml [--set key.sub=value ...]
    deepspeed --module mmdlm.train --config ...          # the same, from an installed package
    mmdlm-train --config ...                             # one process (CPU or one GPU)

Data flow: YAML -> TrainConfig -> tokenizer + model (frozen parts, LoRA; train/build.py) ->
DeepSpeed engine; batches from train/loader.py; loss from mmdlm/diffusion.py; checkpoints in
train/checkpoint.py; export in train/export.py; metrics in train/metrics.py.

The shape of `train`: `setup` once, then `train_step` (one optimizer step over `grad_accum`
micro-batches) until `max_steps`, checkpointing every `save_every`, then `finish` (export).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from mmdlm.config import ConfigError, to_dict
from mmdlm.data.collate import Collator
from mmdlm.data.errors import DataError
from mmdlm.data.tokenizer import special_ids
from mmdlm.diffusion import first_token_loss, masked_diffusion_loss, next_token_loss
from mmdlm.encoders.cache import TowerCache, fingerprint
from mmdlm.errors import message_of, report_user_errors
from mmdlm.multimodal import MMDLM
from mmdlm.train import checkpoint
from mmdlm.train.build import build, deepspeed_config, make_optimizer, read_conversations
from mmdlm.train.config import TrainConfig, load_train_config
from mmdlm.train.export import export
from mmdlm.train.loader import build_loader
from mmdlm.train.metrics import MetricsLog, NonFiniteGuard, StepStats, finite_everywhere


def init_distributed() -> None:
    """Join the process group the launcher set up, or make a one-process group for `mmdlm-train`."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python`/`mmdlm-train`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.environ["WORLD_SIZE"] == "1" and not torch.cuda.is_available():
        # DeepSpeed's CPU backend compiles its shared-memory all-reduce (a C++ build: 35 s on a fresh
        # 2-core machine, a sixth of the demo's budget) for every process group; one process reduces nothing.
        ds_comm = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch is torch itself)
        if hasattr(ds_comm, "build_shm_op"):
            ds_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    unlink_shared_buffer()


def unlink_shared_buffer() -> None:
    """Remove the name of this rank's /dev/shm buffer (DeepSpeed's CPU all-reduce) once every rank has it mapped.

    Each CPU rank of a one-machine world creates a 66 MB file there, named after the user, MASTER_ADDR,
    MASTER_PORT and its rank, and DeepSpeed never removes it: a machine that trains or tests again and again
    fills its RAM with them. Every rank maps all the others' while joining the group, so past a barrier the
    names can go; the memory stays until the last rank exits, however it exits (SIGKILL included)."""
    if torch.cuda.is_available() or dist.get_world_size() == 1:
        return
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}"
    dist.barrier()  # every rank has opened every other rank's buffer
    Path("/dev/shm", f"{name}_{dist.get_rank()}").unlink(missing_ok=True)


def make_collator(cfg: TrainConfig, tokenizer, model: MMDLM) -> Collator:
    """Return the collator that makes this model's batches: its image transform and run lengths, and its system
    turn (a converted LLaDA-V's) before every conversation, so that a training prompt is the one infer.py gives."""
    runs = model.num_image_tokens if model.anyres is None else model.image_tokens  # per image size with anyres
    return Collator(tokenizer, model.image_transform(), runs, cfg.data.max_length,
                    mode="sft" if cfg.data.json else "pretrain", sft_padding=cfg.data.sft_padding,
                    system_prompt=getattr(model.config, "system_prompt", None), on_error=cfg.data.on_error)


def loss_of(engine, batch: dict, cfg: TrainConfig, mask_id: int, generator: torch.Generator, step: int = 0):
    """Return (loss, t [B] or None, per-sequence loss [B] or None) for one micro-batch at optimizer step `step`."""
    model: MMDLM = engine.module
    ids, attention, maskable = batch["input_ids"], batch["attention_mask"], batch["maskable"]  # [B, L]
    pixels = batch["pixel_values"]  # [N, 3, H, W]
    image_sizes = batch.get("image_sizes")  # [N, 2] with any-resolution images, else None
    # One vision pass, reused by every forward of the step. Called for a text-only batch too (N = 0
    # runs the tower on a blank image): every rank runs the same modules in the same order, outside
    # the engine's forward, or ZeRO-3's parameter gathers mismatch across ranks.
    features = model.encode_images(pixels, image_sizes)  # [N, T, D]; any resolution: [sum of image runs, D]

    def next_token() -> torch.Tensor:  # causal attention whatever the model's own (AR warm-up, joint loss)
        logits = engine(ids, attention_mask=attention, image_features=features, image_sizes=image_sizes, causal=True)
        return next_token_loss(logits, ids, maskable, shifted=model.lm.config.shift_logits)

    if cfg.objective == "autoregressive" or step < cfg.ar_warmup_steps:
        return next_token(), None, None
    prefix_len = batch["prompt_length"] if model.config.prefix_dlm else None  # [B]

    seen = {}

    def logits_fn(noisy: torch.Tensor) -> torch.Tensor:  # [k*B, L] -> [k*B, L, V]
        k = noisy.shape[0] // ids.shape[0]
        feats = features.repeat(k, *[1] * (features.dim() - 1))
        prefix = None if prefix_len is None else prefix_len.repeat(k)
        sizes = None if image_sizes is None else image_sizes.repeat(k, 1)
        seen["logits"] = engine(noisy, attention_mask=attention.repeat(k, 1), image_features=feats,
                                prefix_len=prefix, image_sizes=sizes)
        return seen["logits"]

    out = masked_diffusion_loss(logits_fn, ids, maskable, mask_id, eps=cfg.mask_eps,
                                complementary=cfg.complementary_masking, generator=generator,
                                schedule=cfg.mask_schedule)
    loss = out.loss + cfg.ar_loss_weight * next_token() if cfg.ar_loss_weight else out.loss
    if cfg.first_token_weight:
        loss = loss + cfg.first_token_weight * first_token_loss(seen["logits"][: ids.shape[0]], ids,
                                                                batch["prompt_length"])
    return loss, out.t, out.per_sequence


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(description="Train an MMDLM under DeepSpeed.")
    parser.add_argument("--config", required=True, help="configs/train/*.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=5e-4 or --set model.lm.hidden_size=32 "
                             "(repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    cfg.validate()
    return cfg, args.resume


def _record(step: int, stats: dict, engine, lrs: dict[str, float], guard: NonFiniteGuard,
            state: checkpoint.TrainState) -> dict:
    norm = engine.get_global_grad_norm()
    skipped = torch.tensor([float(state.skipped_samples)], device=engine.device)
    dist.all_reduce(skipped)  # broken samples dropped on every rank, plus the entries dropped at load (once)
    record = {"step": step, "loss": stats["loss"], "lr": lrs.get("lm", next(iter(lrs.values()))),
              "lr_by_module": lrs, "grad_norm": None if norm is None else float(norm), "tokens": stats["tokens"],
              "loss_by_t": stats["loss_by_t"], "skipped_nonfinite": guard.total,
              "skipped_samples": state.skipped_at_load + int(skipped.item())}
    if torch.cuda.is_available():  # the largest peak over the ranks: what each GPU must hold
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=engine.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record["peak_memory_gib"] = round(peak.item(), 3)
    return record


@dataclass
class Run:
    """What `setup` builds once and every `train_step` uses: the engine, the data and the books kept."""

    cfg: TrainConfig
    engine: Any  # deepspeed.DeepSpeedEngine around the MMDLM
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    mask_id: int
    batches: Iterator[dict]
    state: checkpoint.TrainState  # step, micro-batches consumed, skipped samples: what a resume restores
    rank: int
    out: Path
    log: MetricsLog
    guard: NonFiniteGuard
    stats: StepStats
    samples_log: TextIO | None  # <output_dir>/samples/rank<r>.jsonl with data.log_sample_ids
    saved_at: int | None  # the step of the newest checkpoint written (or resumed from)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def setup(cfg: TrainConfig, resume: bool) -> Run:
    """Return a Run: process group, model, optimizer and DeepSpeed engine, data, resumed state, logs."""
    import deepspeed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out, ckpt_dir = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    if not resume:
        checkpoint.check_fresh_start(ckpt_dir)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    tokenizer, model = build(cfg, read_conversations(cfg))
    if cfg.first_token_weight and not (model.lm.config.shift_logits and model.config.prefix_dlm):
        raise ConfigError("first_token_weight scores the prompt's last position: it needs model.lm.shift_logits "
                          "and prefix_dlm (else that position sees the answer)")
    optimizer, scheduler = make_optimizer(model, cfg)
    ds_config = deepspeed_config(cfg, world)
    if cfg.tower_cache_gb:
        model.tower_cache = TowerCache(int(cfg.tower_cache_gb * 2**30))
        if cfg.tower_cache_dir:
            load_tower_cache(model, Path(cfg.tower_cache_dir), rank)
    found = checkpoint.prepare_resume(ckpt_dir, ds_config) if resume else None  # on this or another world size
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    state = checkpoint.resume(engine, found) if found else checkpoint.TrainState()
    if resume and rank == 0:
        print(f"resuming at step {state.step}" if state.step else f"no complete checkpoint in {ckpt_dir}: "
              "starting at step 0", flush=True)
    batches = iter(build_loader(cfg, make_collator(cfg, tokenizer, model), rank, world, state))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        tokenizer.save_pretrained(out / "tokenizer")  # for exports from checkpoints
    samples_log = None
    if cfg.data.log_sample_ids:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        samples_log = (out / "samples" / f"rank{rank}.jsonl").open("a")
    return Run(cfg, engine, optimizer, tokenizer, special_ids(tokenizer).mask, batches, state, rank, out,
               MetricsLog(out, rank == 0, state.step, cfg.max_steps), NonFiniteGuard(cfg.max_nonfinite,
               state.nonfinite_total), StepStats(engine.device), samples_log, state.step if state.step else None)


def tower_cache_file(model, folder: Path, rank: int | str) -> Path:
    return folder / f"tower-{fingerprint(model.vision)}-rank{rank}.pt"


def load_tower_cache(model, folder: Path, rank: int) -> None:
    """Fill the model's tower cache from the files an earlier run on the same tower left in `folder`."""
    files = sorted(folder.glob(tower_cache_file(model, folder, "*").name))
    added = sum(model.tower_cache.load(f) for f in files)
    if files and rank == 0:
        print(f"tower cache: {added} images' features from {folder}", flush=True)


def train_step(run: Run) -> dict:
    """Run one optimizer step over `grad_accum` finite micro-batches; return its metrics record."""
    cfg, engine, state = run.cfg, run.engine, run.state
    dtype = next(engine.module.parameters()).dtype
    micro = 0
    while micro < cfg.grad_accum:
        try:
            batch = next(run.batches)
        except DataError as error:  # a sample that cannot be read, met mid-run with data.on_error=stop
            saved = f"--resume goes on from step {run.saved_at}" if run.saved_at else "no checkpoint is saved yet"
            raise DataError(f"step {state.step + 1}: {message_of(error)}. `mmdlm-data check` lists every bad "
                            f"entry at once; fix them or --set data.on_error=skip ({saved})") from None
        state.batches_consumed += 1
        sample_ids = batch.pop("sample_ids")
        state.skipped_samples += batch.pop("skipped")
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        # Masks are a function of (seed, rank, micro-batch index): a resumed run draws exactly the
        # masks the uninterrupted run would have drawn.
        generator = torch.Generator(device=engine.device).manual_seed(
            cfg.seed * 1_000_003 + run.rank * 10_007 + state.batches_consumed)
        loss, t, per_sequence = loss_of(engine, batch, cfg, run.mask_id, generator, state.step)
        if run.samples_log is not None:
            run.samples_log.write(json.dumps({"step": state.step + 1, "micro": micro, "ids": sample_ids}) + "\n")
        # A non-finite micro-batch is dropped on every rank before its backward, so the step it
        # belonged to is filled by the next micro-batch and no NaN reaches gradients or weights.
        if not run.guard.check(finite_everywhere(loss), f"step {state.step + 1}"):
            continue
        engine.backward(loss)
        lrs = {group["name"]: group["lr"] for group in run.optimizer.param_groups}  # used by this step
        engine.step()  # DeepSpeed updates the weights at the last micro-batch of the step
        run.stats.add(loss, int(batch["attention_mask"].sum()), t, per_sequence)
        micro += 1
    state.step += 1
    return _record(state.step, run.stats.reduce(), engine, lrs, run.guard, state)


def train(cfg: TrainConfig, resume: bool) -> Path:
    """Run the training loop; return the exported model folder."""
    run = setup(cfg, resume)
    try:
        while run.state.step < cfg.max_steps:
            record = train_step(run)
            run.log.step(record, write=run.state.step % cfg.log_every == 0 or run.state.step == cfg.max_steps)
            if cfg.save_every and run.state.step % cfg.save_every == 0:
                checkpoint.save(run.engine, run.ckpt_dir, run.state, cfg.keep_checkpoints)
                run.saved_at = run.state.step
    except BaseException:
        run.log.close()  # the bar ends its line, so that the error is a line of its own
        raise
    return finish(run)


def finish(run: Run) -> Path:
    """Close the logs, save the last checkpoint unless it is saved already, export the model; return its folder."""
    cfg = run.cfg
    run.log.close()
    if run.samples_log is not None:
        run.samples_log.close()
    if run.saved_at != run.state.step:
        checkpoint.save(run.engine, run.ckpt_dir, run.state, cfg.keep_checkpoints)
    cache = run.engine.module.tower_cache
    if cfg.tower_cache_dir and cache is not None and cache.misses:
        cache.save(tower_cache_file(run.engine.module, Path(cfg.tower_cache_dir), run.rank))
    export_dir = Path(cfg.export_dir or run.out / "model")
    export(run.engine, export_dir, run.tokenizer, lora_scale=cfg.lora.alpha / cfg.lora.r if cfg.lora.r else None)
    if run.rank == 0:
        print(f"exported {export_dir}", flush=True)
    return export_dir


def main(argv: list[str] | None = None) -> int:
    """Return 0 when the run finished, 2 for a config or data error (one line), 3 when training diverged."""

    def run() -> int:
        train(*parse_args(argv))
        return 0

    try:
        return report_user_errors(run)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_now(code: int) -> None:
    """Exit with `code` at once: every file is closed and the process group is gone, and Python's own
    teardown of the torch / transformers / DeepSpeed module graph costs each rank several seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
