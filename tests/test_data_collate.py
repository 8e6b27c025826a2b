"""The collator and the batch contract: image runs, pixel order, maskable, padding, truncation."""

import json
import random

import pytest
import torch
from PIL import Image
from torchvision import transforms

from mmdlm.data.collate import Collator
from mmdlm.data.errors import DataError, DataWarning
from mmdlm.data.llava import LlavaDataset
from mmdlm.data.template import ChatEncoder, expand_image_runs
from mmdlm.data.tokenizer import special_ids, train_demo_tokenizer

TEXTS = ["What colour is the circle?", "red", "blue", "a small red circle on the left.", "user", "assistant"] * 20
N_IMAGE = 3  # tokens per image run in these tests
transform = transforms.Compose([transforms.Resize((4, 4)), transforms.ToTensor()])
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_demo_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return special_ids(tokenizer)


def image(colour):
    return Image.new("RGB", (8, 8), COLOURS[colour])


def qa(question, answer, *images, sample_id="s"):
    turns = [{"from": "human", "value": "<image>\n" * len(images) + question}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "images": list(images), "conversations": turns}


def runs(row, image_id):
    """Return the lengths of the contiguous runs of image ids in one row."""
    lengths, current = [], 0
    for token in row.tolist() + [None]:
        if token == image_id:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths


def pixel_colours(pixel_values):
    return [next(k for k, v in COLOURS.items() if torch.equal(p[:, 0, 0], torch.tensor(v) / 255)) for p in pixel_values]


def test_sft_batch_contract(tokenizer, ids):
    samples = [
        qa("What colour is the circle?", "red", image("green")),
        {"id": "t", "images": [], "conversations": [
            {"from": "human", "value": "user"}, {"from": "gpt", "value": "assistant"},
            {"from": "human", "value": "red"}, {"from": "gpt", "value": "blue blue blue blue blue blue"}]},
        qa("What colour is the circle?", "blue", image("red"), image("blue")),
    ]
    batch = Collator(tokenizer, transform, N_IMAGE, max_length=200)(samples)
    assert set(batch) == {"input_ids", "pixel_values", "attention_mask", "maskable", "prompt_length"}
    B, L = batch["input_ids"].shape
    assert B == 3 and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == batch["maskable"].dtype == torch.bool
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert pixel_colours(batch["pixel_values"]) == ["green", "red", "blue"]  # row-major order of appearance
    input_ids, maskable = batch["input_ids"], batch["maskable"]
    assert [runs(row, ids.image) for row in input_ids] == [[N_IMAGE], [], [N_IMAGE, N_IMAGE]]
    assert not (maskable & (input_ids == ids.image)).any()
    chat = ChatEncoder(tokenizer)
    prompt = expand_image_runs(chat.encode_prompt("<image>\nWhat colour is the circle?"), ids.image, N_IMAGE)
    assert batch["prompt_length"][0] == len(prompt) and input_ids[0, : len(prompt)].tolist() == prompt
    for row in range(B):
        assert not maskable[row, : batch["prompt_length"][row]].any()
    real = len(prompt) + 2  # "red" and <|eot_id|>
    assert tokenizer.decode(input_ids[0, len(prompt) : real]) == "red<|eot_id|>"
    assert maskable[0, len(prompt) : real].all()
    # LLaDA's SFT padding: EOS, attended, and a target, so the model learns where the answer ends.
    assert (input_ids[0, real:] == ids.eos).all() and maskable[0, real:].all() and batch["attention_mask"].all()
    # Multi-turn: both answers are targets, the user turn between them is not.
    text = tokenizer.decode(input_ids[1][maskable[1]][: 2 + 7])
    assert text == "assistant<|eot_id|>blue blue blue blue blue blue<|eot_id|>"[: len(text)] and text.startswith(
        "assistant<|eot_id|>blue"
    )


def test_pretrain_batch(tokenizer, ids):
    docs = [
        {"id": "d", "segments": [{"text": "red"}, {"image": image("red")}, {"text": "blue"}, {"image": image("blue")}]},
        {"id": "c", "segments": [{"image": image("green")}, {"text": "a small red circle on the left."}]},
    ]
    batch = Collator(tokenizer, transform, N_IMAGE, max_length=100, mode="pretrain")(docs)
    input_ids, maskable, attention = batch["input_ids"], batch["maskable"], batch["attention_mask"]
    assert pixel_colours(batch["pixel_values"]) == ["red", "blue", "green"]
    def n_text(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    length = [
        1 + n_text("red") + N_IMAGE + n_text("blue") + N_IMAGE + 1,  # BOS ... EOS
        1 + N_IMAGE + n_text(docs[1]["segments"][1]["text"]) + 1,
    ]
    for row, n in enumerate(length):
        assert attention[row].sum() == n and attention[row, :n].all()
        assert input_ids[row, 0] == ids.bos and not maskable[row, 0] and input_ids[row, n - 1] == ids.eos
        assert (maskable[row, :n] == (input_ids[row, :n] != ids.image)).logical_or(torch.arange(n) == 0).all()
        assert (input_ids[row, n:] == ids.pad).all() and not maskable[row, n:].any()
    assert batch["prompt_length"].tolist() == [1, 1 + N_IMAGE]


def test_text_only_batch_has_empty_pixels(tokenizer):
    batch = Collator(tokenizer, transform, N_IMAGE, max_length=50)([qa("red", "blue")])
    assert batch["pixel_values"].shape == (0, 3, 4, 4)


def test_truncation_drops_whole_trailing_turns_and_their_images(tokenizer, ids):
    sample = qa("What colour is the circle?", "red", image("red"))
    first_pair = len(Collator(tokenizer, transform, N_IMAGE, 500).encode(sample)[0].ids)
    sample["images"].append(image("blue"))
    sample["conversations"] += [{"from": "human", "value": "<image>\nAnd now?"}, {"from": "gpt", "value": "blue"}]
    short = qa("red", "red")
    batch = Collator(tokenizer, transform, N_IMAGE, max_length=first_pair + 5)([sample, short])
    assert batch["input_ids"].shape[1] == first_pair  # the second pair did not fit: dropped whole
    assert pixel_colours(batch["pixel_values"]) == ["red"]
    assert batch["input_ids"][0, first_pair - 1] == ids.eot and batch["maskable"][1, -1]


def test_truncation_cuts_a_long_answer_never_an_image(tokenizer, ids):
    long_answer = qa("What colour is the circle?", "red " * 60, image("green"))
    collator = Collator(tokenizer, transform, N_IMAGE, max_length=30, pad_to_multiple_of=32)
    batch = collator([long_answer, qa("red", "blue")])
    input_ids, maskable = batch["input_ids"], batch["maskable"]
    assert input_ids.shape == (2, 32) and runs(input_ids[0], ids.image) == [N_IMAGE]
    assert (input_ids[0, 30:] == ids.eos).all()
    assert not maskable[0, 30:].any()  # a cut answer must not learn "EOS comes here"
    assert maskable[1, -2:].all()
    with pytest.warns(DataWarning, match="sample id=s skipped: the prompt with its image run"):
        batch = Collator(tokenizer, transform, num_image_tokens=40, max_length=30)([long_answer, qa("red", "blue")])
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 0


def test_document_truncated_before_an_image_run(tokenizer, ids):
    doc = {"id": "d", "segments": [{"text": "red blue"}, {"image": image("red")}, {"text": "blue"}]}
    text = len(tokenizer("red blue")["input_ids"])
    collator = Collator(tokenizer, transform, N_IMAGE, max_length=1 + text + N_IMAGE - 1, mode="pretrain")
    batch = collator([doc])
    assert batch["input_ids"].shape == (1, 1 + text) and batch["pixel_values"].shape[0] == 0
    assert batch["input_ids"][0, -1] != ids.eos  # cut documents get no EOS


def test_skipped_samples(tokenizer):
    collator = Collator(tokenizer, transform, N_IMAGE, max_length=50)
    with pytest.warns(DataWarning, match="sample id=x skipped: sample has neither 'conversations' nor 'segments'"):
        batch = collator([None, qa("red", "blue"), {"id": "x", "nothing": 1}])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped == 2
    with pytest.raises(DataError, match="all 1 samples of the batch were skipped"):
        collator([None])


def test_on_error_stop_raises_for_a_conversation_that_cannot_fit_and_still_skips_documents(tokenizer):
    long = qa("What colour is the circle? " * 20, "red", image("red"), sample_id="q7")
    stop = Collator(tokenizer, transform, N_IMAGE, max_length=40, on_error="stop")
    with pytest.raises(DataError, match=r"^sample id=q7: the prompt with its image run\(s\) is \d+ tokens, leaving no "
                                        "room for an answer within max_length=40"):
        stop([qa("red", "blue"), long])
    with pytest.warns(DataWarning, match="sample id=d skipped: sample has neither"):  # not a conversation
        assert stop([qa("red", "blue"), {"id": "d", "nothing": 1}])["input_ids"].shape[0] == 1
    skip = Collator(tokenizer, transform, N_IMAGE, max_length=40)  # the default
    with pytest.warns(DataWarning, match="sample id=q7 skipped: the prompt"):
        assert skip([qa("red", "blue"), long])["input_ids"].shape[0] == 1 and skip.skipped == 1
    with pytest.raises(ValueError, match="on_error must be one of"):
        Collator(tokenizer, transform, N_IMAGE, max_length=40, on_error="raise")


@pytest.mark.filterwarnings("ignore::mmdlm.data.errors.DataWarning")
def test_random_batches_keep_the_contract(tokenizer, ids):
    rng = random.Random(0)
    checked = 0
    words = ["red", "blue", "circle", "the", "left"]

    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))

    for case in range(60):
        samples = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.5:
                turns, images = [], []
                for _ in range(rng.randint(1, 3)):
                    k = rng.randint(0, 2)
                    images += [image(rng.choice(list(COLOURS))) for _ in range(k)]
                    turns += [{"from": "human", "value": "<image>" * k + text()}, {"from": "gpt", "value": text()}]
                samples.append({"id": "c", "images": images, "conversations": turns})
            else:
                segments = [{"image": image("red")} if rng.random() < 0.4 else {"text": text()} for _ in range(5)]
                samples.append({"id": "d", "segments": segments})
        n_image = rng.choice([1, 3, 5])
        max_length = rng.randint(25, 90)
        collator = Collator(tokenizer, transform, n_image, max_length, mode=rng.choice(["sft", "pretrain"]))
        try:
            batch = collator(samples)
        except DataError:
            continue
        checked += 1
        input_ids, maskable = batch["input_ids"], batch["maskable"]
        assert input_ids.shape[1] <= max_length, case
        is_image = input_ids == ids.image
        assert sum(sum(runs(row, ids.image)) for row in input_ids) == n_image * batch["pixel_values"].shape[0]
        assert all(r % n_image == 0 for row in input_ids for r in runs(row, ids.image)), case
        assert not (maskable & is_image).any() and not (maskable & ~batch["attention_mask"]).any()
        for row in range(input_ids.shape[0]):
            assert not maskable[row, : batch["prompt_length"][row]].any() and maskable[row, batch["prompt_length"][row]]
    assert checked >= 40


def test_dataloader_over_llava_with_a_corrupt_image(tmp_path, tokenizer):
    image("red").save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"corrupt")
    entries = [{"id": str(i), "image": name, "conversations": [{"from": "human", "value": "What colour?"},
                                                               {"from": "gpt", "value": "red"}]}
               for i, name in enumerate(["a.png", "b.png", "a.png"])]
    (tmp_path / "qa.json").write_text(json.dumps(entries))
    collator = Collator(tokenizer, transform, N_IMAGE, max_length=64)
    loader = torch.utils.data.DataLoader(LlavaDataset(tmp_path / "qa.json", on_error="skip"), 3, collate_fn=collator)
    with pytest.warns(DataWarning, match="entry id=1: image 'b.png' unreadable"):
        (batch,) = list(loader)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2 and collator.skipped == 1


def test_mask_padding_ends_each_answer_with_one_eos_target_then_masks(tokenizer, ids):
    samples = [qa("What colour is the circle?", "red", image("green")),
               qa("What colour is the circle?", "a small red circle on the left.", image("red"))]
    eos = Collator(tokenizer, transform, N_IMAGE, max_length=200)(samples)
    batch = Collator(tokenizer, transform, N_IMAGE, max_length=200, sft_padding="mask")(samples)
    short = int((eos["input_ids"][0] != ids.eos).nonzero().max()) + 1  # the short row's own tokens
    assert torch.equal(batch["input_ids"][0, :short + 1], eos["input_ids"][0, :short + 1])
    assert batch["input_ids"][0, short] == ids.eos
    assert torch.all(batch["input_ids"][0, short + 1 :] == ids.mask)  # what the sampler's canvas holds
    assert batch["maskable"][0, short] and not batch["maskable"][0, short + 1 :].any()
    assert batch["attention_mask"].all()
    assert torch.equal(batch["maskable"][0, :short], eos["maskable"][0, :short])
    # The long row fills the batch: its answer is unchanged and nothing follows it.
    assert torch.equal(batch["input_ids"][1], eos["input_ids"][1])
    assert torch.equal(batch["maskable"][1], eos["maskable"][1])
    with pytest.raises(ValueError, match="sft_padding"):
        Collator(tokenizer, transform, N_IMAGE, 50, sft_padding="pad")
