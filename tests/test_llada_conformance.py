"""The LM reproduces LLaDA's reference logits and samples exactly (../shared/fixtures)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdlm.config import ConfigError
from mmdlm.llada import llada_config, load_llada, main
from mmdlm.model import DiffusionLM
from mmdlm.sampling import SamplerConfig, generate

MODELS = ["llada-tiny-mha", "llada-tiny-gqa"]


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_reference(llada_fixtures, name):
    model = load_llada(llada_fixtures / name)
    expected = load_file(str(llada_fixtures / name / "expected.safetensors"))
    with torch.no_grad():
        logits = model(expected["ids"])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_samples_match_reference(llada_fixtures, name):
    model = load_llada(llada_fixtures / name)
    prompt = load_file(str(llada_fixtures / name / "expected.safetensors"))["prompt"]
    spec = json.loads((llada_fixtures / name / "samples.json").read_text())
    for case, c in spec["cases"].items():
        args = dict(c["args"])
        seed = args.pop("seed")
        if seed is not None:
            torch.manual_seed(seed)
        mask = torch.ones_like(prompt) if case == "cfg1" else None
        out = generate(model, prompt, mask_id=spec["mask_id"], config=SamplerConfig(**args), attention_mask=mask)
        assert out.tokens[0].tolist() == c["expected_generated"], case
        assert out.forward_passes == args["steps"]


def test_samples_from_embeddings_equal_samples_from_ids(llada_fixtures):
    """The multimodal path hands the sampler embeddings; with the same prefix it must agree."""
    model = load_llada(llada_fixtures / "llada-tiny-gqa")
    prompt = load_file(str(llada_fixtures / "llada-tiny-gqa" / "expected.safetensors"))["prompt"]
    cfg = SamplerConfig(steps=8, gen_length=16, block_length=8, cfg_scale=1.0)
    by_ids = generate(model, prompt, mask_id=500, config=cfg).tokens
    embeds = model.get_input_embeddings()(prompt)
    by_embeds = generate(model, prefix_embeds=embeds, mask_id=500, config=cfg).tokens
    assert torch.equal(by_ids, by_embeds)


def test_convert_command_round_trip(llada_fixtures, tmp_path):
    src = llada_fixtures / "llada-tiny-gqa"
    assert main([str(src), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    converted = DiffusionLM.from_pretrained(tmp_path / "out")
    expected = load_file(str(src / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(converted(expected["ids"]), expected["logits"], atol=1e-5, rtol=0)


def test_checkpoint_with_wrong_keys_is_a_clear_error(llada_fixtures, tmp_path):
    src = llada_fixtures / "llada-tiny-mha"
    state = load_file(str(src / "model.safetensors"))
    state["model.transformer.blocks.0.extra.weight"] = torch.zeros(1)
    del state["model.transformer.blocks.1.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"blocks\.0\.extra.*layers\.1\.mlp\.up_proj"):
        load_llada(tmp_path)
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2


def test_unsupported_llada_options_are_refused():
    with pytest.raises(ValueError, match="include_bias"):
        llada_config({"d_model": 64, "n_heads": 4, "n_layers": 1, "include_bias": True})
