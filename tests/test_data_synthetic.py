"""The demo world: layout on disk, determinism, balanced answers, true answers, disjoint splits."""

import hashlib
import json
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from mmdlm.data.cli import main
from mmdlm.data.scenes import (
    _ANSWERS,
    COLOURS,
    GRID,
    QUESTION_TYPES,
    SHAPES,
    QuestionSampler,
    build_scene,
    caption,
    cell_labels,
    draw_scene,
)
from mmdlm.data.scenes import SIZES as THING_SIZES
from mmdlm.data.shards import shard_pipeline
from mmdlm.data.synthetic import SPLITS, split_seed, synthesize
from mmdlm.data.textures import PATTERNS, synthesize_textures
from mmdlm.data.tokenizer import load_tokenizer, special_ids

SIZES = {"train": 300, "val": 100, "test": 200}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("world"), SIZES["train"], SIZES["val"], SIZES["test"], seed=3)


def load_qa(world, split):
    return json.loads((world / split / "qa.json").read_text())


def question_and_answer(entry):
    human, gpt = entry["conversations"]
    return human["value"].removesuffix("\n<image>"), gpt["value"]


def test_layout(world):
    for split, n in SIZES.items():
        qa = load_qa(world, split)
        captions = json.loads((world / split / "captions.json").read_text())
        assert len(qa) == len(captions) == n
        assert len(list((world / split / "images").glob("*.png"))) == n
        assert sorted(p.name for p in (world / split / "shards").glob("*.tar"))[0] == "docs-000000.tar"
        entry = qa[0]
        assert entry["image"].startswith("images/") and (world / split / entry["image"]).is_file()
        assert entry["conversations"][0]["value"].endswith("?\n<image>")  # the image after the question
        assert entry["question_type"] in QUESTION_TYPES
        assert captions[0]["conversations"][0]["value"] == "Describe the image.\n<image>"
        assert Image.open(world / split / entry["image"]).size == (64, 64)
    tokenizer = load_tokenizer(world / "tokenizer")
    assert len(tokenizer) <= 512
    ids = special_ids(tokenizer)
    assert len(set(vars(ids).values())) == 7 and ids.pad == ids.eos  # LLaDA pads with EOS
    assert json.loads((world / "world.json").read_text())["seed"] == 3


def test_answers_are_short(world):
    for entry in load_qa(world, "train"):
        _, answer = question_and_answer(entry)
        assert len(answer.split()) == 1


def test_answers_balanced_per_question_type(world):
    for split in SPLITS:
        by_type, by_text = defaultdict(Counter), defaultdict(Counter)
        for entry in load_qa(world, split):
            question, answer = question_and_answer(entry)
            by_type[entry["question_type"]][answer] += 1
            by_text[question][answer] += 1
        assert set(by_type) == set(QUESTION_TYPES)
        for kind, counts in by_type.items():
            assert set(counts) <= set(_ANSWERS[kind])
            values = [counts[a] for a in _ANSWERS[kind]]
            assert max(values) - min(values) <= 1, (kind, counts)
        for question, counts in by_text.items():
            kind_answers = next(_ANSWERS[k] for k in QUESTION_TYPES if set(counts) <= set(_ANSWERS[k]))
            values = [counts[a] for a in kind_answers]
            assert max(values) - min(values) <= 1, (question, counts)


def test_text_only_model_scores_chance(world):
    """The best a question-only model can do (majority answer per question text, fit on train) is chance."""
    majority = defaultdict(Counter)
    for entry in load_qa(world, "train"):
        question, answer = question_and_answer(entry)
        majority[question][answer] += 1
    correct, chance = 0, 0.0
    test = load_qa(world, "test")
    for entry in test:
        question, answer = question_and_answer(entry)
        guess = majority[question].most_common(1)[0][0] if question in majority else ""
        correct += guess == answer
        chance += 1 / len(_ANSWERS[entry["question_type"]])
    assert correct / len(test) <= chance / len(test) + 0.06


def oracle(things, kind, key):
    """Answer the question from the scene's list of things, independently of the generator."""
    if kind == "colour":
        (match,) = [t for t in things if t.shape == key[0]]
        return match.colour
    if kind == "shape":
        (match,) = [t for t in things if t.colour == key[0]]
        return match.shape
    if kind == "count":
        return str(sum((t.colour if key[0] == "colour" else t.shape) == key[1] for t in things))
    if kind == "position":
        (match,) = [t for t in things if (t.colour, t.shape) == key]
        assert match.col != GRID // 2
        return "left" if match.col == 0 else "right"
    return "yes" if any((t.colour, t.shape) == key for t in things) else "no"


def test_scene_answers_are_true():
    rng = random.Random(0)
    sampler = QuestionSampler(rng)
    for _ in range(500):
        kind, key, answer = sampler.draw()
        things = build_scene(rng, kind, key, answer)
        assert 1 <= len(things) <= 6
        assert len({(t.row, t.col) for t in things}) == len(things)  # one thing per cell
        assert oracle(things, kind, key) == answer
        assert caption(things).count(" a ") + 1 == len(things)


def test_cell_labels_read_every_thing_back_from_its_caption():
    rng = random.Random(1)
    sampler = QuestionSampler(rng)
    for _ in range(300):
        things = build_scene(rng, *sampler.draw())
        expected = [[0, 0, 0] for _ in range(GRID * GRID)]
        for t in things:
            expected[t.row * GRID + t.col] = [list(COLOURS).index(t.colour) + 1, SHAPES.index(t.shape) + 1,
                                              THING_SIZES.index(t.size) + 1]
        assert cell_labels(caption(things)) == expected
    with pytest.raises(ValueError, match="not a demo-world caption"):
        cell_labels("a cat on a mat")


def test_texture_world_is_balanced_and_labels_are_new_words(tmp_path):
    synthesize_textures(tmp_path, n_train=40, n_test=20, seed=0)
    for split, n in (("train", 40), ("test", 20)):
        entries = json.loads((tmp_path / split / "qa.json").read_text())
        answers = Counter(e["conversations"][1]["value"] for e in entries)
        assert len(entries) == n and set(answers) == set(PATTERNS)
        assert max(answers.values()) - min(answers.values()) <= 1
        assert all((tmp_path / split / e["image"]).is_file() for e in entries)
    assert not set(PATTERNS) & {*COLOURS, *SHAPES, *THING_SIZES, "yes", "no", "left", "right"}


def test_draw_scene_colours_where_the_things_are():
    rng = random.Random(1)
    for _ in range(20):
        things = build_scene(rng, "count", ("shape", "circle"), "3")
        image = np.asarray(draw_scene(things, rng, image_size=96, noise=0.0)).astype(int)
        occupied = {(t.row, t.col): t for t in things}
        for row in range(GRID):
            for col in range(GRID):
                cell = image[row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32].reshape(-1, 3)
                coloured = cell[cell.max(1) - cell.min(1) > 60]  # the background is grey
                if (row, col) not in occupied:
                    assert len(coloured) == 0
                    continue
                mean = coloured.mean(0)
                nearest = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
                assert nearest == occupied[(row, col)].colour


def image_hashes(world, split):
    paths = (world / split / "images").iterdir()
    return {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in paths}


def test_splits_are_disjoint(world):
    hashes = {split: image_hashes(world, split) for split in SPLITS}
    assert all(len(hashes[s]) == SIZES[s] for s in SPLITS)  # no duplicate scene inside a split either
    assert not hashes["train"] & hashes["val"] and not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    assert len({split_seed(3, s) for s in SPLITS}) == 3


def test_deterministic_per_seed(tmp_path, world):
    again = synthesize(tmp_path / "again", SIZES["train"], 5, 5, seed=3)
    assert (again / "train" / "qa.json").read_bytes() == (world / "train" / "qa.json").read_bytes()
    assert image_hashes(again, "train") == image_hashes(world, "train")
    other = synthesize(tmp_path / "other", 20, 5, 5, seed=4)
    assert load_qa(other, "train") != load_qa(world, "train")[:20]


def test_interleaved_documents_read_back(world):
    docs = list(shard_pipeline(str(world / "val" / "shards"), shuffle_buffer=0))
    assert sum(sum("image" in s for s in d["segments"]) for d in docs) == SIZES["val"]
    first = docs[0]["segments"]
    assert first[0]["image"].size == (64, 64) and first[1]["text"].startswith("in the first picture there is a ")
    assert first[-1]["text"].startswith("the first has ")
    assert all(2 <= sum("image" in s for s in d["segments"]) <= 3 for d in docs[:-1])


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "w"), "--n", "20", "--seed", "5", "--image-size", "48"]) == 0
    assert "train=20 val=2 test=2" in capsys.readouterr().out
    assert len(load_qa(tmp_path / "w", "val")) == 2
    assert Image.open(tmp_path / "w" / "train" / "images" / "000000.png").size == (48, 48)
