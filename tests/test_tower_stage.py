"""The demo's tower-pretraining stage and how the next stages pick its tower up (init_vision_from)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdlm.config import ConfigError, load_config
from mmdlm.data.synthetic import synthesize
from mmdlm.train import tower
from mmdlm.train.build import build, use_bf16
from mmdlm.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("world"), n_train=48, n_val=16, n_test=4, seed=7)


def test_tower_stage_learns_cells_and_its_tower_loads_into_the_next_stage(world, tmp_path):
    out = tmp_path / "tower"
    sets = [f"train=[{world / 'train' / 'captions.json'}]", f"val={world / 'val' / 'captions.json'}",
            "max_steps=6", "batch_size=16", f"output_dir={out}"]
    assert tower.main(["--config", str(ROOT / "configs/train/demo_tower.yaml"),
                       *[a for s in sets for a in ("--set", s)]]) == 0
    scores = json.loads((out / "eval.json").read_text())
    assert set(scores) == {"colour", "shape", "size", "occupied"}
    assert all(0 <= v <= 100 for v in scores.values())
    saved = load_file(str(out / "model" / "vision.safetensors"))
    assert saved and all(k.startswith("vision.") for k in saved)

    cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml",
                      [f"init_vision_from={out / 'model'}", f"data.tokenizer={world / 'tokenizer'}"])
    _, model = build(cfg)
    for key, value in model.vision.state_dict().items():
        assert torch.equal(value, saved["vision." + key]), key
    # The LM and projector stay freshly initialised: only the tower is taken over.
    assert not any(k.startswith(("lm.", "projector.")) for k in saved)

    # A linear probe of that tower: only the heads train, and no tower is written.
    probe = tmp_path / "probe"
    assert tower.main(["--config", str(ROOT / "configs/train/demo_tower.yaml"),
                       *[a for s in [*sets[:2], "max_steps=2", "batch_size=16", f"output_dir={probe}", "probe=true",
                                     f"init_vision_from={out / 'model'}"] for a in ("--set", s)]]) == 0
    assert json.loads((probe / "eval.json").read_text()).keys() == scores.keys()
    assert not (probe / "model" / "vision.safetensors").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.init_vision_from = str(empty)
    with pytest.raises(ConfigError, match="holds no"):
        build(cfg)


def test_tower_stage_rejects_a_frozen_tower(world, tmp_path):
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text((ROOT / "configs/model/tiny.yaml").read_text().replace("frozen: false", "frozen: true"))
    code = tower.main(["--config", str(ROOT / "configs/train/demo_tower.yaml"), "--set", f"model={frozen}",
                       "--set", f"train=[{world / 'train' / 'captions.json'}]", "--set", "max_steps=1",
                       "--set", f"output_dir={tmp_path / 'out'}"])
    assert code == 2


def test_the_sft_stage_records_its_answer_padding_and_needs_prefix_dlm_for_a_causal_prompt(world):
    conversations = [e["conversations"] for e in json.loads((world / "train" / "qa.json").read_text())[:4]]
    base = [f"data.tokenizer={world / 'tokenizer'}", "init_vision_from=null"]
    for padding, mask_tail in (("mask", True), ("eos", False)):
        cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", [*base, f"data.sft_padding={padding}"])
        _, model = build(cfg, conversations)
        assert model.config.sampler["mask_tail"] is mask_tail  # infer.py's sampler reads it from config.json
    cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", [*base, "prefix_dlm=false"])
    with pytest.raises(ConfigError, match="set prefix_dlm: true"):
        build(cfg)


def test_a_bf16_model_folder_trains_in_fp32_when_the_run_does(world, tmp_path, capsys):
    """precision auto on CPU (or fp32) with a bf16 init_from (mmdlm-convert-llada-v's default): the weights are
    cast to fp32, as DeepSpeed's bf16 mode keeps fp32 masters; left in bf16, a 1e-5 step rounds away."""
    base = [f"data.tokenizer={world / 'tokenizer'}", "init_vision_from=null"]
    tokenizer, model = build(load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", base))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    saved = model.state_dict()
    for precision in ("auto", "fp32", "bf16"):  # auto: fp32 on CPU, bf16 on a GPU
        cfg = load_config(TrainConfig, ROOT / "configs/train/finetune.yaml",
                          [*base, f"init_from={tmp_path / 'bf16'}", f"precision={precision}"])
        dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
        _, loaded = build(cfg)
        assert {p.dtype for p in loaded.parameters()} == {dtype}, precision
        assert all(torch.equal(value.to(dtype), saved[key].to(dtype)) for key, value in loaded.state_dict().items())
        note = "note: init_from holds torch.bfloat16 weights; precision=" in capsys.readouterr().err
        assert note is (dtype == torch.float32)
