"""Resuming on another number of ranks (DeepSpeed universal checkpoint) with the data position kept.

Real runs on CPU (gloo): 2 ranks -> 1 rank -> 2 ranks, each leg resuming the previous one's newest
checkpoint. Helpers come from test_train_runs.py (the same world, model shape and launchers).
"""

import json

import pytest
import test_train_runs as runs
import torch

from mmdlm.config import load_config
from mmdlm.data.llava import LlavaDataset
from mmdlm.train.build import lr_lambda
from mmdlm.train.config import TrainConfig
from mmdlm.train.export import export_checkpoint

pytestmark = pytest.mark.slow
world = runs.world  # the fixture: the small demo world
ROOT, metrics, run, single, two_ranks = runs.ROOT, runs.metrics, runs.run, runs.single, runs.two_ranks


def seen_in_order(out, ranks: int, steps: range) -> list[str]:
    """Return the sample ids trained on in `steps`, every rank's, step by step (ranks' order within a step)."""
    ids = []
    for rank in range(ranks):
        for line in (out / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["step"] in steps:
                ids += record["ids"]
    return ids


def universal(path) -> torch.Tensor:
    """Return a universal checkpoint's tensor, flattened (ZeRO-2's are {"param": tensor}, ZeRO-3's flat tensors)."""
    saved = torch.load(path, weights_only=False)
    return (saved["param"] if isinstance(saved, dict) else saved).flatten()


def broken_set(world, tmp_path):
    """Return the world's training set with two broken entries added (data.on_error=skip drops them)."""
    entries = json.loads((world / "train" / "qa.json").read_text())
    good = entries[0]["conversations"]
    entries.insert(5, {"id": "broken-missing-image", "image": "images/nope.png", "conversations": good})
    entries.insert(9, {"id": "broken-no-answer", "conversations": good[:1]})
    path = tmp_path / "qa_broken.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_on_another_number_of_ranks_keeps_the_data_position(world, tmp_path, zero):
    qa = broken_set(world, tmp_path)
    out = tmp_path / "run"
    ds = tmp_path / f"zero{zero}.json"
    config = json.loads((ROOT / f"configs/deepspeed/zero{zero}.json").read_text())
    if zero == 3:  # partition every tensor, the tiny ones too, so that re-partitioning is real
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds.write_text(json.dumps(config))
    common = [f"deepspeed={ds}", f"data.json=[{qa}]", f"data.image_folder={world / 'train'}", "data.on_error=skip",
              "optim.lr_multipliers={projector: 0.5}"]  # two optimizer groups with their own lr each
    # The same 8 samples per optimizer step on either world: 2 ranks x 4, or 1 rank x 4 x 2 micro-batches.
    first = run(two_ranks(world, out, *common, "max_steps=2"))
    one = run(single(world, out, *common, "max_steps=4", "grad_accum=2") + ["--resume"])
    assert "resuming at step 2" in one.stdout
    assert (out / "checkpoints" / "step_0000002" / "universal" / "COMPLETE").is_file()  # converted once, for 1 rank
    run(two_ranks(world, out, *common, "max_steps=6") + ["--resume"])
    # The 1-rank checkpoint converted for 2 ranks holds exactly its weights, and Adam's moments with them.
    zero_dir = out / "checkpoints" / "step_0000004" / "universal" / "zero"
    saved = runs.weights(export_checkpoint(out, "step_0000004", tmp_path / "step4"))
    converted = sorted(p.name for p in zero_dir.iterdir() if p.is_dir())  # one folder per parameter
    buffers = {k for k in saved if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    # Every trained parameter (ZeRO-2 adds the buffers). The demo's tower is frozen: ZeRO-3 keeps frozen
    # weights out of the optimizer, so they come back from the model's own start, as they never change.
    frozen = {k for k in saved if k.startswith("vision.")} if zero == 3 else set()
    assert set(saved) - buffers - frozen <= set(converted) <= set(saved)
    for name in converted:
        assert torch.equal(universal(zero_dir / name / "fp32.pt"), saved[name].float().flatten()), name
    assert universal(zero_dir / "lm.layers.0.mlp.up_proj.weight" / "exp_avg.pt").abs().sum() > 0

    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in records)
    # The schedule went on where it stopped (scheduler state restored across both conversions).
    cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", ["optim.warmup_steps=10"])
    assert [r["lr"] for r in records] == pytest.approx([cfg.optim.lr * lr_lambda(cfg)(s) for s in range(6)])
    # Each group its own lr, the steps right after either resume too (ZeRO-3's universal load overwrites them).
    for s, r in enumerate(records):
        lr = cfg.optim.lr * lr_lambda(cfg)(s)
        assert r["lr_by_module"] == pytest.approx({"projector": 0.5 * lr, "lm": lr}), r["step"]
    # data.on_error=skip: each broken entry named once (rank 0 only), both counted in every metrics line.
    for name in ("broken-missing-image: image 'images/nope.png' not found", "broken-no-answer: conversation has no"):
        assert first.stderr.count(name) == 1, first.stderr[-3000:]
    assert all(r["skipped_samples"] == 2 for r in records)

    # No sample of the epoch seen twice or skipped: the 48 samples are the first 48 of epoch 0's order.
    ids = [str(entry.get("id", i)) for i, entry in LlavaDataset(qa, world / "train", on_error="skip").entries]
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0)).tolist()
    seen = seen_in_order(out, 2, range(1, 7))  # rank 1 wrote steps 1-2 and 5-6, rank 0 all six
    assert len(ids) >= 48 and len(seen) == 48 and len(set(seen)) == 48
    assert set(seen) == {ids[i] for i in order[:48]}
    for steps in (range(1, 3), range(3, 5), range(5, 7)):  # each leg took the next 16 in order
        start = 8 * (steps.start - 1)
        assert set(seen_in_order(out, 2, steps)) == {ids[i] for i in order[start : start + 16]}
