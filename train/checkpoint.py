"""Resumable checkpoints that survive a kill mid-save.

A checkpoint `<output_dir>/checkpoints/step_<N>` is DeepSpeed's own (model, optimizer, scheduler;
sharded under ZeRO), the model config (for `python -m mmdlm.train.export`), and per rank the
training position (optimizer steps, micro-batches consumed, skipped steps) and the torch, numpy
and Python RNG states. It counts only once the file COMPLETE exists, written after every rank
finished and everything was fsynced: a run killed during a save leaves a folder without it, and
`--resume` takes the newest folder that has it (the same guarantee as write-to-temp-then-rename,
without renaming a folder other ranks are still writing into).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmdlm.config import ConfigError

MARKER = "COMPLETE"


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    batches_consumed: int = 0  # micro-batches drawn from this rank's loader (skipped ones included)
    nonfinite_total: int = 0


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
    engine.save_checkpoint(str(folder), tag=tag, client_state={"train_state": dataclasses.asdict(state)},
                           save_latest=False)
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


def resume(engine, folder: Path) -> TrainState:
    """Load the newest complete checkpoint into the engine and this rank's RNG; return the position (0 if none)."""
    found = complete_checkpoints(folder)
    choice = [found[-1].name if found else None]
    dist.broadcast_object_list(choice, src=0)  # every rank loads the tag rank 0 chose
    if choice[0] is None:
        return TrainState()
    path = folder / choice[0]
    mine = path / f"rank{dist.get_rank()}_state.pt"
    if not (path / MARKER).is_file() or not mine.is_file():
        written = len(list(path.glob("rank*_state.pt")))
        raise ConfigError(f"{path}: no complete checkpoint for rank {dist.get_rank()} (written by {written} ranks): "
                          "resume with the same number of ranks, on a file system every node sees")
    loaded, _ = engine.load_checkpoint(str(folder), tag=choice[0])
    if loaded is None:
        raise ConfigError(f"{path}: DeepSpeed could not load this checkpoint (see its log above)")
    saved = torch.load(mine, weights_only=False)
    _set_rng_state(saved["rng"])
    return TrainState(**saved["state"])
