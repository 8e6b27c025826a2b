"""What a run reports: per-step statistics reduced over ranks, the non-finite guard, and the sinks.

Rank 0 writes one JSON line per logged step to <output_dir>/metrics.jsonl (and TensorBoard
scalars when `torch.utils.tensorboard` imports) and drives the tqdm bar (loss, tokens/s, ETA).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mmdlm.errors import UserError

T_BUCKETS = 4  # loss is logged per quarter of the masking ratio t


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row (exit code 3: the data or the settings, not the code)."""

    exit_code = 3


class NonFiniteGuard:
    """Count micro-batches whose loss is not finite on some rank; stop after `limit` in a row."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def check(self, finite: bool, where: str) -> bool:
        """Return `finite`; count a skip, and raise TrainingDiverged on the `limit`-th one in a row."""
        if finite:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.in_a_row} non-finite losses in a row at {where} ({self.total} in all): lower optim.lr, "
                "raise optim.warmup_steps, check the data (mmdlm-data check) or try precision=fp32"
            )
        return False


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Return whether the loss is finite on every rank (all ranks skip together, or none does)."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class StepStats:
    """Sums over the micro-batches of one optimizer step, reduced over ranks at its end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # [loss sum, micro-batches, tokens, per-bucket loss sums (T), per-bucket counts (T)]
        self.sums = torch.zeros(3 + 2 * T_BUCKETS, dtype=torch.float64)

    def add(self, loss: torch.Tensor, tokens: int, t: torch.Tensor | None, per_sequence: torch.Tensor | None) -> None:
        self.sums[0] += float(loss.detach())
        self.sums[1] += 1
        self.sums[2] += tokens
        if t is not None:
            bucket = (t.detach().float().cpu() * T_BUCKETS).long().clamp(0, T_BUCKETS - 1)  # [B]
            self.sums[3:3 + T_BUCKETS].index_add_(0, bucket, per_sequence.detach().cpu().double())
            self.sums[3 + T_BUCKETS:].index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))

    def reduce(self) -> dict:
        """Return {loss, tokens, loss_by_t} over all ranks and micro-batches, and start the next step."""
        total = self.sums.to(self.device)
        dist.all_reduce(total)
        total = total.cpu().tolist()
        self.reset()
        sums, counts = total[3:3 + T_BUCKETS], total[3 + T_BUCKETS:]
        return {"loss": total[0] / total[1], "tokens": int(total[2]),
                "loss_by_t": [s / c if c else None for s, c in zip(sums, counts)]}


class MetricsLog:
    """Rank 0's sinks: metrics.jsonl, TensorBoard if installed, and the progress bar; no-ops elsewhere."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int, max_steps: int):
        self.enabled = enabled
        self.file = self.writer = None
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not enabled, desc="train", dynamic_ncols=True)
        self.last_time, self.tokens_since = time.time(), 0
        if not enabled:
            return
        path = out_dir / "metrics.jsonl"
        # A resumed run logs the steps after its checkpoint again: drop the killed run's lines for them.
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step] \
            if path.is_file() else []
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            pass
        else:
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def step(self, record: dict, write: bool) -> None:
        """Advance the bar by one step; when `write`, also log the record with throughput since the last line."""
        self.tokens_since += record.pop("tokens")
        if not self.enabled:
            return
        self.bar.update(1)
        if not write:
            return
        now = time.time()
        record["tokens_per_s"] = self.tokens_since / max(now - self.last_time, 1e-9)
        self.last_time, self.tokens_since = now, 0
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            for k, value in enumerate(record.get("loss_by_t") or []):
                if value is not None:
                    self.writer.add_scalar(f"loss_by_t/{k}", value, record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
