"""Tokenizer and chat template, LLaVA JSON sets, and `mmdlm-data check` on them, broken inputs included."""

import io
import json
import struct
import zlib

import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmdlm.data.cli import main
from mmdlm.data.errors import DataError, DataWarning
from mmdlm.data.llava import LlavaDataset
from mmdlm.data.template import ChatEncoder, image_position_of, place_image_tokens
from mmdlm.data.tokenizer import LLADA_CHAT_TEMPLATE, SPECIAL_TOKENS, load_tokenizer, special_ids, train_demo_tokenizer

TEXTS = ["What colour is the circle?", "red", "a small red circle on the left.", "Describe the image.", "user"] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_demo_tokenizer(TEXTS, out, vocab_size=300)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def solid(colour, size=(8, 8), mode="RGB"):
    return Image.new(mode, size, colour)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- tokenizer
def test_demo_tokenizer(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and len(tokenizer) <= 300
    ids = special_ids(tokenizer)
    assert ids.pad == ids.eos and len(set(vars(ids).values())) == len(SPECIAL_TOKENS)
    text = "What colour is the zebra? <image> ünïcode"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: no unk
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [ids.image]


def test_load_tokenizer_adds_missing_special_tokens(tmp_path):
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare = PreTrainedTokenizerFast(tokenizer_object=model)
    bare.add_tokens(["hello"])
    bare.save_pretrained(str(tmp_path))
    with pytest.raises(DataError, match="tokenizer has no .* load it with"):
        special_ids(bare)
    loaded = load_tokenizer(tmp_path)
    ids = special_ids(loaded)
    assert loaded.eos_token == "<|endoftext|>" and loaded.pad_token_id == ids.eos
    assert loaded.chat_template == LLADA_CHAT_TEMPLATE
    assert loaded("x<|mdm_mask|>", add_special_tokens=False)["input_ids"][-1] == ids.mask


def test_load_tokenizer_clear_error(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_template_matches_llada_chat_template(tokenizer):
    chat = ChatEncoder(tokenizer)
    conversation = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the square?  "},
        {"from": "gpt", "value": "blue"},
    ]
    encoded = chat.encode_conversation(conversation)
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conversation]
    # LLaDA's template always ends with an assistant header; the training text stops after the last <|eot_id|>.
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encoded.ids == tokenizer(text, add_special_tokens=False)["input_ids"][: len(encoded.ids)]
    answers = [tokenizer.decode([i]) for i, a in zip(encoded.ids, encoded.is_answer) if a]
    assert "".join(answers) == "red<|eot_id|>blue<|eot_id|>"
    assert encoded.turn_ends[-1] == len(encoded.ids) and len(encoded.turn_ends) == 2
    prompt = chat.encode_prompt(conversation[:1])
    assert encoded.ids[: len(prompt)] == prompt and encoded.is_answer.index(True) == len(prompt)
    assert prompt == chat.encode_prompt("<image>\nWhat colour is the circle?")
    with pytest.raises(DataError, match="last turn is an answer"):
        chat.encode_prompt(conversation[:2])


def test_place_image_tokens():
    turns = [{"from": "human", "value": "Compare them."}, {"from": "gpt", "value": "same"}]
    assert place_image_tokens(turns, 2)[0]["value"] == "<image>\n<image>\nCompare them."
    assert turns[0]["value"] == "Compare them."  # the input is not modified
    assert place_image_tokens(turns, 1, "after")[0]["value"] == "Compare them.\n<image>"
    assert image_position_of([place_image_tokens(turns, 1, "after")] * 2 + [place_image_tokens(turns, 1)]) == "after"
    assert image_position_of([place_image_tokens(turns, 1)] + [turns] * 3) == "before"  # no placeholder: not counted
    middle = [{"from": "human", "value": "Left <image> right <image>?"}, {"from": "gpt", "value": "x"}]
    assert place_image_tokens(middle, 2) == middle
    with pytest.raises(DataError, match="1 '<image>' placeholder"):
        place_image_tokens([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}], 2)


# ----------------------------------------------------------------------------------- LLaVA JSON
def write_set(tmp_path, entries, name="qa.json"):
    (tmp_path / name).write_text(json.dumps(entries))
    return tmp_path / name


def test_llava_dataset_image_forms(tmp_path):
    (tmp_path / "img").mkdir()
    solid((255, 0, 0)).save(tmp_path / "img" / "a.png")
    solid(128, mode="L").save(tmp_path / "img" / "b.png")  # greyscale becomes RGB
    entries = [
        {"id": "one", "image": "img/a.png", "conversations": [{"from": "human", "value": "Colour?"},
                                                              {"from": "gpt", "value": "red"}]},
        {"id": "two", "image": ["img/a.png", "img/b.png"], "conversations": [
            {"from": "human", "value": "First <image> then <image>: same?"}, {"from": "gpt", "value": "no"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    data = LlavaDataset(write_set(tmp_path, entries))
    assert len(data) == 3
    one, two, text = data[0], data[1], data[2]
    assert one["conversations"][0]["value"] == "<image>\nColour?" and one["images"][0].getpixel((0, 0)) == (255, 0, 0)
    assert [im.mode for im in two["images"]] == ["RGB", "RGB"] and two["images"][1].getpixel((0, 0)) == (128,) * 3
    assert two["conversations"][0]["value"] == "First <image> then <image>: same?"
    assert text == {"id": "text", "images": [], "conversations": entries[2]["conversations"]}


def test_llava_missing_image_names_entry_and_path(tmp_path):
    entries = [{"id": 17, "image": "img/3.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                                  {"from": "gpt", "value": "A"}]}]
    with pytest.raises(DataError, match=r"qa.json entry id=17: image 'img/3.jpg' not found under .+"):
        LlavaDataset(write_set(tmp_path, entries))


def test_llava_malformed_json(tmp_path):
    (tmp_path / "qa.json").write_text('[{"id": 1, "conversations": [}]')
    with pytest.raises(DataError, match=r"qa.json: malformed JSON at line 1 column 30"):
        LlavaDataset(tmp_path / "qa.json")


def test_llava_conversation_without_answer(tmp_path):
    entries = [{"id": "q", "conversations": [{"from": "human", "value": "Hello?"}]},
               {"id": "e", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]}]
    with pytest.raises(DataError, match=r"entry id=q: conversation has no answer .* \(and 1 more"):
        LlavaDataset(write_set(tmp_path, entries))
    with pytest.warns(DataWarning) as caught:
        data = LlavaDataset(write_set(tmp_path, entries), on_error="skip")
    assert len(data) == 0 and data.skipped == 2
    assert [str(w.message) for w in caught] == [  # one line per skipped entry, naming it
        "skipped qa.json entry id=q: conversation has no answer (no non-empty 'gpt' turn)",
        "skipped qa.json entry id=e: turn 1: empty answer"]


def test_llava_corrupt_image(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    entries = [{"id": "c", "image": "bad.jpg", "conversations": [{"from": "human", "value": "Q"},
                                                                 {"from": "gpt", "value": "A"}]}]
    data = LlavaDataset(write_set(tmp_path, entries))
    with pytest.raises(DataError, match=r"qa.json entry id=c: image 'bad.jpg' unreadable"):
        data[0]
    skipping = LlavaDataset(write_set(tmp_path, entries), on_error="skip")
    with pytest.warns(DataWarning, match=r"^skipped qa.json entry id=c: image 'bad.jpg' unreadable"):
        assert skipping[0] is None


# ----------------------------------------------------------------------------------- check
def test_check_clean_and_broken_json(tmp_path, tokenizer_dir, capsys):
    solid((0, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    good = {"id": "g", "image": "ok.png", "conversations": [{"from": "human", "value": "Q?"},
                                                            {"from": "gpt", "value": "A"}]}
    assert main(["check", str(write_set(tmp_path, [good], "good.json"))]) == 0
    assert "entries=1, turns=2, images=1, text-only=0; 0 problem(s)" in capsys.readouterr().out
    broken = [
        good,
        {"id": "missing", "image": "nope.png", "conversations": good["conversations"]},
        {"id": "corrupt", "image": "bad.png", "conversations": good["conversations"]},
        {"id": "empty", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "A"}]},
        {"id": "noanswer", "conversations": [{"from": "human", "value": "Q"}]},
        {"id": "long", "conversations": [{"from": "human", "value": "red " * 40}, {"from": "gpt", "value": "A"}]},
    ]
    args = ["check", str(write_set(tmp_path, broken, "broken.json")), "--tokenizer", str(tokenizer_dir)]
    args += ["--num-image-tokens", "4", "--max-length", "40"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "5 problem(s)" in out
    assert "broken.json entry id=missing: image 'nope.png' not found under" in out
    assert "broken.json entry id=corrupt: image 'bad.png' unreadable" in out
    assert "broken.json entry id=empty: turn 0: empty user turn" in out
    assert "broken.json entry id=noanswer: conversation has no answer" in out
    assert "broken.json entry id=long: over-long: " in out
    assert main([*args, "--limit", "2"]) == 1
    assert "... 3 more problem(s) not shown" in capsys.readouterr().out


def test_check_flags_a_repeated_id_and_takes_the_run_length_from_a_model_folder(tmp_path, tokenizer, capsys):
    from mmdlm.multimodal import build_model

    solid((0, 0, 0)).save(tmp_path / "ok.png")
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]
    entries = [{"id": "x", "image": "ok.png", "conversations": turns}, {"id": "y", "conversations": turns[1:]},
               {"id": "x", "image": "ok.png", "conversations": turns}, {"image": "ok.png", "conversations": turns}]
    entries[1]["conversations"] = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]
    entries.append({"id": "3", "conversations": entries[1]["conversations"]})  # the id entry #3 has by position
    path = write_set(tmp_path, entries)
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out
    assert "qa.json entry id=x: id 'x' is also entry #0's: answers are matched to questions by id" in out
    assert "qa.json entry id=3: id '3' is also entry #3's" in out
    # A model folder as --tokenizer gives its own run length (9 tokens per image here), not the default 64.
    ids = special_ids(tokenizer)
    model = build_model({"vision": {"model": "resnet10t", "image_size": 64, "feature_layer": 2},
                         "projector": {"grid": 3},
                         "lm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "num_key_value_heads": 1}},
                        vocab_size=len(tokenizer), image_token_id=ids.image, mask_token_id=ids.mask)
    assert model.num_image_tokens == 9
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    one = write_set(tmp_path, entries[:1], "one.json")
    length = len(ChatEncoder(tokenizer).encode_conversation(turns).ids) + 8
    for max_length, code in [(length, 0), (length - 1, 1)]:
        args = ["check", str(one), "--tokenizer", str(tmp_path / "model"), "--max-length", str(max_length)]
        assert main(args) == code
    assert f"over-long: {length} tokens > max_length {length - 1}" in capsys.readouterr().out


def white_png(width: int, height: int) -> bytes:
    """Return a valid 1-bit PNG of width x height white pixels (a 20000 x 20000 one is a decompression bomb: ~60 kB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" + b"\xff" * ((width + 7) // 8)  # filter byte + packed bits
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_a_bad_image_like_any_other(tmp_path, capsys):
    assert Image.open(io.BytesIO(white_png(16, 8))).convert("L").getpixel((15, 7)) == 255  # the writer is right
    (tmp_path / "bomb.png").write_bytes(white_png(20000, 20000))
    solid((0, 0, 0)).save(tmp_path / "ok.png")
    turns = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]
    entries = [{"id": "ok", "image": "ok.png", "conversations": turns},
               {"id": "bomb", "image": "bomb.png", "conversations": turns}]
    path = write_set(tmp_path, entries)
    assert main(["check", str(path)]) == 1
    captured = capsys.readouterr()
    assert "1 problem(s)" in captured.out and "Traceback" not in captured.err
    assert "qa.json entry id=bomb: image 'bomb.png' too large to decode safely (Image size (400000000 pixels)" \
        in captured.out
    with pytest.raises(DataError, match="entry id=bomb: image 'bomb.png' too large to decode safely"):
        LlavaDataset(path)[1]
    with pytest.warns(DataWarning, match="^skipped qa.json entry id=bomb: image 'bomb.png' too large"):
        assert LlavaDataset(path, on_error="skip")[1] is None


def test_on_error_is_stop_or_skip(tmp_path):
    entries = [{"id": "q", "conversations": [{"from": "human", "value": "Hello?"}]}]
    with pytest.raises(DataError, match=r"entry id=q: conversation has no answer .*; set data.on_error=skip"):
        LlavaDataset(write_set(tmp_path, entries))
    with pytest.raises(ValueError, match=r"data.on_error='raise' must be one of \('stop', 'skip'\)"):
        LlavaDataset(write_set(tmp_path, entries), on_error="raise")


def test_check_unreadable_input_exits_2(tmp_path, capsys):
    (tmp_path / "qa.json").write_text("{not json")
    assert main(["check", str(tmp_path / "qa.json")]) == 2
    assert "malformed JSON at line 1" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "none-{0..3}.tar")]) == 2


def test_a_skipped_sample_warning_prints_as_one_line():
    import warnings

    assert warnings.formatwarning("skipped qa.json entry id=7: x", DataWarning, "llava.py", 3) == \
        "warning: skipped qa.json entry id=7: x\n"
    assert warnings.formatwarning("other", UserWarning, "llava.py", 3).startswith("llava.py:3: UserWarning: other")
