"""Resumable checkpoints that survive a kill mid-save, and the export to a plain model folder.

A checkpoint is DeepSpeed's own (model, optimizer, scheduler; sharded under ZeRO) plus, per
rank, the data position and RNG states. It counts only once the marker file COMPLETE is written,
after every rank finished writing: a run killed during a save leaves a folder without the marker,
and `--resume` takes the newest folder that has it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, folder: Path, step: int, keep: int) -> None:
    """Write checkpoint `step_<step>` under folder, mark it complete, and drop all but the newest `keep`."""
    tag = f"step_{step:07d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save({"step": step, "rng": _rng_state()}, folder / tag / f"rank{dist.get_rank()}_state.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        (folder / tag / MARKER).write_text(str(step))
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def complete_checkpoints(folder: Path) -> list[Path]:
    """Return the checkpoint folders that finished writing, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if (p / MARKER).is_file())


def resume(engine, folder: Path) -> int:
    """Load the newest complete checkpoint into the engine and this rank's RNG; return its step (0 if none)."""
    found = complete_checkpoints(folder)
    if not found:
        return 0
    latest = found[-1]
    engine.load_checkpoint(str(folder), tag=latest.name)
    state = torch.load(latest / f"rank{dist.get_rank()}_state.pt", weights_only=False)
    _set_rng_state(state["rng"])
    return int(state["step"])


def export(engine, out_dir: Path, tokenizer, merge_lora: bool) -> None:
    """Write a plain save_pretrained folder (weights gathered from ZeRO-3 shards) plus the tokenizer."""
    model = engine.module
    params = list(model.parameters())
    # Under ZeRO-3 each rank holds a shard; gather the full tensors (no-op for other stages).
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if dist.get_rank() == 0:
            to_save = model
            if merge_lora:
                import copy

                to_save = copy.deepcopy(model)
                to_save.lm = to_save.lm.merge_and_unload()
            state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in to_save.state_dict().items()}
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            to_save.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)  # the folder appears whole or not at all
    dist.barrier()
