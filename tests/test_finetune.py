"""The README's custom-VQA path in miniature: check the set, fine-tune (full and LoRA), evaluate, answer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdlm.data.synthetic import synthesize
from mmdlm.data.textures import synthesize_textures
from mmdlm.data.tokenizer import load_tokenizer, special_ids
from mmdlm.multimodal import build_model

ROOT = Path(__file__).resolve().parents[1]
ENV_EXTRA = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(*cmd: str) -> subprocess.CompletedProcess:
    import os

    proc = subprocess.run([*cmd], cwd=ROOT, env={**os.environ, **ENV_EXTRA}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_custom_vqa_set_full_and_lora(tmp_path):
    world = tmp_path / "my_vqa"
    synthesize(world, n_train=32, n_val=4, n_test=8, seed=5)
    report = run(sys.executable, "-m", "mmdlm.data.cli", "check", str(world / "train" / "qa.json"))
    assert "32" in report.stdout
    # A small "pretrained" model folder to start from (the demo model in the README).
    tokenizer = load_tokenizer(world / "tokenizer")
    ids = special_ids(tokenizer)
    torch.manual_seed(0)
    base = build_model("configs/model/tiny.yaml", vocab_size=512, image_token_id=ids.image, mask_token_id=ids.mask)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    sets = ["init_from=" + str(tmp_path / "base"), f"data.json=[{world / 'train' / 'qa.json'}]",
            "max_steps=2", "save_every=0", "micro_batch_size=4"]
    for name, extra in [("full", []), ("lora", ["lora.r=4"])]:
        args = [a for s in [*sets, f"output_dir={tmp_path / name}", *extra] for a in ("--set", s)]
        run(sys.executable, "-m", "mmdlm.train", "--config", "configs/train/finetune.yaml", *args)
        weights = load_file(str(tmp_path / name / "model" / "model.safetensors"))
        assert not any("lora" in key for key in weights)  # adapters merged into plain weights
        changed = not torch.equal(weights["lm.layers.0.attn.q_proj.weight"], base.lm.layers[0].attn.q_proj.weight)
        assert changed, name
        if name == "lora":  # LoRA leaves the MLP (not a target module) untouched
            assert torch.equal(weights["lm.layers.0.mlp.up_proj.weight"], base.lm.layers[0].mlp.up_proj.weight)
        answers = tmp_path / f"{name}.jsonl"
        run(sys.executable, "infer/infer.py", "--model", str(tmp_path / name / "model"),
            "--input", str(world / "test" / "qa.json"), "--output", str(answers))
        assert len(answers.read_text().splitlines()) == len(json.loads((world / "test" / "qa.json").read_text()))
        scores = run(sys.executable, "infer/evaluate.py", "--predictions", str(answers),
                     "--references", str(world / "test" / "qa.json"))
        assert "accuracy" in scores.stdout.lower() or "vqa" in scores.stdout.lower()
    image = next((world / "test" / "images").iterdir())
    out = run(sys.executable, "infer/infer.py", "--model", str(tmp_path / "lora" / "model"), "--image", str(image),
              "--question", "What colour is the circle?")
    assert out.stdout.strip()


@pytest.mark.slow
def test_default_finetune_learns_new_images_and_new_words(tmp_path):
    """finetune.yaml's defaults on a world unlike the demo's: textures, answer words split into several pieces.

    In miniature (four patterns, 320 images, 120 steps, from a random model instead of the demo
    model) so that it fits the test budget; the README's numbers are the full-size run. The random
    model's diffusion answer has learned nothing yet (the demo model's has), so the next-token-only
    warm-up is a third of the steps here (40), not the defaults' 900 of 1,200.
    """
    patterns = ("stripes", "checkerboard", "rings", "speckles")
    textures = synthesize_textures(tmp_path / "textures", n_train=320, n_test=80, seed=1, patterns=patterns)
    world = synthesize(tmp_path / "world", n_train=8, n_val=2, n_test=2, seed=5)  # for its tokenizer only
    tokenizer = load_tokenizer(world / "tokenizer")
    assert max(len(tokenizer.tokenize(p)) for p in patterns) >= 3  # new words, several pieces each
    ids = special_ids(tokenizer)
    torch.manual_seed(0)
    base = build_model("configs/model/tiny.yaml", vocab_size=512, image_token_id=ids.image, mask_token_id=ids.mask)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    sets = [f"init_from={tmp_path / 'base'}", f"data.json=[{textures / 'train' / 'qa.json'}]", "max_steps=120",
            "ar_warmup_steps=40", "save_every=0", f"output_dir={tmp_path / 'ft'}"]
    run(sys.executable, "-m", "mmdlm.train", "--config", "configs/train/finetune.yaml",
        *[a for s in sets for a in ("--set", s)])
    tuned = load_tokenizer(tmp_path / "ft" / "model")  # data.answer_tokens: each pattern is one token now
    assert all(len(tuned.tokenize(p)) == 1 for p in patterns) and len(tuned) == len(tokenizer) + len(
        [p for p in patterns if len(tokenizer.tokenize(p)) >= 3])
    answers = tmp_path / "answers.jsonl"
    run(sys.executable, "infer/infer.py", "--model", str(tmp_path / "ft" / "model"),
        "--input", str(textures / "test" / "qa.json"), "--output", str(answers))
    predicted = [json.loads(line)["answer"] for line in answers.read_text().splitlines()]
    truth = [e["conversations"][1]["value"] for e in json.loads((textures / "test" / "qa.json").read_text())]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    not_words = sum(p not in patterns for p in predicted) / len(predicted)
    assert accuracy >= 0.6, (accuracy, predicted[:10])  # chance: 0.25
    assert not_words <= 0.1, predicted
