"""A converted LLaDA-V folder (tokenizer included) answers through infer.py like any model folder."""

import json

import pytest
import torch

from mmdlm.infer.infer import Answerer, load_image, load_model, main
from mmdlm.llada_v import main as convert_main
from mmdlm.sampling import SamplerConfig


@pytest.fixture(scope="module")
def converted(llada_v_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("llada-v-infer") / "model"
    assert convert_main([str(llada_v_folder), str(out), "--dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="module")
def spec(llada_v_folder):
    return json.loads((llada_v_folder / "samples.json").read_text())


def test_ids_come_from_the_tokenizer(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["sampler"]["suppress_ids"] == [291, 290, 293, 294]  # EOS, BOS, <|start/end_header_id|>
    assert config["lm"]["mask_token_id"] == 292
    assert config["image_token_id"] == 296  # <image> added after the tokenizer's last token, inside vocab 300


@pytest.mark.parametrize("k", [0, 1])
def test_prompt_and_answer_equal_llada_v(converted, llada_v_folder, spec, k):
    sample = spec["samples"][k]
    answerer = Answerer(*load_model(converted))
    image = load_image(llada_v_folder / sample["image"])
    turns = [{"from": "human", "value": sample["question"]}]
    run = [answerer.special.image] * sample["num_image_feature_tokens"]
    want = [t for token in sample["input_ids"] for t in (run if token == -200 else [token])]
    assert answerer.prompt_ids(turns, [image]) == want  # system turn, chat template, image run: LLaDA-V's
    s = answerer.special
    vanilla = SamplerConfig(gen_length=8, block_length=8, steps=8, eos_id=s.eos, stop_ids=(s.eot,),
                            **answerer.sampler_defaults)  # fmt: skip
    answer = answerer.answer([turns], [[image]], vanilla)[0]
    assert answer.pieces == [answerer.tokenizer.decode([t]) for t in sample["generated_ids"]]
    assert answer.forward_passes == 8


@pytest.mark.parametrize("options", [
    [], ["--threshold", "0", "--steps", "8", "--gen-length", "8", "--no-early-stop"], ["--cache", "prefix"],
    ["--cache", "block"], ["--factor", "2"], ["--confidence", "margin"], ["--temperature", "0.5"],
])  # fmt: skip
def test_every_sampler_and_cache_option_answers(converted, llada_v_folder, options, capsys):
    image = llada_v_folder / "image_b.png"
    assert main(["--model", str(converted), "--image", str(image), "--question", "Describe it.", *options]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_batched_anyres_images_equal_alone(converted, llada_v_folder):
    """Images of different sizes have runs of different lengths; a batch left-pads them and changes nothing."""
    answerer = Answerer(*load_model(converted))
    s = answerer.special
    config = SamplerConfig(gen_length=8, block_length=8, threshold=0.9, early_stop=True, eos_id=s.eos,
                           stop_ids=(s.eot,), **answerer.sampler_defaults)  # fmt: skip
    turns = [[{"from": "human", "value": "<image>\nWhat is it?"}]] * 2
    images = [[load_image(llada_v_folder / "image_a.png")], [load_image(llada_v_folder / "image_b.png")]]
    together = answerer.answer(turns, images, config)
    for k in range(2):
        alone = answerer.answer(turns[k : k + 1], images[k : k + 1], config)[0]
        assert alone.pieces == together[k].pieces
    assert torch.is_tensor(answerer.transform(images[1][0])) and answerer.transform(images[1][0]).shape[0] == 9
