"""Training under DeepSpeed on CPU (gloo): one process, two ranks, two nodes, exact resume, freezing, export.

These launch real processes (the first one compiles DeepSpeed's small shared-memory op, cached
afterwards), so they are the slow part of the suite.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdlm.config import ConfigError, load_config
from mmdlm.data.synthetic import synthesize
from mmdlm.data.tokenizer import load_tokenizer, special_ids
from mmdlm.multimodal import MMDLM, build_model
from mmdlm.train.config import TrainConfig
from mmdlm.train.loader import ResumableBatchSampler
from mmdlm.train.train import lr_lambda

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TINY_LM = ["model_overrides=[lm.hidden_size=32, lm.intermediate_size=64, lm.num_hidden_layers=2, "
           "lm.num_attention_heads=2, lm.num_key_value_heads=1, vision.model=resnet10t]"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize(out, n_train=64, n_val=8, n_test=8, seed=0)
    return out


def overrides(world: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.json=[{world / 'train' / 'qa.json'}]", f"data.tokenizer={world / 'tokenizer'}",
            f"output_dir={out}", "micro_batch_size=4", "max_steps=4", "save_every=2", "log_every=1",
            "optim.warmup_steps=10", "init_from=null", *TINY_LM, *extra]
    return [arg for s in sets for arg in ("--set", s)]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_cmd(world, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mmdlm.train", "--config", "configs/train/demo_sft.yaml",
            *overrides(world, out, *extra)]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batches_are_disjoint_across_ranks_and_resume_where_they_stopped():
    a = ResumableBatchSampler(40, 4, rank=0, world=2, seed=3)
    b = ResumableBatchSampler(40, 4, rank=1, world=2, seed=3)
    first_a, first_b = next(iter(a)), next(iter(b))
    assert not set(first_a) & set(first_b)
    straight = [x for _, x in zip(range(12), iter(a))]  # crosses an epoch boundary (5 batches per epoch)
    resumed = [x for _, x in zip(range(5), iter(ResumableBatchSampler(40, 4, 0, 2, seed=3, skip=7)))]
    assert resumed == straight[7:12]
    with pytest.raises(ValueError, match="cannot fill a batch"):
        ResumableBatchSampler(6, 4, 0, 2, 0)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100)
    cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = 10, 0.1
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1) and f(55) == pytest.approx(0.55)


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", ["optim.learning_rate=1"])
    cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", ["trainable=[decoder]"])
    with pytest.raises(ValueError, match="unknown modules"):
        cfg.validate()


@pytest.mark.slow
def test_exact_resume_after_sigkill(world, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run(train_cmd(world, straight))
    # Same run, killed once its step-2 checkpoint is complete (max_steps large so it cannot finish first;
    # warmup longer than the run keeps the learning rate independent of max_steps).
    proc = subprocess.Popen(train_cmd(world, broken, "max_steps=1000"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = broken / "checkpoints" / "step_0000002" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    for later in (broken / "checkpoints").glob("step_*"):  # a save the kill may have caught half-way
        if later.name != "step_0000002":
            shutil.rmtree(later)
    (broken / "checkpoints" / "step_0000004").mkdir()  # a half-written save: no COMPLETE marker
    run(train_cmd(world, broken, "max_steps=4") + ["--resume"])
    assert losses(broken) == losses(straight)  # steps 3-4 logged again after the resume overwrite by key
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(broken / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_frozen_modules_stay_bit_identical_and_export_loads(world, tmp_path):
    tokenizer = load_tokenizer(world / "tokenizer")
    ids = special_ids(tokenizer)
    torch.manual_seed(0)
    start = build_model("configs/model/tiny.yaml", vocab_size=512, image_token_id=ids.image, mask_token_id=ids.mask)
    start.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    out = tmp_path / "align"
    run(train_cmd(world, out, f"init_from={tmp_path / 'start'}", "trainable=[projector]"))
    before, after = start.state_dict(), MMDLM.from_pretrained(out / "model").state_dict()
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == (not key.startswith("projector.")), key
    assert (out / "model" / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_ranks(world, tmp_path, stage):
    out = tmp_path / stage
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), "train/train.py", "--config", "configs/train/demo_sft.yaml"]
    run(launcher + overrides(world, out, f"deepspeed=configs/deepspeed/{stage}.json"))
    assert sorted(p.name for p in (out / "checkpoints" / "step_0000004").glob("rank*_state.pt")) == \
        ["rank0_state.pt", "rank1_state.pt"]
    model = MMDLM.from_pretrained(out / "model")  # ZeRO-3 shards gathered into full tensors
    assert all(p.numel() > 0 for p in model.parameters())
    assert len(losses(out)) == 4


@pytest.mark.slow
def test_two_nodes_on_loopback(world, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port, out = str(free_port()), tmp_path / "nodes"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1",
               "--master_port", port, "train/train.py", "--config", "configs/train/demo_sft.yaml",
               *overrides(world, out)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert len(losses(out)) == 4 and (out / "model" / "model.safetensors").is_file()
