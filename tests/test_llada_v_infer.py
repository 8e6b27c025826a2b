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


def llada_v_prompt(sample: dict, image_id: int) -> list[int]:
    """Return LLaDA-V's prompt ids of a fixture sample with its image (-200) expanded to a run of `image_id`."""
    run = [image_id] * sample["num_image_feature_tokens"]
    return [t for token in sample["input_ids"] for t in (run if token == -200 else [token])]


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
    want = llada_v_prompt(sample, answerer.special.image)
    assert answerer.prompt_ids(turns, [image]) == want  # system turn, chat template, image run: LLaDA-V's
    s = answerer.special
    vanilla = SamplerConfig(gen_length=8, block_length=8, steps=8, eos_id=s.eos, stop_ids=(s.eot,),
                            **answerer.sampler_defaults)
    answer = answerer.answer([turns], [[image]], vanilla)[0]
    assert answer.pieces == [answerer.tokenizer.decode([t]) for t in sample["generated_ids"]]
    assert answer.forward_passes == 8


@pytest.mark.parametrize("k", [0, 1])
def test_fine_tuning_prompts_are_llada_v_s_and_infer_s(converted, llada_v_folder, spec, k):
    """A training sample starts with exactly LLaDA-V's prompt ids (its system turn first), which infer.py gives
    too; a conversation with its own system turn keeps that one alone."""
    from pathlib import Path

    from mmdlm.data.collate import Collator
    from mmdlm.data.tokenizer import load_tokenizer
    from mmdlm.multimodal import MMDLM
    from mmdlm.train.config import load_train_config
    from mmdlm.train.train import make_collator

    sample = spec["samples"][k]
    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs/train/finetune.yaml",
                            [f"init_from={converted}", "data.json=[train.json]", "data.max_length=512"])
    model, tokenizer = MMDLM.from_pretrained(converted), load_tokenizer(converted)
    collator = make_collator(cfg, tokenizer, model)  # as train.py makes it
    image = load_image(llada_v_folder / sample["image"])
    want = llada_v_prompt(sample, model.config.image_token_id)
    turns = [{"from": "human", "value": sample["question"]}, {"from": "gpt", "value": "A shape."}]
    batch = collator([{"images": [image], "conversations": turns}])
    assert batch["input_ids"][0, : len(want)].tolist() == want and batch["prompt_length"].tolist() == [len(want)]
    own = [{"from": "system", "value": "Answer in one word."}, *turns]
    plain = Collator(tokenizer, model.image_transform(), model.image_tokens, 512)  # no system prompt of its own
    assert torch.equal(collator([{"images": [image], "conversations": own}])["input_ids"],
                       plain([{"images": [image], "conversations": own}])["input_ids"])


def test_data_check_counts_a_model_folder_s_system_turn(converted, llada_v_folder, tmp_path, capsys):
    import shutil

    from mmdlm.data.check import LengthCheck
    from mmdlm.data.cli import main as data_main
    from mmdlm.data.tokenizer import load_tokenizer
    from mmdlm.llada_v import SYSTEM_PROMPT

    shutil.copy(llada_v_folder / "image_a.png", tmp_path / "image_a.png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A box."}]
    (tmp_path / "train.json").write_text(json.dumps([{"id": "0", "image": "image_a.png", "conversations": turns}]))
    tokenizer = load_tokenizer(converted)
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # the same tokenizer, no model config beside it
    plain, plain_prompt = LengthCheck(tokenizer, 0, 9).conversation(turns, [(64, 64)])
    full, full_prompt = LengthCheck(tokenizer, 0, 9, SYSTEM_PROMPT).conversation(turns, [(64, 64)])
    assert full_prompt > plain and full - full_prompt == plain - plain_prompt == len(tokenizer.encode("A box.")) + 1
    check = ["check", str(tmp_path / "train.json"), "--num-image-tokens", "9"]
    assert data_main([*check, "--max-length", str(plain), "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    assert data_main([*check, "--max-length", str(plain - 1), "--tokenizer", str(tmp_path / "tokenizer")]) == 1
    assert f"over-long: {plain} tokens > max_length {plain - 1} (trailing" in capsys.readouterr().out
    assert data_main([*check, "--max-length", str(plain), "--tokenizer", str(converted)]) == 1  # + the system turn
    assert f"over-long: the prompt alone is {full_prompt} tokens, no room" in capsys.readouterr().out


@pytest.mark.parametrize("options", [
    [], ["--threshold", "0", "--steps", "8", "--gen-length", "8", "--no-early-stop"], ["--cache", "prefix"],
    ["--cache", "block"], ["--factor", "2"], ["--confidence", "margin"], ["--temperature", "0.5"],
])
def test_every_sampler_and_cache_option_answers(converted, llada_v_folder, options, capsys):
    image = llada_v_folder / "image_b.png"
    assert main(["--model", str(converted), "--image", str(image), "--question", "Describe it.", *options]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_batched_anyres_images_equal_alone(converted, llada_v_folder):
    """Images of different sizes have runs of different lengths; a batch left-pads them and changes nothing."""
    answerer = Answerer(*load_model(converted))
    s = answerer.special
    config = SamplerConfig(gen_length=8, block_length=8, threshold=0.9, early_stop=True, eos_id=s.eos,
                           stop_ids=(s.eot,), **answerer.sampler_defaults)
    turns = [[{"from": "human", "value": "<image>\nWhat is it?"}]] * 2
    images = [[load_image(llada_v_folder / "image_a.png")], [load_image(llada_v_folder / "image_b.png")]]
    together = answerer.answer(turns, images, config)
    for k in range(2):
        alone = answerer.answer(turns[k : k + 1], images[k : k + 1], config)[0]
        assert alone.pieces == together[k].pieces
    assert torch.is_tensor(answerer.transform(images[1][0])) and answerer.transform(images[1][0]).shape[0] == 9


@pytest.mark.slow
def test_fine_tune_converted_model(converted, llada_v_folder, tmp_path):
    """configs/train/finetune_llada_v.yaml as shipped (ZeRO-3, activation checkpointing, LLaDA-V's recipe) but
    for its size: anyres images of two sizes in one batch, then answers from the export.

    Full fine-tuning only: LoRA is the same path with adapters on the LM (test_finetune.py).
    """
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    for name in ("image_a.png", "image_b.png"):
        shutil.copy(llada_v_folder / name, tmp_path / name)
    entries = [{"id": str(k), "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": answer}]}
        for k, (name, answer) in enumerate([("image_a.png", "A red box."), ("image_b.png", "A triangle.")] * 2)]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    root = Path(__file__).resolve().parents[1]
    before = load_file(str(converted / "model.safetensors"))
    out = tmp_path / "full"
    sets = [f"init_from={converted}", f"data.json=[{tmp_path / 'train.json'}]", "max_steps=2", "save_every=0",
            "micro_batch_size=4", "grad_accum=1", "data.num_workers=0", f"output_dir={out}"]  # the rest: as shipped
    cmd = [sys.executable, "-m", "mmdlm.train", "--config", "configs/train/finetune_llada_v.yaml"]
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *[a for s in sets for a in ("--set", s)]], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    after = load_file(str(out / "model" / "model.safetensors"))
    assert not torch.equal(after["lm.layers.0.attn.q_proj.weight"], before["lm.layers.0.attn.q_proj.weight"])
    assert torch.equal(after["vision.backbone.encoder.layers.1.mlp.fc1.weight"],
                       before["vision.backbone.encoder.layers.1.mlp.fc1.weight"])  # the pretrained tower: frozen
    # Still prompted and sampled as LLaDA-V: its system turn, its suppressed ids, no masks after the answer's EOS.
    was, now = (json.loads((folder / "config.json").read_text()) for folder in (converted, out / "model"))
    assert now["system_prompt"] == was["system_prompt"] and now["sampler"]["suppress_ids"] == [291, 290, 293, 294]
    assert now["sampler"]["mask_tail"] is False
    image = llada_v_folder / "image_a.png"
    assert main(["--model", str(out / "model"), "--image", str(image), "--question", "What?"]) == 0


def test_the_newline_is_read_only_inside_the_projector_s_forward(converted, llada_v_folder):
    """ZeRO-3 holds a module's parameters only while its forward runs (an empty placeholder otherwise): merging
    any-resolution images, and the blank image of a text-only training batch, must not read the newline outside."""
    model, _ = load_model(converted)
    images = [load_image(llada_v_folder / name) for name in ("image_a.png", "image_b.png")]
    pixels = torch.cat([model.image_transform()(image) for image in images])
    sizes = torch.tensor([image.size for image in images])
    with torch.no_grad():
        want = model.encode_images(pixels, sizes)
    newline = model.projector.image_newline
    full, placeholder = newline.data, torch.empty(0)
    newline.data = placeholder  # as ZeRO-3 partitions it; gathered by the projector's forward, then released
    model.projector.register_forward_pre_hook(lambda module, args: setattr(newline, "data", full))
    model.projector.register_forward_hook(lambda module, args, out: setattr(newline, "data", placeholder))
    with torch.no_grad():
        assert torch.equal(model.encode_images(pixels, sizes), want)
    model.train()
    blank = model.encode_images(torch.zeros(0, *pixels.shape[1:]), torch.zeros(0, 2, dtype=torch.long))
    assert blank.shape[0] == 0 and blank.requires_grad


def test_collator_sizes_each_anyres_run(converted, llada_v_folder):
    from mmdlm.data.collate import Collator
    from mmdlm.data.tokenizer import load_tokenizer

    model, tokenizer = load_model(converted)
    collator = Collator(load_tokenizer(converted), model.image_transform(), model.image_tokens, max_length=256)
    images = [load_image(llada_v_folder / name) for name in ("image_a.png", "image_b.png")]
    batch = collator([{"images": [image], "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                           {"from": "gpt", "value": "A shape."}]} for image in images])
    assert batch["image_sizes"].tolist() == [[300, 200], [700, 420]]
    assert batch["pixel_values"].shape == (3 + 9, 3, 224, 224)  # base view + 2x1 tiles, base view + 4x2 tiles
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [44, 82]
    with torch.no_grad():  # and the model takes the batch as it is
        logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                       image_sizes=batch["image_sizes"])
    assert logits.shape == (*batch["input_ids"].shape, 300)
