"""infer.py: answers, captions, batches from a LLaVA file, templates, --show-steps, and bad input."""

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdlm.data.tokenizer import special_ids, train_demo_tokenizer
from mmdlm.encoders.tower import VisionConfig, VisionTower
from mmdlm.infer import infer
from mmdlm.infer.evaluate import main as evaluate_main
from mmdlm.infer.infer import TASK_DEFAULTS, Answerer, InferError, load_image, load_model, main, read_image
from mmdlm.infer.steps_viz import canvases, order_text, save_steps
from mmdlm.multimodal import build_model
from mmdlm.sampling import SamplerConfig

TEXTS = ["what colour is the circle?", "a red circle on the left", "Describe the image.", "how many squares"] * 20
VISION = dict(backend="timm", model="vit_tiny_patch16_224", image_size=32, overrides=dict(depth=2))
LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=96, initializer_range=0.3)


def saved_model(folder, attention: str, prefix_dlm: bool = False):
    """Return `folder` holding a random-init tiny model as training exports it: weights, config and tokenizer.

    `prefix_dlm`: as the demo recipe trains it (a causal prompt, shifted logits), so the prefix cache is exact."""
    tokenizer = train_demo_tokenizer(TEXTS, folder, vocab_size=300)
    special = special_ids(tokenizer)
    torch.manual_seed(0)
    extra = dict(prefix_attention="causal", shift_logits=True) if prefix_dlm else {}
    model = build_model(dict(vision=VISION, lm={**LM, "attention": attention, **extra}), vocab_size=len(tokenizer),
                        image_token_id=special.image, mask_token_id=special.mask)
    model.config.prefix_dlm = prefix_dlm
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model"), "bidirectional")


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory):
    """The autoregressive twin of model_dir: the same sizes with causal attention."""
    return saved_model(tmp_path_factory.mktemp("twin"), "causal")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for k in range(3):
        Image.effect_noise((40, 30 + 10 * k), 40 + 20 * k).convert("RGB").save(folder / f"{k}.png")
    return folder


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG that declares width x height pixels but holds almost no data (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "image not found"),
        (b"", "image file is empty"),
        (b"not an image at all", "is not an image Pillow can read"),
        (truncated_png(), "truncated or corrupt"),
        # over Pillow's own limit, which refuses it before its size is read: the same words as --max-image-pixels
        (png_header_only(20000, 20000), f"is 400000000 pixels, over the limit of {2 * Image.MAX_IMAGE_PIXELS}: "
                                        "downscale it first"),
        ("folder", "a.png is a folder: give an image file"),
    ],
)
def test_bad_images_are_one_clear_line(tmp_path, capsys, content, message):
    image = tmp_path / "a.png"
    if content == "folder":
        image.mkdir()
    elif content is not None:
        image.write_bytes(content)
    assert main(["--model", str(tmp_path), "--image", str(image), "--question", "What is it?"]) == 2
    line = one_error_line(capsys)
    assert message in line and "a.png" in line


@pytest.mark.parametrize("width, pixels", [(9000, "9000x9000"), (20000, "400000000")])
def test_an_image_over_the_pixel_limit_says_only_that(width, pixels):
    """Not "truncated or corrupt (... over the limit)", and Pillow's bomb error in the caller's limit's words."""
    with pytest.raises(InferError) as error:
        read_image(io.BytesIO(png_header_only(width, width)), "image 1", max_pixels=4096 * 4096)
    assert str(error.value) == f"image 1 is {pixels} pixels, over the limit of 16777216: downscale it first"


def test_empty_question_and_model_without_weights(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["--model", str(tmp_path), "--image", str(image), "--question", "  "]) == 2
    assert "--question is empty" in one_error_line(capsys)
    (tmp_path / "config.json").write_text("{}")
    assert main(["--model", str(tmp_path), "--image", str(image), "--question", "What?"]) == 2
    assert "holds no weights" in one_error_line(capsys)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["--model", str(tmp_path), "--image", str(image), "--question", "What?"]) == 2
    assert "model_type None is not an mmdlm model folder" in one_error_line(capsys)
    (tmp_path / "config.json").write_text('{"model_type": "mmdlm"}')
    assert main(["--model", str(tmp_path), "--image", str(image), "--question", "What?"]) == 2
    assert "no tokenizer.json" in one_error_line(capsys)
    assert main(["--model", str(tmp_path / "nowhere"), "--image", str(image), "--caption"]) == 2
    assert "model folder not found" in one_error_line(capsys)


def test_steps_rendering(tmp_path):
    pieces, steps = ["It", " is", " red", ".", "<eot>", "<eos>"], [0, 0, 2, 1, 3, -1]
    assert canvases(pieces, steps) == [(0, "It is___"), (1, "It is_._"), (2, "It is red._"), (3, "It is red.<eot>")]
    text = order_text(pieces, steps)
    assert "forward   2: +1 ' red'" in text and "1 tail positions never decoded" in text
    with Image.open(save_steps(tmp_path / "s.gif", pieces, steps)) as gif:
        assert gif.n_frames == 4
    with Image.open(save_steps(tmp_path / "s.png", pieces, steps)) as png:
        assert png.height > png.width / 10


def test_question_and_caption_answer_in_one_line(model_dir, images, capsys, tmp_path):
    image = str(images / "0.png")
    assert main(["--model", str(model_dir), "--image", image, "--question", "what colour is the circle?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    gif = tmp_path / "steps.gif"
    assert main(["--model", str(model_dir), "--image", image, "--caption", "--gen-length", "16", "--block-length",
                 "8", "--show-steps", str(gif)]) == 0
    assert f"unmasking order written to {gif}" in capsys.readouterr().err
    with Image.open(gif) as frames:
        assert frames.n_frames >= 2
    assert main(["--model", str(model_dir), "--image", image, "--caption", "--gen-length", "8", "--show-steps"]) == 0
    assert "forward   1: +" in capsys.readouterr().err


def test_llava_file_in_batches_then_evaluate(model_dir, images, tmp_path, capsys):
    entries = [{"id": f"q{k}", "image": f"{k}.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "what colour is the circle?" * (k + 1)},
        {"from": "gpt", "value": "red"}]} for k in range(3)]
    qa = images / "qa.json"
    qa.write_text(json.dumps(entries))
    questions_only = images / "questions.json"  # no reference answers: still answerable
    question = entries[0]["conversations"][:1]
    questions_only.write_text(json.dumps([{"id": "x", "image": "2.png", "conversations": question}]))
    assert main(["--model", str(model_dir), "--input", str(questions_only)]) == 0
    assert capsys.readouterr().out.startswith("x\t")
    out = tmp_path / "answers.jsonl"
    assert main(["--model", str(model_dir), "--input", str(qa), "--output", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(r["forward_passes"] >= 1 and r["tokens_per_forward"] >= 1 for r in rows)
    capsys.readouterr()
    assert evaluate_main(["--predictions", str(out), "--references", str(qa)]) == 0
    assert capsys.readouterr().out.startswith("vqa: ")


def test_a_killed_run_resumes_where_it_stopped(model_dir, images, tmp_path, capsys, monkeypatch):
    from mmdlm.infer import infer

    entries = [{"id": f"q{k}", "image": f"{k % 3}.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "what colour is the circle?" * (k % 2 + 1)}]} for k in range(5)]
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(entries))
    run = ["--model", str(model_dir), "--input", str(qa), "--image-folder", str(images), "--batch-size", "2"]
    straight, out = tmp_path / "straight.jsonl", tmp_path / "answers.jsonl"
    assert main([*run, "--output", str(straight)]) == 0
    batches, on_disk, answer_batch = [], [], infer.answer_batch

    def dies_in_the_second_batch(answerer, batch, config, canvas):
        batches.append([r["id"] for r in batch])
        if len(batches) == 2:
            on_disk.append(out.read_text())  # what a SIGKILL here would leave: the first batch, flushed
            with out.open("a") as file:
                file.write('{"id": "q2", "answ')  # the kill came in the middle of a line
            raise RuntimeError("killed")
        return answer_batch(answerer, batch, config, canvas)

    monkeypatch.setattr(infer, "answer_batch", dies_in_the_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        main([*run, "--output", str(out)])
    assert [json.loads(line)["id"] for line in on_disk[0].splitlines()] == ["q0", "q1"]
    monkeypatch.setattr(infer, "answer_batch", answer_batch)
    capsys.readouterr()
    assert main([*run, "--output", str(out), "--resume"]) == 0
    assert "resuming: 2 of 5 entries already answered" in capsys.readouterr().err
    keep = ("id", "answer", "forward_passes", "tokens_per_forward")
    rows = [{k: json.loads(line)[k] for k in keep} for line in out.read_text().splitlines()]
    assert rows == [{k: json.loads(line)[k] for k in keep} for line in straight.read_text().splitlines()]
    assert main([*run, "--output", str(out), "--resume"]) == 0  # nothing left to answer: the file as it was
    assert [{k: json.loads(line)[k] for k in keep} for line in out.read_text().splitlines()] == rows


def test_resume_needs_an_output_of_answers(model_dir, images, tmp_path, capsys):
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"id": "a", "image": "0.png", "conversations": [{"from": "human", "value": "hi"}]}]))
    run = ["--model", str(model_dir), "--input", str(qa), "--image-folder", str(images), "--resume"]
    assert main(run) == 2 and "--resume continues an --input run into its --output file" in one_error_line(capsys)
    other = tmp_path / "notes.txt"
    other.write_text("my notes\nmore\n")
    assert main([*run, "--output", str(other)]) == 2
    assert f"line 1 of {other} is not an answer written by infer.py" in one_error_line(capsys)
    assert other.read_text() == "my notes\nmore\n"  # left as it was


def test_formats_table(model_dir, images, tmp_path, capsys):
    """infer/formats.py: every format's answers saved and compared; one the machine cannot run leaves its row empty."""
    from mmdlm.infer import formats

    world = tmp_path / "world"
    world.mkdir()
    for k in range(3):
        (world / f"{k}.png").write_bytes((images / f"{k}.png").read_bytes())
    qa = [{"id": f"q{k}", "image": f"{k}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"}]}
        for k in range(3)]
    captions = [{"id": f"c{k}", "image": f"{k}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]}
        for k in range(2)]
    (world / "qa.json").write_text(json.dumps(qa))
    (world / "captions.json").write_text(json.dumps(captions))
    out = tmp_path / "answers"
    assert formats.main(["--model", str(model_dir), "--world", str(world), "--out", str(out), "--batch-size", "2",
                         "--formats", "fp32,bf16,bf16-static,bf16-fp8", "--device", "cpu", "--gen-length", "16"]) == 0
    captured = capsys.readouterr()
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in captured.out.splitlines()[2:]}
    assert list(rows) == ["fp32", "bf16", "bf16-static", "bf16-fp8"]
    assert rows["fp32"][1:3] == ["3/3 (3 with the same forwards)", "2/2 (2 with the same forwards)"]
    assert rows["bf16-static"][3:5] == rows["bf16"][3:5]  # the static path answers as eager does, forwards too
    assert rows["bf16"][3:5] == ["3/3 (3 with the same forwards)", "2/2 (2 with the same forwards)"]
    assert rows["bf16-fp8"] == ["-"] * 5 and "needs a GPU of compute capability 8.9" in captured.err
    saved = sorted(path.name for path in out.iterdir())
    assert saved == sorted(f"{f}_{t}.jsonl" for f in ("fp32", "bf16", "bf16-static") for t in ("qa", "captions"))
    with pytest.raises(SystemExit):
        formats.main(["--model", str(model_dir), "--world", str(world), "--out", str(out), "--formats", "fp16"])


def test_formats_table_survives_a_failing_format(tmp_path, capsys, monkeypatch):
    """A run that crashes half-way (out of memory, say) leaves no half file to score; the next format runs."""
    from mmdlm.infer import formats

    world = tmp_path / "world"
    world.mkdir()
    entries = [{"id": f"q{k}", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nhow many?"}, {"from": "gpt", "value": str(k)}]} for k in range(4)]
    (world / "qa.json").write_text(json.dumps(entries))

    def fake_infer(argv):
        out = Path(argv[argv.index("--output") + 1])
        rows = [{"id": f"q{k}", "answer": str(k), "forward_passes": 1} for k in range(4)]
        if "int8" in argv:
            out.write_text(json.dumps(rows[0]) + "\n")
            raise RuntimeError("CUDA out of memory")
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0

    monkeypatch.setattr(formats, "infer", fake_infer)
    assert formats.main(["--model", "m", "--world", str(world), "--out", str(tmp_path / "a"),
                         "--formats", "fp32,bf16-int8,bf16"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[2:] == ["| fp32 | 100.00 | 4/4 (4 with the same forwards) | - |",
                                             "| bf16-int8 | - | - | - |",
                                             "| bf16 | 100.00 | 4/4 (4 with the same forwards) | - |"]
    assert "error: bf16-int8 qa: RuntimeError: CUDA out of memory" in captured.err


def test_formats_unreadable_references_is_one_error_line(tmp_path, capsys, monkeypatch):
    """A qa.json that is no JSON: one stderr line and exit code 2, before any table or answer is written."""
    from mmdlm.infer import formats

    world = tmp_path / "world"
    world.mkdir()
    (world / "qa.json").write_text('[{"id": "q0", "image"')
    monkeypatch.setattr(formats, "infer", lambda argv: pytest.fail("answered a set it could not score"))
    assert formats.report_user_errors(lambda: formats.main(
        ["--model", "m", "--world", str(world), "--out", str(tmp_path / "a")])) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "a").exists()
    assert captured.err.startswith(f"error: {world / 'qa.json'}: cannot read the references")
    assert len(captured.err.splitlines()) == 1


def test_batched_requests_equal_requests_run_alone(model_dir, images):
    answerer = Answerer(*load_model(model_dir))
    s = answerer.special
    config = SamplerConfig(**TASK_DEFAULTS["vqa"], early_stop=True, eos_id=s.eos, stop_ids=(s.eot,))
    turns = [[{"from": "human", "value": "<image>\n" + q}] for q in ("how many squares", "what colour is it? " * 4)]
    pictures = [[load_image(images / "0.png")], [load_image(images / "1.png")]]
    together = answerer.answer(turns, pictures, config)
    for k in range(2):
        alone = answerer.answer(turns[k : k + 1], pictures[k : k + 1], config)[0]
        assert (alone.pieces, alone.commit_step) == (together[k].pieces, together[k].commit_step)


@pytest.mark.parametrize("static", [False, True])
def test_padding_prompts_to_a_multiple_changes_no_answer(model_dir, images, static):
    """--pad-to: fewer shapes for the static path's CUDA graphs, the same answers and commit steps."""
    answerer = Answerer(*load_model(model_dir))
    s = answerer.special
    config = SamplerConfig(**TASK_DEFAULTS["vqa"], early_stop=True, eos_id=s.eos, stop_ids=(s.eot,), static=static)
    turns = [[{"from": "human", "value": "<image>\n" + q}] for q in ("how many squares", "what colour is it? " * 4)]
    pictures = [[load_image(images / "0.png")], [load_image(images / "1.png")]]
    for rows in (slice(0, 1), slice(0, 2)):  # alone (no key mask without padding) and in a ragged batch
        plain = answerer.answer(turns[rows], pictures[rows], config)
        answerer.pad_to = 64
        try:
            prompts = [answerer.prompt_ids(t, i) for t, i in zip(turns[rows], pictures[rows])]
            embeds, mask = answerer.prefix(prompts, pictures[rows])
            padded = answerer.answer(turns[rows], pictures[rows], config)
        finally:
            answerer.pad_to = 1
        assert embeds.shape[1] % 64 == 0 and mask.sum(1).tolist() == [len(p) for p in prompts]
        assert [(a.pieces, a.commit_step) for a in padded] == [(a.pieces, a.commit_step) for a in plain]


def test_autotune_reaches_the_compile_and_needs_static(model_dir, images, capsys, graph_path):
    question = ["--model", str(model_dir), "--image", str(images / "0.png"), "--question", "hi"]
    assert main([*question, "--autotune"]) == 2
    assert one_error_line(capsys) == ("error: sampling options: autotune compiles the static path's step: "
                                      "it needs static")
    for flags, mode in ((["--static"], "reduce-overhead"), (["--static", "--autotune"], "max-autotune")):
        assert main([*question, *flags]) == 0
        assert graph_path and set(graph_path) == {mode}
        graph_path.clear()


def test_pad_to_must_be_positive(model_dir, images, capsys):
    assert main(["--model", str(model_dir), "--image", str(images / "0.png"), "--question", "hi", "--pad-to", "0"]) == 2
    assert one_error_line(capsys) == "error: --pad-to 0: give at least 1"


def test_template_keeps_its_text_and_fills_its_holes(model_dir, images):
    answerer = Answerer(*load_model(model_dir))
    canvas = answerer.template_canvas("the circle is <mask><mask> on the left")
    holes = (canvas[0] == answerer.special.mask).tolist()
    assert sum(holes) == 2 and canvas[0, -1] == answerer.special.eot
    config = SamplerConfig(gen_length=canvas.shape[1], block_length=canvas.shape[1], threshold=0.9)
    turns = [[{"from": "human", "value": "<image>\nwhat colour is the circle?"}]]
    answer = answerer.answer(turns, [[load_image(images / "0.png")]], config, canvas)[0]
    fixed = [p for p, h in zip(answer.pieces, holes) if not h]
    assert fixed == [answerer.tokenizer.decode([t]) for t, h in zip(canvas[0].tolist(), holes) if not h]
    assert [s > 0 for s in answer.commit_step] == holes and answer.forward_passes <= 2
    assert "<|mdm_mask|>" not in "".join(answer.pieces)  # threshold decoding never commits the mask itself


def test_a_template_keeps_its_text_when_the_model_would_end_the_answer_in_a_hole(model_dir, images, capsys,
                                                                                 monkeypatch):
    """A stop token committed into a hole cut the answer there ("It is <mask>." printed "It is")."""

    def ends_everywhere(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        bias = torch.zeros(len(tokenizer))
        bias[special_ids(tokenizer).eot] = 100.0  # end of turn, the model's choice at every position
        model.lm.register_forward_hook(lambda module, inputs, logits: logits + bias)
        return model, tokenizer

    monkeypatch.setattr(infer, "load_model", ends_everywhere)
    assert main(["--model", str(model_dir), "--image", str(images / "0.png"), "--question", "what colour?",
                 "--template", "the circle is <mask> on the left"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("the circle is") and text.endswith("on the left")


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "-0.5"], "--threshold -0.5: give a confidence in (0, 1], or 0 for fixed steps"),
    (["--threshold", "nan"], "--threshold nan: give a confidence in (0, 1], or 0 for fixed steps"),
    (["--temperature", "-1"], "--temperature -1.0: give 0 (the most likely token) or more"),
    (["--steps", "0", "--threshold", "0"], "--steps 0: give at least 1"),
    (["--gen-length", "0"], "--gen-length 0: give at least 1"),
    (["--factor", "0"], "--factor 0.0: give a positive number"),
])
def test_sampling_flags_out_of_range_are_one_short_line(model_dir, images, capsys, flags, message):
    assert main(["--model", str(model_dir), "--image", str(images / "0.png"), "--question", "hi", *flags]) == 2
    assert one_error_line(capsys) == f"error: {message}"


def test_a_device_that_is_missing_or_not_a_device_is_one_line(model_dir, images, capsys, monkeypatch):
    ask = ["--model", str(model_dir), "--image", str(images / "0.png"), "--question", "hi"]
    assert main([*ask, "--device", "nonsense"]) == 2
    assert one_error_line(capsys) == "error: --device nonsense: not a device (cpu, cuda, cuda:1, mps, ...)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, on any machine
    assert main([*ask, "--device", "cuda"]) == 2
    assert one_error_line(capsys) == ("error: --device cuda: not available, torch sees no CUDA GPU on this machine: "
                                      "use --device cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # and one with a single GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*ask, "--device", "cuda:1"]) == 2
    assert one_error_line(capsys) == "error: --device cuda:1: not available, torch sees 1 CUDA GPU(s) here, numbered " \
                                     "from cuda:0"


@pytest.mark.parametrize("model_type, what", [
    ("llava_llada", "an original LLaDA-V checkpoint: convert it with mmdlm-convert-llada-v first"),
    ("mmdlm_lm", "a language model alone: sample it with mmdlm.sampling.generate"),  # mmdlm-convert-llada's output
])
def test_a_folder_of_another_model_says_what_it_is(tmp_path, images, capsys, model_type, what):
    """Checked before the tokenizer and the weights are read: not "cannot load the model (state_dict ...)"."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["--model", str(tmp_path), "--image", str(images / "0.png"), "--caption"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {tmp_path}: model_type '{model_type}' is {what}"), line


def test_corrupt_weights_are_one_line(model_dir, images, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(b"garbage" if f.suffix == ".safetensors" else f.read_bytes())
    assert main(["--model", str(broken), "--image", str(images / "0.png"), "--caption"]) == 2
    assert "cannot load the model" in one_error_line(capsys)


def test_template_and_too_long_prompt_errors(model_dir, images, capsys):
    image = str(images / "0.png")
    assert main(["--model", str(model_dir), "--image", image, "--question", "what? " * 80]) == 2
    assert "over the model's context of 96" in one_error_line(capsys)
    assert main(["--model", str(model_dir), "--image", image, "--question", "what?", "--template", "no holes"]) == 2
    assert "has no <mask> hole" in one_error_line(capsys)
    assert main(["--model", str(model_dir), "--image", image, "--caption", "--block-length", "7"]) == 2
    assert "not divisible by block_length=7" in one_error_line(capsys)
    assert main(["--model", str(model_dir), "--input", str(images / "missing.json")]) == 2
    assert "missing.json: file not found" in one_error_line(capsys)
    bad = images / "bad.json"
    for entry, message in [({"id": "e1", "image": "9.png", "conversations": [{"from": "human", "value": "hi"}]},
                            "entry id=e1: image not found"),
                           ({"id": "e2", "conversations": [{"from": "human", "value": "<image>"}]},
                            "entry id=e2: 1 '<image>' placeholder(s) in the text but 0 image(s)"),
                           ({"id": "e3", "conversations": [{"from": "human", "value": " "}]},
                            "entry id=e3: no question to answer")]:
        bad.write_text(json.dumps([entry]))
        assert main(["--model", str(model_dir), "--input", str(bad)]) == 2
        assert message in one_error_line(capsys)


@pytest.fixture
def one_thread():
    """Benchmarks set torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def test_benchmark_runs_both_modes(model_dir, twin_dir, images, tmp_path, capsys, one_thread):
    from mmdlm.infer import benchmark

    assert benchmark.main(["--prefix-tokens", "8", "--hidden-size", "64", "--layers", "1", "--limit", "1",
                           "--repeats", "1", *one_thread]) == 0
    out = capsys.readouterr().out
    assert "| prefix cache (exact) |" in out and out.count("x | 100% |") >= 3  # the exact cache: same tokens
    test = tmp_path / "world" / "test"
    test.mkdir(parents=True)
    for name, question, answer in (("qa.json", "what colour?", "red"), ("captions.json", "Describe the image.",
                                                                         "a red circle")):
        entries = [{"id": f"{k}", "image": str(images / f"{k}.png"), "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]} for k in range(2)]
        (test / name).write_text(json.dumps(entries))
    plot = tmp_path / "frontier.png"
    assert benchmark.main(["--model", str(model_dir), "--data", str(tmp_path / "world"), "--limit", "1",
                           "--repeats", "1", "--plot", str(plot), "--baseline", str(twin_dir),
                           *one_thread]) == 0
    out = capsys.readouterr().out
    assert "| vanilla (1 token/step) |" in out and "| + prefix cache + threshold + early stop |" in out
    assert out.count("| + block cache + threshold + early stop |") == 2  # the fast cache for a short prefix
    assert out.count("| autoregressive twin (KV cache) |") == 2  # one row per task
    assert "| caption frontier |" in out and out.count("| factor 2 |") == 2 and plot.stat().st_size > 0


def test_benchmark_refuses_a_diffusion_model_as_baseline(model_dir, tmp_path, capsys, one_thread):
    from mmdlm.infer import benchmark

    code = benchmark.main(["--model", str(model_dir), "--baseline", str(model_dir), "--data", str(tmp_path),
                           "--limit", "1", *one_thread])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not an autoregressive twin" in err and "Traceback" not in err


def test_the_autoregressive_twin_answers_left_to_right(twin_dir, images, capsys):
    folder = twin_dir
    answerer = Answerer(*load_model(folder))
    turns = [{"from": "human", "value": "<image>\nwhat colour is the circle?"}]
    image = load_image(images / "0.png")
    config = SamplerConfig(**{**TASK_DEFAULTS["vqa"], "gen_length": 6, "block_length": 6, "threshold": None,
                              "steps": 6})
    (answer,) = answerer.answer([turns], [[image]], config)
    assert answer.commit_step == [1, 2, 3, 4, 5, 6]  # one token per forward, in order
    assert answer.forward_passes == 6 and answer.tokens_per_forward == 1.0
    assert main(["--model", str(folder), "--image", str(images / "0.png"), "--question", "what colour?",
                 "--template", "It is <mask>."]) == 2
    assert "autoregressive twin cannot fill holes" in capsys.readouterr().err


def test_dtype_casts_the_weights_and_answers(model_dir, images, capsys):
    model, _ = load_model(model_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm.fused  # loaded for inference: q/k/v and gate/up one matmul each
    assert main(["--model", str(model_dir), "--image", str(images / "0.png"), "--question", "how many squares",
                 "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(InferError, match="--dtype int4: choose one of float32, bfloat16, float16"):
        load_model(model_dir, dtype="int4")


def test_channels_last_tower_gives_the_same_features():
    """load_model stores the tower channels-last (faster oneDNN kernels); the features must not change."""
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(backend="timm", model="resnet18", image_size=32, feature_layer=2)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = tower(pixels)
        tower.to(memory_format=torch.channels_last)
        after = tower(pixels)
    assert tower.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_an_input_file_with_a_repeated_id_is_refused_before_the_model_loads(tmp_path, capsys):
    turns = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]
    (tmp_path / "qa.json").write_text(json.dumps([{"id": "a", "conversations": turns},
                                                  {"id": "a", "conversations": turns}]))
    argv = ["--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "qa.json")]
    assert main(argv) == 2  # the model folder does not exist either: the input is read first
    assert capsys.readouterr().err == ("error: qa.json entry id=a: id 'a' is also entry #0's: answers are matched "
                                       "to questions by id (evaluate.py, infer.py --resume), so each entry needs its "
                                       "own\n")


def test_a_question_without_an_image_is_a_text_only_request(model_dir, capsys):
    """As a text-only entry of --input: no image run in the prompt; --caption still needs its image."""
    answerer = Answerer(*load_model(model_dir))
    s = answerer.special
    config = SamplerConfig(**TASK_DEFAULTS["vqa"], early_stop=True, eos_id=s.eos, stop_ids=(s.eot,))
    expected = answerer.answer([[{"from": "human", "value": "how many squares"}]], [[]], config)[0].text
    assert main(["--model", str(model_dir), "--question", "how many squares"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["--model", str(model_dir), "--caption"]) == 2
    assert capsys.readouterr().err == "error: --image is required with --caption\n"


def test_cache_prefix_notes_attention_the_model_was_not_trained_with(model_dir, tmp_path, capsys):
    base = ["--question", "how many squares", "--gen-length", "4"]
    assert main(["--model", str(model_dir), *base, "--cache", "prefix"]) == 0
    assert "note: --cache prefix answers with prefix-DLM attention" in capsys.readouterr().err
    trained = saved_model(tmp_path, "bidirectional", prefix_dlm=True)  # its default: no note
    for model, cache in ((model_dir, "none"), (trained, "prefix")):
        assert main(["--model", str(model), *base, "--cache", cache]) == 0
        assert "note:" not in capsys.readouterr().err
