"""Batches for training: each rank its own slice, in an order that a resumed run can replay exactly.

Conversations (LLaVA JSON) are a map-style set: every epoch is a seeded permutation, dealt
round-robin over the ranks, so the position in the data is two numbers (epoch, samples of it
taken) and a resumed run continues with the very next batch, on the same or another number of
ranks. Document shards stream through webdataset, split by node and worker; there the position
is approximate (the stream restarts and skips as many samples as were consumed), as in every
streaming pipeline.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset, Sampler, Subset, get_worker_info

from mmdlm.config import ConfigError
from mmdlm.data.collate import Collator
from mmdlm.data.errors import DataWarning
from mmdlm.data.llava import LlavaDataset
from mmdlm.data.shards import shard_pipeline
from mmdlm.train.checkpoint import TrainState
from mmdlm.train.config import TrainConfig


class ResumableBatchSampler(Sampler[list[int]]):
    """Yield this rank's batches of indices forever, from a position that does not depend on the world size.

    Each epoch is one seeded permutation of the set; every micro-batch all ranks together take the
    next `batch_size * world` samples of it (a round), dealt round-robin, and an epoch ends when
    less than a round is left (that ragged tail is dropped so every rank has as many batches). The
    position is (epoch, offset): samples of the epoch's permutation already taken, so a run saved
    on one number of ranks resumes on another with no sample of the epoch seen twice or skipped.

    With `sources` (each sample's data file) and `group` > 0, the permutation is cut into groups of
    `group` samples, each ordered by file with a stable sort: a micro-batch then mostly holds rows
    of one file (short VQA rows are not padded to a caption's length, as LLaVA's modality grouping
    keeps text-only rows apart), still in random order within it. Sorting by length instead made the
    demo's batches hold one question type each, and the model stayed at chance. The order depends
    on (seed, epoch, sources, group), never on the world size, so resuming on another number of
    ranks stays exact.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int, epoch: int = 0, offset: int = 0,
                 sources: list[int] | None = None, group: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world = rank, world
        self.sources, self.group = sources, group
        self.epoch, self.offset = advance(size, batch_size * world, epoch, offset, 0)

    def order(self, epoch: int) -> list[int]:
        """Return epoch `epoch`'s order of the set's indices."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        if not (self.group and self.sources):
            return order
        sources = self.sources
        chunks = [order[k : k + self.group] for k in range(0, self.size, self.group)]
        return [i for chunk in chunks for i in sorted(chunk, key=lambda i: sources[i])]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset, round_ = self.epoch, self.offset, self.batch_size * self.world
        while True:
            order = self.order(epoch)
            while offset + round_ <= self.size:
                yield order[offset + self.rank : offset + round_ : self.world]
                offset += round_
            epoch, offset = epoch + 1, 0


def advance(size: int, round_: int, epoch: int, offset: int, rounds: int) -> tuple[int, int]:
    """Return the (epoch, offset) reached from (epoch, offset) after `rounds` rounds of `round_` samples each."""
    if size < round_:
        raise ConfigError(f"{size} samples cannot fill a batch on every rank (micro_batch_size x ranks = {round_}): "
                          "lower micro_batch_size or add data")
    if size - offset < round_:  # the previous run stopped at this epoch's ragged tail: it is over
        epoch, offset = epoch + 1, 0
    left = (size - offset) // round_  # whole rounds left in this epoch
    if rounds < left:
        return epoch, offset + rounds * round_
    epoch, rounds = epoch + 1, rounds - left
    per_epoch = size // round_
    return epoch + rounds // per_epoch, rounds % per_epoch * round_


def start_position(state: TrainState, size: int, round_: int) -> tuple[int, int]:
    """Return where this run's loader starts in a set of `size` samples: where the saved run had got to.

    The saved run started at (data_epoch, data_offset) after `data_batches_at_start` micro-batches and
    took rounds of `data_round` samples; a state from before these fields took rounds of this run's size.
    """
    taken = state.batches_consumed - state.data_batches_at_start
    return advance(size, state.data_round or round_, state.data_epoch, state.data_offset, taken)


class WithIds:
    """Collate function: the Collator's batch plus `sample_ids` (list of str) for the data log and `skipped`
    (int), the samples it dropped (counted here, since with workers the Collator runs in their processes)."""

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, samples: list[dict | None]) -> dict:
        before = self.collator.skipped
        batch = self.collator(samples)
        batch["sample_ids"] = [str(s["id"]) for s in samples if s is not None]
        batch["skipped"] = self.collator.skipped - before
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


def build_loader(cfg: TrainConfig, collator: Collator, rank: int, world: int, state: TrainState) -> DataLoader:
    """Return an endless DataLoader of collated batches for this rank, from the position `state` saved.

    Records in `state` where it starts (data_epoch, data_offset, data_batches_at_start, data_round),
    so that a checkpoint of this run tells the next one, on any number of ranks, where to go on.
    """
    collate = WithIds(collator)
    if cfg.data.json:
        with warnings.catch_warnings():
            if rank != 0:  # every rank reads the whole set: one copy of each skipped-entry line is enough
                warnings.simplefilter("ignore", DataWarning)
            sets = [LlavaDataset(p, cfg.data.image_folder or Path(p).parent, on_error=cfg.data.on_error)
                    for p in cfg.data.json]
        state.skipped_at_load = sum(s.skipped for s in sets)
        sets = take_fractions(sets, cfg.data.fractions, cfg.seed)
        dataset = ConcatDataset(sets) if len(sets) > 1 else sets[0]
        round_ = cfg.micro_batch_size * world
        epoch, offset = start_position(state, len(dataset), round_)
        sources = [k for k, part in enumerate(sets) for _ in range(len(part))] if cfg.data.group_by_file else None
        sampler = ResumableBatchSampler(len(dataset), cfg.micro_batch_size, rank, world, cfg.seed, epoch, offset,
                                        sources, cfg.data.group_by_file)
        state.data_epoch, state.data_offset = sampler.epoch, sampler.offset
        state.data_batches_at_start, state.data_round = state.batches_consumed, round_
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers)
    skip_batches = state.batches_consumed
    stream = shard_pipeline(
        # One seed on every rank: it orders the shards before they are dealt out (resampled shards
        # mix rank and worker into it themselves).
        cfg.data.shards, shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled, seed=cfg.seed,
        num_workers=cfg.data.num_workers,
    )
    return DataLoader(Forever(stream, skip_batches * cfg.micro_batch_size), batch_size=cfg.micro_batch_size,
                      collate_fn=collate, num_workers=cfg.data.num_workers,
                      persistent_workers=cfg.data.num_workers > 0)
