"""The LM reproduces LLaDA's reference logits and samples exactly (../shared/fixtures)."""

import hashlib
import json
import shutil

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


@pytest.mark.parametrize("field, value, supported", [
    ("scale_logits", True, "false"), ("rope", False, "true"), ("alibi", True, "false"),
    ("input_emb_norm", True, "false"), ("clip_qkv", 8.0, "null"), ("layer_norm_with_affine", False, "true"),
])
def test_options_that_change_the_math_are_refused(llada_fixtures, field, value, supported):
    config = json.loads((llada_fixtures / "llada-tiny-mha" / "config.json").read_text())
    llada_config(config)  # the fixtures' own values are supported
    with pytest.raises(ConfigError, match=rf"{field}={json.dumps(value)} is not supported \(supported: {supported}"):
        llada_config({**config, field: value})


def convert_lines(argv, capsys) -> tuple[int, str]:
    """Return main(argv)'s exit code and its stderr, which must be exactly one line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return code, err


def digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_convert_never_writes_into_the_source_or_a_used_folder(llada_fixtures, tmp_path, capsys):
    src = tmp_path / "llada"
    shutil.copytree(llada_fixtures / "llada-tiny-mha", src)
    before = digest(src)
    for dst in (src, tmp_path / "llada" / ".." / "llada"):
        assert convert_lines([str(src), str(dst)], capsys) == (2, f"error: {dst} is the source folder: give a new "
                                                              "output folder (the source is never overwritten)\n")
    assert digest(src) == before
    (tmp_path / "empty").mkdir()  # an empty folder is a new folder
    assert main([str(src), str(tmp_path / "empty"), "--dtype", "float32"]) == 0
    first = digest(tmp_path / "empty")
    capsys.readouterr()
    code, err = convert_lines([str(src), str(tmp_path / "empty")], capsys)  # an earlier conversion's folder
    assert code == 2 and "is not empty (it holds config.json, model.safetensors)" in err
    assert digest(tmp_path / "empty") == first
    (tmp_path / "file").write_text("x")
    code, err = convert_lines([str(src), str(tmp_path / "file")], capsys)
    assert code == 2 and "file is a file: give a new or empty output folder" in err


def test_a_folder_of_another_kind_names_the_command(llada_fixtures, tmp_path, capsys):
    code, err = convert_lines([str(llada_fixtures / "llada-v-tiny"), str(tmp_path / "a")], capsys)
    assert code == 2 and "model_type='llava_llada' is an original LLaDA-V checkpoint: convert it with " \
        "mmdlm-convert-llada-v" in err
    assert main([str(llada_fixtures / "llada-tiny-mha"), str(tmp_path / "converted"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    code, err = convert_lines([str(tmp_path / "converted"), str(tmp_path / "b")], capsys)
    assert code == 2 and "model_type='mmdlm_lm' is an mmdlm language model folder (already converted): nothing to " \
        "convert" in err
    not_llada = tmp_path / "sizes"
    not_llada.mkdir()
    (not_llada / "config.json").write_text(json.dumps({"n_heads": 4, "n_layers": 2}))
    code, err = convert_lines([str(not_llada), str(tmp_path / "c")], capsys)
    assert code == 2 and "no d_model, mlp_hidden_size, vocab_size: not a LLaDA config" in err


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace('"d_model": 64', '"d_model": 128'), "weight(s) do not fit config.json"),
    (lambda text: text[: len(text) // 2], "not valid JSON"),
])
def test_a_config_that_disagrees_or_is_cut_is_one_line(llada_fixtures, tmp_path, capsys, edit, message):
    src = llada_fixtures / "llada-tiny-mha"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(edit((src / "config.json").read_text()))
    (tmp_path / "src" / "model.safetensors").symlink_to(src / "model.safetensors")
    code, err = convert_lines([str(tmp_path / "src"), str(tmp_path / "out")], capsys)
    assert code == 2 and message in err


def test_sharded_checkpoints_follow_the_index(llada_fixtures, tmp_path, capsys):
    src = llada_fixtures / "llada-tiny-gqa"
    state = load_file(str(src / "model.safetensors"))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {key: names[k % 2] for k, key in enumerate(sorted(state))}
    for name in names:
        save_file({key: t for key, t in state.items() if weight_map[key] == name}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    assert main([str(tmp_path), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    (tmp_path / names[1]).unlink()
    code, err = convert_lines([str(tmp_path), str(tmp_path / "out2")], capsys)
    assert code == 2 and f"lists shards that are not in the folder: ['{names[1]}']" in err


def test_convert_notes_a_missing_tokenizer_and_counts_parameters(llada_fixtures, tmp_path, capsys):
    src = tmp_path / "llada"
    shutil.copytree(llada_fixtures / "llada-tiny-mha", src)
    n = sum(p.numel() for p in load_llada(src).parameters())
    assert main([str(src), str(tmp_path / "a"), "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    assert f"note: no tokenizer files in {src}: copy LLaDA's tokenizer.json etc. into {tmp_path / 'a'}" in err
    assert out == f"wrote {tmp_path / 'a'}: {n:,} parameters, float32\n" and n > 100_000
    (src / "tokenizer.json").write_text("{}")
    (src / "special_tokens_map.json").write_text("{}")
    assert main([str(src), str(tmp_path / "b"), "--dtype", "float32"]) == 0
    assert "no tokenizer files" not in capsys.readouterr().err
    assert (tmp_path / "b" / "tokenizer.json").is_file() and (tmp_path / "b" / "special_tokens_map.json").is_file()
