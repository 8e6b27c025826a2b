"""Batches for training: each rank its own slice, in an order that a resumed run can replay exactly.

Conversations (LLaVA JSON) are a map-style set: every epoch is a seeded permutation, dealt
round-robin over the ranks, so the position in the data is one number (micro-batches consumed)
and a resumed run continues with the very next batch. Document shards stream through
webdataset, split by node and worker; there the position is approximate (the stream restarts and
skips as many samples as were consumed), as in every streaming pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset, Sampler, Subset, get_worker_info

from mmdlm.data.collate import Collator
from mmdlm.data.llava import LlavaDataset
from mmdlm.data.shards import shard_pipeline
from mmdlm.train.config import TrainConfig


class ResumableBatchSampler(Sampler[list[int]]):
    """Yield this rank's batches of indices forever, starting after `skip` batches."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int, skip: int = 0):
        if size < batch_size * world:
            raise ValueError(f"{size} samples cannot fill a batch of {batch_size} on each of {world} ranks: "
                             "lower micro_batch_size or add data")
        self.size, self.batch_size, self.seed, self.skip = size, batch_size, seed, skip
        self.rank, self.world = rank, world
        self.per_epoch = size // (batch_size * world)  # drop the ragged tail so every rank has as many batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch, index = divmod(self.skip, self.per_epoch)
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            mine = order[self.rank :: self.world]
            for b in range(index, self.per_epoch):
                yield mine[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, index = epoch + 1, 0


class WithIds:
    """Collate function: the Collator's batch plus `sample_ids` (list of str) for the data log."""

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, samples: list[dict | None]) -> dict:
        batch = self.collator(samples)
        batch["sample_ids"] = [str(s["id"]) for s in samples if s is not None]
        return batch


class Forever(IterableDataset):
    """Repeat a finite stream epoch after epoch, skipping `skip` samples (this rank's) once at the start."""

    def __init__(self, stream, skip: int):
        self.stream, self.skip = stream, skip

    def __iter__(self):
        info = get_worker_info()
        skip = self.skip // (info.num_workers if info else 1)  # each worker holds its share of the stream
        while True:
            for sample in self.stream:
                if skip:
                    skip -= 1
                    continue
                yield sample


def take_fractions(sets: list, fractions: list[float], seed: int) -> list:
    """Return each set cut to a seeded random subset of its `data.fractions` entry (mixing ratios; [] = all)."""
    out = []
    for k, (dataset, fraction) in enumerate(zip(sets, fractions or [1.0] * len(sets))):
        if fraction >= 1.0:
            out.append(dataset)
            continue
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + k)).tolist()
        out.append(Subset(dataset, sorted(order[: max(1, round(fraction * len(dataset)))])))
    return out


def build_loader(cfg: TrainConfig, collator: Collator, rank: int, world: int, skip_batches: int) -> DataLoader:
    """Return an endless DataLoader of collated batches for this rank, after `skip_batches` of them."""
    collate = WithIds(collator)
    if cfg.data.json:
        sets = [LlavaDataset(p, cfg.data.image_folder or Path(p).parent) for p in cfg.data.json]
        sets = take_fractions(sets, cfg.data.fractions, cfg.seed)
        dataset = ConcatDataset(sets) if len(sets) > 1 else sets[0]
        sampler = ResumableBatchSampler(len(dataset), cfg.micro_batch_size, rank, world, cfg.seed, skip_batches)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers)
    stream = shard_pipeline(
        # One seed on every rank: it orders the shards before they are dealt out (resampled shards
        # mix rank and worker into it themselves).
        cfg.data.shards, shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled, seed=cfg.seed,
        num_workers=cfg.data.num_workers,
    )
    return DataLoader(Forever(stream, skip_batches * cfg.micro_batch_size), batch_size=cfg.micro_batch_size,
                      collate_fn=collate, num_workers=cfg.data.num_workers,
                      persistent_workers=cfg.data.num_workers > 0)
