"""Real training runs under DeepSpeed on CPU (gloo): two ranks, two nodes, exact resume, freezing, export.

These launch real processes (the first compiles DeepSpeed's small shared-memory op, cached
afterwards), so they are the slow part of the suite. The model is the tiny one with a smaller
LM and tower, on the demo world.
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

from mmdlm.data.synthetic import WorldOptions, synthesize
from mmdlm.data.tokenizer import load_tokenizer, special_ids
from mmdlm.multimodal import MMDLM, build_model
from mmdlm.train.config import load_train_config
from mmdlm.train.export import export_checkpoint
from mmdlm.train.loader import take_fractions

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
SMALL = ["model.lm.hidden_size=32", "model.lm.intermediate_size=64", "model.lm.num_hidden_layers=2",
         "model.lm.num_attention_heads=2", "model.lm.num_key_value_heads=1", "model.vision.model=resnet10t"]
LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    # Small shards, so that two ranks each get their own (webdataset splits whole shards).
    return synthesize(tmp_path_factory.mktemp("world"), n_train=64, n_val=4, n_test=4, seed=0,
                      options=WorldOptions(docs_per_shard=6))


@pytest.fixture(scope="module")
def start(world, tmp_path_factory) -> Path:
    """A saved model folder (the SMALL shape) to start from, as the align -> sft stages do; its LM is laid out
    as the demo's SFT model (causal prompt, shifted logits), which demo_caption.yaml's first_token_weight needs."""
    tokenizer = load_tokenizer(world / "tokenizer")
    ids = special_ids(tokenizer)
    torch.manual_seed(1)
    spec = {"vision": {"model": "resnet10t", "image_size": 64, "feature_layer": 2},
            "lm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "prefix_attention": "causal", "shift_logits": True}}
    model = build_model(spec, vocab_size=len(tokenizer), image_token_id=ids.image, mask_token_id=ids.mask)
    folder = tmp_path_factory.mktemp("start")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sets(world: Path, out: Path, *extra: str) -> list[str]:
    items = [f"data.json=[{world / 'train' / 'qa.json'}]", f"data.tokenizer={world / 'tokenizer'}",
             f"output_dir={out}", "micro_batch_size=4", "max_steps=4", "save_every=2", "init_from=null",
             "init_vision_from=null",
             "optim.warmup_steps=10", "data.log_sample_ids=true", "ar_warmup_steps=2",  # both phases
             "data.fractions=[]", *extra,
             "tower_cache_gb=0", "data.num_workers=0"]  # exact resumes; some runs train the tower
    if not any(e.startswith("init_from=") for e in extra):  # a saved folder brings its own shape
        items += SMALL
    return [arg for s in items for arg in ("--set", s)]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def single(world: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmdlm.train", "--config", "configs/train/demo_sft.yaml", *sets(world, out, *extra)]


def two_ranks(world: Path, out: Path, *extra: str) -> list[str]:
    return [*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "train/train.py",
            "--config", "configs/train/demo_sft.yaml", *sets(world, out, *extra)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def samples(out: Path, rank: int) -> dict[int, set[str]]:
    """Return step -> the sample ids this rank trained on in that step."""
    seen: dict[int, set[str]] = {}
    for line in (out / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        seen.setdefault(record["step"], set()).update(record["ids"])
    return seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Return once `path` exists, or `proc` ended, or `timeout` seconds passed (the caller asserts which)."""
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def answer(model_dir: Path, world: Path, capsys) -> str:
    from mmdlm.infer.infer import main as infer_main

    entry = json.loads((world / "test" / "qa.json").read_text())[0]
    question = entry["conversations"][0]["value"].replace("<image>", "").strip()
    capsys.readouterr()
    code = infer_main(["--model", str(model_dir), "--image", str(world / "test" / entry["image"]),
                       "--question", question])
    assert code in (0, None)
    return capsys.readouterr().out


def test_resume_after_sigkill_is_exact(world, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run(single(world, straight))
    # The same run, killed once its step-2 checkpoint is complete. max_steps is large so that it
    # cannot finish first; the warmup is longer than the run, so the lr does not depend on max_steps.
    proc = subprocess.Popen(single(world, broken, "max_steps=1000"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = broken / "checkpoints" / "step_0000002" / "COMPLETE"
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    for later in (broken / "checkpoints").glob("step_*"):  # saves the kill let through are not part of this test
        if later.name != "step_0000002":
            shutil.rmtree(later)
    half = broken / "checkpoints" / "step_0000004"
    half.mkdir()  # a save killed half-way: no COMPLETE marker, and a stray file
    (half / "rank7_state.pt").write_text("torn")
    run(single(world, broken, "max_steps=4") + ["--resume"])

    def comparable(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert [r["step"] for r in metrics(broken)] == [1, 2, 3, 4]  # the killed run's later lines are gone
    assert comparable(metrics(broken)) == comparable(metrics(straight))  # losses, grad norms, lrs, per-t losses
    a, b = weights(straight / "model"), weights(broken / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (half / "rank7_state.pt").exists()  # the resumed run rewrote step 4 from scratch


def test_two_ranks_zero2_see_different_data(world, tmp_path):
    out = tmp_path / "zero2"
    run(two_ranks(world, out, "deepspeed=configs/deepspeed/zero2.json", "micro_batch_size=2", "grad_accum=2",
                  "trainable=[vision,projector,lm]"))
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["skipped_nonfinite"] == 0 for r in records)
    assert any(v is not None for r in records for v in r["loss_by_t"])
    assert records[0]["lr_by_module"]["vision"] == pytest.approx(0.2 * records[0]["lr_by_module"]["lm"])
    rank0, rank1 = samples(out, 0), samples(out, 1)
    assert sorted(rank0) == sorted(rank1) == [1, 2, 3, 4]
    for step in rank0:
        assert len(rank0[step]) == len(rank1[step]) == 4  # 2 micro-batches of 2
        assert not rank0[step] & rank1[step]
    step4 = out / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in step4.glob("rank*_state.pt")) == ["rank0_state.pt", "rank1_state.pt"]
    # On demand, from the checkpoint alone: the same weights as the end-of-run export.
    exported, final = weights(export_checkpoint(out, None, tmp_path / "from_ckpt")), weights(out / "model")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_two_ranks_zero3_keep_the_frozen_tower_and_the_export_answers(world, start, tmp_path, capsys):
    out, ds = tmp_path / "zero3", tmp_path / "zero3.json"
    config = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny tensors
    ds.write_text(json.dumps(config))
    run(two_ranks(world, out, f"deepspeed={ds}", f"init_from={start}",
                  "trainable=[projector, lm]", "activation_checkpointing=true", "save_every=0"))
    before, after = MMDLM.from_pretrained(start).state_dict(), MMDLM.from_pretrained(out / "model").state_dict()
    assert before.keys() == after.keys()
    for key in before:  # the tower (weights and BatchNorm statistics) bit-identical, every other tensor moved
        assert torch.equal(before[key], after[key]) == key.startswith("vision."), key
    assert all(not r["lr_by_module"].get("vision") for r in metrics(out))
    exported = weights(export_checkpoint(out, "step_0000004", tmp_path / "from_ckpt"))  # ZeRO-3 shards gathered
    final = weights(out / "model")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert (out / "model" / "tokenizer.json").is_file()
    assert answer(out / "model", world, capsys).endswith("\n")  # infer.py loaded the folder and printed an answer


def test_two_ranks_killed_mid_run_leave_no_shared_memory(world, tmp_path):
    """DeepSpeed's CPU all-reduce files in /dev/shm go when the ranks have joined, not at a clean exit: a run killed
    in its first steps leaves none (conftest's no_shared_memory_left checks /dev/shm after this test)."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(two_ranks(world, out, "max_steps=1000", "save_every=0"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(out / "metrics.jsonl", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-training
    proc.wait()
    assert (out / "metrics.jsonl").is_file()  # it was training when killed


def test_two_nodes_on_loopback_split_the_shards(world, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port, out = str(free_port()), tmp_path / "nodes"
    shards = ["data.json=[]", "data.group_by_file=0", f"data.shards={world / 'train' / 'shards'}",
              "data.shuffle_buffer=0",
              "micro_batch_size=2", "max_steps=3", "save_every=0"]
    procs = []
    for node in (0, 1):
        cmd = [*LAUNCHER, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--num_nodes", "2",
               "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               "--module", "mmdlm.train", "--config", "configs/train/demo_sft.yaml", *sets(world, out, *shards)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and (out / "model" / "model.safetensors").is_file()
    node0, node1 = set().union(*samples(out, 0).values()), set().union(*samples(out, 1).values())
    assert len(node0) == len(node1) == 6 and not node0 & node1  # documents from different shards


def test_first_token_weight_on_a_model_without_shifted_logits_is_refused_in_one_line(world, tmp_path):
    proc = subprocess.run(single(world, tmp_path / "noshift", "model.lm.shift_logits=false"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: first_token_weight scores the prompt's last position: it needs model.lm.shift_logits" in proc.stderr
    assert not (tmp_path / "noshift" / "metrics.jsonl").exists()


def test_an_unreadable_image_met_mid_run_stops_it_in_one_line_that_names_the_step(world, tmp_path):
    """data.on_error=stop (the default): an image that fails to decode in a data worker (PyTorch re-raises it with
    the worker's traceback) stops the run with one line naming the step, the entry and the image, and where
    --resume would go on from."""
    from mmdlm.train.loader import ResumableBatchSampler

    (tmp_path / "bad.png").write_bytes(b"not a png")
    entries = json.loads((world / "train" / "qa.json").read_text())[:11]
    entries.append({**entries[0], "id": "corrupt", "image": str(tmp_path / "bad.png")})
    (tmp_path / "qa.json").write_text(json.dumps(entries))
    seed = load_train_config(ROOT / "configs/train/demo_sft.yaml", []).seed
    position = ResumableBatchSampler(12, 4, 0, 1, seed).order(0).index(11)
    step = position // 4 + 1  # 3 micro-batches of 4 an epoch: the corrupt entry comes in the first
    resume = f"--resume goes on from step {step - 1}" if step > 1 else "no checkpoint is saved yet"
    cmd = single(world, tmp_path / "run", f"data.json=[{tmp_path / 'qa.json'}]",
                 f"data.image_folder={world / 'train'}", "save_every=1")
    cmd[cmd.index("data.num_workers=0")] = "data.num_workers=1"  # the error crosses the worker's process boundary
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: step {step}: qa.json entry id=corrupt: image '{tmp_path / 'bad.png'}' unreadable "
                      f"(cannot identify image file '{tmp_path / 'bad.png'}'). `mmdlm-data check` lists every bad "
                      f"entry at once; fix them or --set data.on_error=skip ({resume})"], proc.stderr[-3000:]


def test_nonfinite_losses_stop_the_run_with_a_message(world, start, tmp_path):
    broken = tmp_path / "nan_start"
    shutil.copytree(start, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["projector.proj.0.weight"] = torch.full_like(state["projector.proj.0.weight"], float("nan"))
    from safetensors.torch import save_file

    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    proc = subprocess.run(single(world, tmp_path / "nan", f"init_from={broken}", "max_nonfinite=3"), cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 non-finite losses in a row at step 1" in proc.stderr
    assert (tmp_path / "nan" / "metrics.jsonl").read_text() == ""


def test_the_caption_stage_mixes_captions_and_a_share_of_the_questions_from_the_sft_model(world, start, tmp_path):
    """configs/train/demo_caption.yaml as scripts/demo.sh runs it, after SFT: captions and a seeded
    share of the questions (data.fractions) are mixed in the batches (not grouped by file), the frozen
    tower stays bit-identical, and the export keeps prefix-DLM attention for the sampler's exact prefix cache."""
    out = tmp_path / "caption"
    items = [f"init_from={start}", f"data.json=[{world / 'train' / 'captions.json'}, {world / 'train' / 'qa.json'}]",
             f"output_dir={out}", "micro_batch_size=8", "max_steps=4", "ar_warmup_steps=2", "save_every=0",
             "data.log_sample_ids=true", "data.num_workers=0", f"tower_cache_dir={tmp_path / 'features'}"]
    run([sys.executable, "-m", "mmdlm.train", "--config", "configs/train/demo_caption.yaml",
         *[arg for s in items for arg in ("--set", s)]])
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    # The frozen tower's features of the images it saw are kept for the next run on that tower.
    kept = list((tmp_path / "features").glob("tower-*-rank0.pt"))
    assert len(kept) == 1 and len(torch.load(kept[0], weights_only=True)["keys"]) > 0
    seen = samples(out, 0)
    assert any(any("-cap-" in i for i in ids) and any("-qa-" in i for i in ids) for ids in seen.values())
    qa = json.loads((world / "train" / "qa.json").read_text())
    cfg = load_train_config(ROOT / "configs/train/demo_caption.yaml")
    share = take_fractions([[], qa], cfg.data.fractions, cfg.seed)[1]  # the seeded subset the run draws from
    questions = {i for ids in seen.values() for i in ids if "-qa-" in i}
    assert len(share) < len(qa) and questions and questions <= {entry["id"] for entry in share}
    before, after = MMDLM.from_pretrained(start).state_dict(), MMDLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(before[k], after[k]) == k.startswith("vision.") for k in before)
    assert json.loads((out / "model" / "config.json").read_text())["prefix_dlm"] is True
