"""Text-only and image micro-batches mixed over 2 ranks under ZeRO-2 and ZeRO-3: no hang, and the loss of each
batch equals the loss of its rows computed one by one (tests/mixed_batches_worker.py does the training)."""

import json
import math
import os
import signal
import subprocess

import pytest
import test_train_runs as runs

pytestmark = pytest.mark.slow
world = runs.world  # the fixture: the small demo world
TIMEOUT_S = 300  # the whole launch (two engines, 3 steps each); a hang fails here instead of blocking the suite


def test_text_only_rank_and_image_rank_train_together_under_zero2_and_zero3(world, tmp_path):
    cmd = [*runs.LAUNCHER, "--num_gpus", "2", "--master_port", str(runs.free_port()),
           "tests/mixed_batches_worker.py", str(world), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=runs.ROOT, env=runs.ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        log = proc.communicate()[0]
        pytest.fail(f"2 ranks with text-only batches on one of them hung for {TIMEOUT_S} s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-4000:]
    records = [r for rank in (0, 1) for r in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    assert len(records) == 2 * 2 * 3  # ranks x stages x steps
    for r in records:
        assert r["images"] == (0 if r["rank"] == 0 else 4), r  # rank 0 never saw an image; rank 1: 1 + 0 + 2 + 1
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0, r
        assert r["loss"] == pytest.approx(r["one_by_one"], rel=1e-5, abs=1e-6), r  # batching changes nothing
    for stage in (2, 3):  # one optimizer, one gradient: both ranks report the same global norm
        norms = {(r["step"], r["rank"]): r["grad_norm"] for r in records if r["stage"] == stage}
        assert all(norms[(step, 0)] == pytest.approx(norms[(step, 1)]) for step in range(3))
