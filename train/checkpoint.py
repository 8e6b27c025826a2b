"""Resumable checkpoints that survive a kill mid-save.

A checkpoint `<output_dir>/checkpoints/step_<N>` is DeepSpeed's own (model, optimizer, scheduler;
sharded under ZeRO), the model config (for `python -m mmdlm.train.export`), and per rank the
training position (optimizer steps, micro-batches consumed, skipped steps) and the torch, numpy
and Python RNG states. It counts only once the file COMPLETE exists, written after every rank
finished and everything was fsynced: a run killed during a save leaves a folder without it, and
`--resume` takes the newest folder that has it (the same guarantee as write-to-temp-then-rename,
without renaming a folder other ranks are still writing into).

Resuming on another number of ranks goes through DeepSpeed's universal checkpoint: rank 0 converts
the folder once (`step_<N>/universal`, with its own COMPLETE marker), every rank loads it with
`load_universal`, and ZeRO re-partitions weights and optimizer state for the new world. The data
position is world-independent (train/loader.py); each rank's RNG is restored when it had a file,
else seeded from (seed, rank, step). ZeRO-3's universal load copies the first optimizer group's
hyperparameters to every group (the tower's 0.2x lr onto the LM, and its name): `resume` gives each
group back its own, with the lr the restored scheduler set.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmdlm.config import ConfigError

MARKER = "COMPLETE"
UNIVERSAL_INFO = "universal_checkpoint_info"  # deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    batches_consumed: int = 0  # micro-batches drawn from this rank's loader (skipped ones included)
    nonfinite_total: int = 0
    # Where this run's loader started (train/loader.py): epoch, samples of its permutation taken, at
    # which batches_consumed, and samples per micro-batch over all ranks (0: a checkpoint from before).
    data_epoch: int = 0
    data_offset: int = 0
    data_batches_at_start: int = 0
    data_round: int = 0
    skipped_samples: int = 0  # samples this rank's collator dropped (broken images with data.on_error=skip)
    skipped_at_load: int = 0  # entries of the JSON sets dropped when loading them (the same on every rank)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _local_leader() -> bool:
    """Return True on one rank per node: node-local disks each get their marker, shared ones get it twice."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(folder: Path) -> list[Path]:
    """Return the checkpoint folders that finished writing, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if (p / MARKER).is_file())


def check_fresh_start(folder: Path) -> None:
    """Raise ConfigError when a run without --resume would mix its checkpoints with an earlier run's."""
    if complete_checkpoints(folder):
        raise ConfigError(f"{folder} holds checkpoints of an earlier run: pass --resume to continue it, "
                          "or choose another output_dir")


def _prune(folder: Path, keep: int) -> None:
    """Drop all but the newest `keep` complete checkpoints, and any unfinished one older than the newest."""
    complete = complete_checkpoints(folder)
    newest = complete[-1].name if complete else ""
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for path in folder.glob("step_*"):
        if not (path / MARKER).is_file() and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def save(engine, folder: Path, state: TrainState, keep: int) -> Path:
    """Write checkpoint `step_<N>` for every rank, mark it complete, prune old ones; return its folder."""
    tag = f"step_{state.step:07d}"
    path = folder / tag
    if _local_leader() and path.exists():  # left by a killed run that had gone further: never mix files
        shutil.rmtree(path)
    dist.barrier()
    # The universal-checkpoint marker lets ds_to_universal convert this folder for another world size.
    client_state = {"train_state": dataclasses.asdict(state), UNIVERSAL_INFO: {"universal_checkpoint_version": 0.4}}
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
    torch.save({"state": dataclasses.asdict(state), "rng": _rng_state()}, path / f"rank{dist.get_rank()}_state.pt")
    if dist.get_rank() == 0:
        engine.module.config.save_pretrained(path)  # config.json: the export needs no model code
    dist.barrier()  # every rank has written all of its files
    if _local_leader():
        _fsync_tree(path)
        (path / MARKER).write_text(f"{state.step}\n")
        _fsync_tree(path)
        _prune(folder, keep)
    dist.barrier()
    return path


def saved_world(path: Path) -> int:
    """Return the number of ranks that wrote checkpoint `path`."""
    return len(list(path.glob("rank*_state.pt")))


def prepare_resume(folder: Path, ds_config: dict) -> Path | None:
    """Return the newest complete checkpoint (the one rank 0 sees; None if none), ready to load on this world.

    When it was written by another number of ranks, rank 0 converts it to a universal checkpoint
    and `ds_config` is set to load that; call this before deepspeed.initialize.
    """
    found = complete_checkpoints(folder)
    choice = [found[-1].name if found else None]
    dist.broadcast_object_list(choice, src=0)  # every rank loads the tag rank 0 chose
    if choice[0] is None:
        return None
    path = folder / choice[0]
    if not (path / MARKER).is_file():
        raise ConfigError(f"{path}: this rank does not see the checkpoint rank 0 chose: resume on a file system "
                          "every node sees")
    if saved_world(path) != dist.get_world_size():
        if dist.get_rank() == 0:
            to_universal(path)
        dist.barrier()
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return path


def to_universal(path: Path) -> Path:
    """Return `path`/universal: DeepSpeed's world-size-independent form of checkpoint `path` (converted once)."""
    out = path / "universal"
    if (out / MARKER).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # a conversion that was killed half-way
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-3000:]}")
    _fsync_tree(out)
    (out / MARKER).write_text(f"{saved_world(path)} ranks\n")
    return out


def resume(engine, path: Path) -> TrainState:
    """Load checkpoint `path` (from prepare_resume) into the engine and this rank's RNG; return the position."""
    rank = dist.get_rank()
    universal = saved_world(path) != dist.get_world_size()
    groups = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    loaded, _ = engine.load_checkpoint(str(path), tag="universal") if universal else \
        engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise ConfigError(f"{path}: DeepSpeed could not load this checkpoint (see its log above)")
    if universal:  # ZeRO-3's universal load gives every group the first group's lr and name: put back each its own
        for group, own, lr in zip(engine.optimizer.param_groups, groups, engine.lr_scheduler.get_last_lr()):
            group.update(own, lr=lr)
    mine = path / f"rank{rank}_state.pt"
    if not universal and not mine.is_file():
        raise ConfigError(f"{path}: no state file for rank {rank}: resume on a file system every node sees")
    # Positions and counters are the same on every rank; a rank the saved run did not have takes rank 0's.
    saved = torch.load(mine if mine.is_file() else path / "rank0_state.pt", weights_only=False)
    if mine.is_file():
        _set_rng_state(saved["rng"])
    else:
        torch.manual_seed(saved["state"]["step"] * 1_000_003 + rank)
    return TrainState(**saved["state"])
