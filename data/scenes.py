"""The demo world's scenes: coloured shapes on a 3x3 grid, drawn with Pillow, and the text about them.

A question is drawn first (its type, the attribute it names, its answer, each from a shuffled
deck so every answer is equally frequent for every question text), then a scene is built that
makes that answer true. Hence a model that reads only the question scores exactly chance: the
image is the only way to the answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mmdlm.data.errors import DataError

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = ("1", "2", "3", "4")
QUESTION_TYPES = ("colour", "shape", "count", "position", "existence")
GRID = 3  # cells per side; the column decides "left" / "right"
PLACES = {  # (row, col) -> phrase used in captions
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    row: int
    col: int


@dataclass
class Question:
    kind: str  # one of QUESTION_TYPES
    text: str
    answer: str


class Deck:
    """Draws items from shuffled full passes over a list, so frequencies stay balanced to within one."""

    def __init__(self, items, rng: random.Random):
        self.items, self.rng, self.pile = list(items), rng, []

    def draw(self):
        if not self.pile:
            self.pile = list(self.items)
            self.rng.shuffle(self.pile)
        return self.pile.pop()


def _question_keys(kind: str) -> list[tuple]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return {
        "colour": [(s,) for s in SHAPES],
        "shape": [(c,) for c in COLOURS],
        "count": [("colour", c) for c in COLOURS] + [("shape", s) for s in SHAPES],
        "position": pairs,
        "existence": pairs,
    }[kind]


_ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": ("left", "right"),
            "existence": ("yes", "no")}


class QuestionSampler:
    """Yields (kind, key, answer) triples balanced per type and, within one, per question text.

    The answer is drawn from a deck per type, then the question's key from a deck per (type, answer):
    each answer is spread evenly over the question texts, so no text predicts its answer.
    """

    def __init__(self, rng: random.Random):
        self.kinds = Deck(QUESTION_TYPES, rng)
        self.answers = {k: Deck(_ANSWERS[k], rng) for k in QUESTION_TYPES}
        self.keys = {(k, a): Deck(_question_keys(k), rng) for k in QUESTION_TYPES for a in _ANSWERS[k]}

    def draw(self) -> tuple[str, tuple, str]:
        kind = self.kinds.draw()
        answer = self.answers[kind].draw()
        return kind, self.keys[(kind, answer)].draw(), answer


def question_text(kind: str, key: tuple) -> str:
    """Return the question's wording; it depends on the type and the named attributes, never on the answer."""
    if kind == "colour":
        return f"What colour is the {key[0]}?"
    if kind == "shape":
        return f"What shape is the {key[0]} object?"
    if kind == "count":
        return f"How many {key[1]} objects are there?" if key[0] == "colour" else f"How many {key[1]}s are there?"
    if kind == "position":
        return f"Is the {key[0]} {key[1]} on the left or the right?"
    return f"Is there a {key[0]} {key[1]}?"


def _random_thing(rng: random.Random, cells: list, allowed) -> Thing:
    """Return a thing in the next free cell whose (colour, shape) passes `allowed`."""
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if allowed(colour, shape):
            row, col = cells.pop()
            return Thing(shape, colour, rng.choice(SIZES), row, col)


def build_scene(rng: random.Random, kind: str, key: tuple, answer: str) -> list[Thing]:
    """Return the things of a scene in which `answer` is the true answer to question (kind, key)."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    things: list[Thing] = []

    def target(colour: str, shape: str, col: int | None = None) -> None:
        choices = [cell for cell in cells if col is None or cell[1] == col]
        cell = rng.choice(choices)
        cells.remove(cell)
        things.append(Thing(shape, colour, rng.choice(SIZES), *cell))

    def others(n: int, allowed) -> None:
        things.extend(_random_thing(rng, cells, allowed) for _ in range(n))

    if kind == "colour":
        target(answer, key[0])
        others(rng.randint(0, 3), lambda c, s: s != key[0])
    elif kind == "shape":
        target(key[0], answer)
        others(rng.randint(0, 3), lambda c, s: c != key[0])
    elif kind == "count":
        attr, value = key
        match = (lambda c, s: c == value) if attr == "colour" else (lambda c, s: s == value)
        others(int(answer), match)
        others(rng.randint(0, 2), lambda c, s: not match(c, s))
    elif kind == "position":
        target(*key, col=0 if answer == "left" else GRID - 1)
        others(rng.randint(0, 3), lambda c, s: (c, s) != key)
    else:  # existence: same object-count distribution for yes and no, so the count gives nothing away
        total = rng.randint(1, 4)
        if answer == "yes":
            target(*key)
            total -= 1
        others(total, lambda c, s: (c, s) != key)
    rng.shuffle(things)  # drawing order matters only when occlusion lets things overlap
    return things


def caption(things: list[Thing]) -> str:
    """Return a short templated caption listing the things in reading order."""
    parts = [f"a {t.size} {t.colour} {t.shape} {PLACES[(t.row, t.col)]}" for t in sorted(things, key=_cell)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


CELL_ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}  # class 0 of each = empty cell
_ALTERNATIVES = ["|".join(v) for v in (SIZES, COLOURS, SHAPES, sorted(PLACES.values(), key=len, reverse=True))]
_CAPTION_PART = re.compile("a ({}) ({}) ({}) ({})".format(*_ALTERNATIVES))  # longest place first: "at the top left"


def cell_labels(text: str) -> list[list[int]]:
    """Return [GRID*GRID cells][colour, shape, size] class ids of a templated caption (0 = empty cell).

    The demo world's own supervision for its tower-pretraining stage: its captions name every
    object's size, colour, shape and cell. DataError when the caption is not one of the world's.
    """
    cell_of = {phrase: row * GRID + col for (row, col), phrase in PLACES.items()}
    labels = [[0, 0, 0] for _ in range(GRID * GRID)]
    parts = _CAPTION_PART.findall(text)
    if not parts:
        raise DataError(f"not a demo-world caption: {text[:80]!r} (the per-cell labels exist only in the demo "
                        "world; pretrain your own tower with configs/train/demo_tower_caption.yaml)")
    for size, colour, shape, place in parts:
        labels[cell_of[place]] = [CELL_ATTRIBUTES["colour"].index(colour) + 1, SHAPES.index(shape) + 1,
                                  SIZES.index(size) + 1]
    return labels


def _cell(thing: Thing) -> tuple[int, int]:
    return thing.row, thing.col


def draw_scene(
    things: list[Thing], rng: random.Random, image_size: int = 64, noise: float = 0.03, occlusion: float = 0.0
) -> Image.Image:
    """Return the RGB image of a scene: jittered shapes and colours, a dark random background, pixel noise.

    With probability `occlusion` a thing may stray up to a quarter of its size out of its cell and
    overlap a neighbour; otherwise it stays inside its cell, so positions and counts are unambiguous.
    """
    grey = rng.randint(20, 90)
    image = Image.new("RGB", (image_size, image_size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    cell = image_size / GRID
    for t in things:
        half = cell * (0.40 if t.size == "large" else 0.22)
        slack = cell / 2 - half + (half / 2 if rng.random() < occlusion else 0.0)
        cx = (t.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (t.row + 0.5) * cell + rng.uniform(-slack, slack)
        fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[t.colour])
        box = (cx - half, cy - half, cx + half, cy + half)
        if t.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif t.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    if noise > 0:
        pixels = np.asarray(image, dtype=np.float32)
        gaussian = np.random.default_rng(rng.getrandbits(32)).normal(0.0, noise * 255, pixels.shape)
        image = Image.fromarray(np.clip(pixels + gaussian, 0, 255).astype(np.uint8))
    return image
