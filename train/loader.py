"""Batches for training: each rank its own slice, in an order that a resumed run can replay exactly.

Conversations (LLaVA JSON) are a map-style set: every epoch is a seeded permutation, dealt
round-robin over the ranks, so the position in the data is one number (batches consumed) and a
resumed run continues with the very next batch. Document shards stream through webdataset, split
by node and worker; there the position is approximate (shards restart), as in every streaming
pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from mmdlm.data.collate import Collator
from mmdlm.data.llava import LlavaDataset
from mmdlm.data.shards import shard_pipeline
from mmdlm.train.config import TrainConfig


class ResumableBatchSampler(Sampler[list[int]]):
    """Yield this rank's batches of indices forever, starting after `skip` batches."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int, skip: int = 0):
        if size < batch_size * world:
            raise ValueError(f"{size} samples cannot fill a batch of {batch_size} on each of {world} ranks")
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


def build_loader(cfg: TrainConfig, collator: Collator, rank: int, world: int, skip_batches: int) -> DataLoader:
    """Return an endless DataLoader of collated batches for this rank."""
    if cfg.data.json:
        sets = [LlavaDataset(p, cfg.data.image_folder or Path(p).parent) for p in cfg.data.json]
        dataset = ConcatDataset(sets) if len(sets) > 1 else sets[0]
        sampler = ResumableBatchSampler(len(dataset), cfg.micro_batch_size, rank, world, cfg.seed, skip_batches)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=cfg.data.num_workers)
    stream = shard_pipeline(
        cfg.data.shards, shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled, seed=cfg.seed + rank,
        epoch_length=None, num_workers=cfg.data.num_workers,
    )
    return DataLoader(_forever(stream, skip_batches * cfg.micro_batch_size), batch_size=cfg.micro_batch_size,
                      collate_fn=collator, num_workers=cfg.data.num_workers)


class _forever(torch.utils.data.IterableDataset):
    """Repeat a finite stream epoch after epoch, skipping the first `skip` samples once."""

    def __init__(self, stream, skip: int):
        self.stream, self.skip = stream, skip

    def __iter__(self):
        skip = self.skip
        while True:
            for sample in self.stream:
                if skip:
                    skip -= 1
                    continue
                yield sample
