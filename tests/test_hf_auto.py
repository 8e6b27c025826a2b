"""transformers' Auto classes: after `import mmdlm` alone, AutoConfig / AutoModel load an mmdlm folder."""

import json
import subprocess
import sys

import torch

from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.multimodal import build_model

VISION = dict(backend="timm", model="resnet18", image_size=32, feature_layer=2)
LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=64)

# A fresh interpreter, so that nothing but `import mmdlm` can have registered the model types.
LOAD = """
import json, sys, torch
import mmdlm
from transformers import AutoConfig, AutoModel

folder, probe, again = sys.argv[1:]
probe = torch.load(probe)
config = AutoConfig.from_pretrained(folder)
model = AutoModel.from_pretrained(folder)
with torch.no_grad():
    logits = model(*probe["inputs"]) if probe["inputs"][1] is not None else model(probe["inputs"][0])
model.save_pretrained(again)  # and what it writes loads back the same
reloaded = AutoModel.from_pretrained(again)
state = model.state_dict()
print(json.dumps({
    "config": type(config).__name__, "model": type(model).__name__, "training": model.training,
    "weights_equal": state.keys() == probe["state"].keys()
    and all(torch.equal(v, probe["state"][k]) for k, v in state.items()),
    "logits_equal": torch.equal(logits, probe["logits"]),
    "again_equal": all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items()),
}))
"""


def load_in_fresh_process(folder, inputs, logits, state, tmp_path) -> dict:
    torch.save({"inputs": inputs, "logits": logits, "state": state}, tmp_path / "probe.pt")
    out = subprocess.run([sys.executable, "-c", LOAD, str(folder), str(tmp_path / "probe.pt"), str(tmp_path / "again")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_auto_classes_round_trip_a_model_folder(tmp_path):
    torch.manual_seed(0)
    model = build_model(dict(vision=VISION, lm=LM), vocab_size=300, image_token_id=299, mask_token_id=298).eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.tensor([[299] * model.num_image_tokens + [5, 6, 7, 298]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = model(ids, pixels)
    got = load_in_fresh_process(tmp_path / "model", (ids, pixels), logits, model.state_dict(), tmp_path)
    assert got == {"config": "MMDLMConfig", "model": "MMDLM", "training": False, "weights_equal": True,
                   "logits_equal": True, "again_equal": True}


def test_auto_classes_load_a_language_model_folder(tmp_path):
    torch.manual_seed(0)
    lm = DiffusionLM(DLMConfig(vocab_size=100, **LM)).eval()
    lm.save_pretrained(tmp_path / "lm")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = lm(ids)
    got = load_in_fresh_process(tmp_path / "lm", (ids, None), logits, lm.state_dict(), tmp_path)
    assert got == {"config": "DLMConfig", "model": "DiffusionLM", "training": False, "weights_equal": True,
                   "logits_equal": True, "again_equal": True}


def test_dtype_keywords_as_transformers_users_write_them(tmp_path):
    import pytest
    from transformers import AutoModel

    from mmdlm.config import ConfigError
    from mmdlm.multimodal import MMDLM

    build_model(dict(vision=VISION, lm=LM), vocab_size=300, image_token_id=299, mask_token_id=298).save_pretrained(
        tmp_path / "model")
    cases = [({"dtype": "auto"}, torch.float32), ({"torch_dtype": torch.bfloat16}, torch.bfloat16),
             ({"dtype": "bfloat16"}, torch.bfloat16), ({}, torch.float32)]
    for kwargs, dtype in cases:
        assert {p.dtype for p in AutoModel.from_pretrained(tmp_path / "model", **kwargs).parameters()} == {dtype}
    with pytest.raises(ConfigError, match="dtype='half-ish': give a torch dtype"):
        MMDLM.from_pretrained(tmp_path / "model", dtype="half-ish")


def test_a_folder_of_another_kind_says_what_it_is(tmp_path):
    import pytest

    from mmdlm.config import ConfigError
    from mmdlm.multimodal import MMDLM

    lm = DiffusionLM(DLMConfig(vocab_size=100, **LM))
    lm.save_pretrained(tmp_path / "lm")  # model_type mmdlm_lm: what mmdlm-convert-llada writes
    with pytest.raises(ConfigError, match=r"model_type 'mmdlm_lm' is a language model alone: sample it with"):
        MMDLM.from_pretrained(tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, "model_type": "llava_llada"}))
    with pytest.raises(ConfigError, match="an original LLaDA-V checkpoint: convert it with mmdlm-convert-llada-v"):
        MMDLM.from_pretrained(tmp_path / "lm")


def test_weight_files_are_as_readable_as_the_umask_says(tmp_path):
    """safetensors writes 0600 whatever the umask: a model shared on a cluster must be readable by the group."""
    import os
    import stat

    from mmdlm.train.export import write_model_folder

    old = os.umask(0o022)
    try:
        model = build_model(dict(vision=VISION, lm=LM), vocab_size=300, image_token_id=299, mask_token_id=298)
        model.save_pretrained(tmp_path / "saved")
        model.lm.save_pretrained(tmp_path / "lm")
        write_model_folder(model.config, model.state_dict(), None, tmp_path / "exported")
    finally:
        os.umask(old)
    for folder in ("saved", "lm", "exported"):
        files = list((tmp_path / folder).glob("*.safetensors"))
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files), folder
