"""A converted LLaDA-V checkpoint reproduces LLaDA-V's own outputs stage by stage (../shared/fixtures/llada-v-tiny).

Tolerances are the fixture README's: pixel values exact, features / projector / embeddings within
1e-5, logits within 1e-4, generated ids exactly equal.
"""

import hashlib
import json
import os
import shutil
import stat
from argparse import Namespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmdlm.llada_v import REAL_IDS, ConversionError, convert, main, map_key
from mmdlm.multimodal import MMDLM
from mmdlm.sampling import SamplerConfig, generate

TINY_IDS = ["--mask-id", "292", "--suppress-ids", "291", "290", "293", "294"]
CLOSE = dict(atol=1e-5, rtol=1e-5)
# fp32 through the tower's layers: the CPU's matmul kernels round differently (an AMD EPYC here
# differs from the fixture's machine by 1.5e-5 in one of 4,608 vision features), so 1e-5 is too tight.
TOWER_CLOSE = dict(atol=5e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def fixture(llada_fixtures):
    return llada_fixtures / "llada-v-tiny"


@pytest.fixture(scope="module")
def spec(fixture):
    return json.loads((fixture / "samples.json").read_text())


@pytest.fixture(scope="module")
def expected(fixture):
    return load_file(str(fixture / "expected.safetensors"))


@pytest.fixture(scope="module")
def model(fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("llada-v") / "tiny"
    assert main([str(fixture), str(out), "--dtype", "float32", *TINY_IDS]) == 0
    return MMDLM.from_pretrained(out)


def prompt_ids(model, sample, ids_key="input_ids"):
    """Return the sample's ids [1, L] with LLaDA-V's -200 placeholder expanded to the model's image run."""
    ids = []
    for token in sample[ids_key]:
        ids += [model.config.image_token_id] * model.image_tokens(sample["image_size_wh"]) if token == -200 else [token]
    return torch.tensor([ids])


def pixels(model, fixture, sample):
    image = Image.open(fixture / sample["image"])
    assert hashlib.sha256((fixture / sample["image"]).read_bytes()).hexdigest() == sample["image_sha256"]
    return model.image_transform()(image.convert("RGB")), torch.tensor([image.size])


def test_converted_config_is_llada_v(model, spec):
    assert model.config.vision["anyres_max"] == 4 and model.config.projector["merge"] == "spatial_unpad"
    assert model.config.sampler == {"suppress_ids": [291, 290, 293, 294], "float64_confidence": True}
    assert len(model.vision.backbone.encoder.layers) == 2  # 3 in the tower's config, the last one deleted
    assert model.lm.config.mask_token_id == 292 and model.lm.config.vocab_size == 300


@pytest.mark.parametrize("k", [0, 1])
def test_preprocessing_and_vision_stages(model, fixture, spec, expected, k):
    sample = spec["samples"][k]
    pixel_values, sizes = pixels(model, fixture, sample)
    assert model.anyres.grid(sizes[0].tolist()) == tuple(sample["anyres_grid_wh"])
    assert torch.equal(pixel_values, expected[f"sample{k}.pixel_values"])  # exact: the same PIL resizes
    with torch.no_grad():
        features = model.vision(pixel_values)
        torch.testing.assert_close(features, expected[f"sample{k}.vision_features"], **TOWER_CLOSE)
        projected = model.projector(features)
        torch.testing.assert_close(projected, expected[f"sample{k}.projector_output"], **TOWER_CLOSE)
        merged = model.encode_images(pixel_values, sizes)
    assert merged.shape[0] == model.image_tokens(sample["image_size_wh"]) == sample["num_image_feature_tokens"]
    torch.testing.assert_close(merged, expected[f"sample{k}.image_features_merged"], **TOWER_CLOSE)


@pytest.mark.parametrize("k", [0, 1])
def test_prompt_embeddings_logits_and_generate(model, fixture, spec, expected, k):
    sample = spec["samples"][k]
    pixel_values, sizes = pixels(model, fixture, sample)
    with torch.no_grad():
        embeds = model.embed(prompt_ids(model, sample), pixel_values, image_sizes=sizes)
        torch.testing.assert_close(embeds[0], expected[f"sample{k}.prompt_inputs_embeds"], **CLOSE)
        noisy = model.embed(prompt_ids(model, sample, "denoise_input_ids"), pixel_values, image_sizes=sizes)
        torch.testing.assert_close(noisy[0], expected[f"sample{k}.denoise_inputs_embeds"], **CLOSE)
        torch.testing.assert_close(model.lm(inputs_embeds=noisy)[0], expected[f"sample{k}.denoise_logits"],
                                   atol=1e-4, rtol=0)
    kwargs = dict(spec["generate_kwargs"])
    mask_id = kwargs.pop("mask_id")
    config = SamplerConfig(**kwargs, **model.config.sampler)
    out = generate(model.lm, prefix_embeds=embeds, mask_id=mask_id, config=config)
    assert out.tokens[0].tolist() == sample["generated_ids"]
    assert out.forward_passes == kwargs["steps"]


def test_suppressed_ids_are_never_chosen_at_masked_positions(model):
    """The rule, on its own: logits that favour a suppressed id still commit another one."""
    favour = torch.zeros(300)
    favour[291] = 50.0  # EOS would win everywhere
    favour[7] = 10.0

    def lm(inputs_embeds=None, logits_from=0, **_):
        return favour.expand(inputs_embeds.shape[0], inputs_embeds.shape[1] - logits_from, 300)

    lm.get_input_embeddings = model.lm.get_input_embeddings
    prefix = model.lm.get_input_embeddings()(torch.tensor([[290, 65]]))
    plain = generate(lm, prefix_embeds=prefix, mask_id=292, config=SamplerConfig(gen_length=4, block_length=4, steps=4))
    rule = SamplerConfig(gen_length=4, block_length=4, steps=4, **model.config.sampler)
    assert plain.tokens.tolist() == [[291] * 4]
    assert generate(lm, prefix_embeds=prefix, mask_id=292, config=rule).tokens.tolist() == [[7] * 4]


def test_every_key_is_consumed_or_named(fixture, tmp_path):
    state = load_file(str(fixture / "model.safetensors"))
    state["model.mm_projector.4.weight"] = torch.zeros(1)  # a third projector layer the config does not have
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    for name in ("config.json",):
        (tmp_path / name).write_text((fixture / name).read_text())
    (tmp_path / "siglip-tiny").mkdir()
    (tmp_path / "siglip-tiny" / "config.json").write_text((fixture / "siglip-tiny" / "config.json").read_text())
    args = Namespace(dtype="float32", mask_id=292, suppress_ids=[291], image_token_id=None)
    with pytest.raises(ConversionError) as error:
        convert(tmp_path, tmp_path / "out", args)
    assert "model.mm_projector.4.weight" in str(error.value)
    assert "(missing) lm.layers.1.mlp.up_proj.weight" in str(error.value)
    assert not list((tmp_path / "out").glob("model*.safetensors"))  # nothing half-written is left behind
    assert main([str(tmp_path), str(tmp_path / "out"), *TINY_IDS]) == 2


def test_key_table_drops_only_the_unused_post_layernorm():
    siglip = "model.vision_tower.vision_tower.vision_model."
    assert map_key(siglip + "post_layernorm.weight") is None
    assert map_key(siglip + "encoder.layers.25.mlp.fc1.bias") == "vision.backbone.encoder.layers.25.mlp.fc1.bias"
    assert map_key("model.layers.31.post_attention_layernorm.weight") == "lm.layers.31.mlp_norm.weight"
    assert map_key("model.image_newline") == "projector.image_newline"
    with pytest.raises(KeyError):
        map_key(siglip + "head.mlp.fc1.weight")  # upstream has no head: a checkpoint with one is not LLaDA-V's


def test_real_ids_outside_a_small_vocabulary_are_a_clear_error(fixture, tmp_path, capsys):
    assert main([str(fixture), str(tmp_path / "out")]) == 2
    assert f"mask id {REAL_IDS['mask']} is outside vocab_size=300" in capsys.readouterr().err


def error_line(argv, capsys) -> str:
    """Return the one line main(argv) prints on stderr when it refuses (exit code 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_convert_never_writes_into_the_source_or_a_used_folder(fixture, tmp_path, capsys):
    src = tmp_path / "llada-v"
    shutil.copytree(fixture, src)
    before = {f: f.read_bytes() for f in src.rglob("*") if f.is_file()}
    assert "is the source folder" in error_line([str(src), str(tmp_path / "." / "llada-v"), *TINY_IDS], capsys)
    assert {f: f.read_bytes() for f in src.rglob("*") if f.is_file()} == before
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "model.safetensors").write_bytes(b"an earlier conversion's weights")
    err = error_line([str(src), str(tmp_path / "earlier"), *TINY_IDS], capsys)
    assert "earlier is not empty (it holds model.safetensors): give a new or empty output folder" in err
    assert "is a file: give a new or empty output folder" in error_line(
        [str(src), str(src / "config.json"), *TINY_IDS], capsys)


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "num_key_value_heads": 3}, "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "config.json: no hidden_size"),
    (lambda c: json.dumps(c)[:200], "config.json: not valid JSON"),
    (lambda c: {**c, "model_type": "llada"}, "original LLaDA checkpoint: convert it with mmdlm-convert-llada"),
    (lambda c: {**c, "model_type": "mmdlm"}, "mmdlm vision-language model folder (already converted): nothing to"),
])
def test_a_bad_config_is_one_line(fixture, tmp_path, capsys, edit, message):
    (tmp_path / "src").mkdir()
    config = edit(json.loads((fixture / "config.json").read_text()))
    (tmp_path / "src" / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (tmp_path / "src" / "model.safetensors").symlink_to(fixture / "model.safetensors")
    (tmp_path / "src" / "siglip-tiny").symlink_to(fixture / "siglip-tiny")
    assert message in error_line([str(tmp_path / "src"), str(tmp_path / "out"), *TINY_IDS], capsys)


def test_a_missing_tokenizer_is_noted(fixture, llada_v_folder, tmp_path, capsys):
    assert main([str(fixture), str(tmp_path / "a"), "--dtype", "float32", *TINY_IDS]) == 0
    note = f"note: no tokenizer files in {fixture}: copy LLaDA-V's tokenizer.json etc. into {tmp_path / 'a'} before"
    assert note in capsys.readouterr().err
    assert main([str(llada_v_folder), str(tmp_path / "b"), "--dtype", "float32"]) == 0
    assert "no tokenizer files" not in capsys.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "b").glob("*.safetensors"):  # readable as any file the umask lets be (not 0600)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
