"""A second generated world, for fine-tuning: textures, not coloured shapes.

Each image is filled with one of ten patterns (random colours, scale, phase and orientation
within the pattern's kind, pixel noise), and the one question asks which. The answer words are
ones the demo world never uses, so the demo tokenizer splits most of them into several pieces:
the set tests that a fine-tune learns new images *and* new multi-token words. Questions and
answers are balanced (a deck per split), so a model that ignores the image scores 10%.

    mmdlm-data synth --world textures --out DIR --n 1500
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from mmdlm.data.scenes import Deck

PATTERNS = ("stripes", "checkerboard", "dots", "rings", "waves", "zigzag", "grid", "diagonal", "speckles", "gradient")
QUESTIONS = ("What pattern is this?", "Which texture fills the image?", "Name the pattern.")


def draw_texture(pattern: str, rng: random.Random, size: int = 64, noise: float = 0.05) -> Image.Image:
    """Return an RGB image of `pattern` with random colours, period and phase."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6, 12)
    phase = rng.uniform(0, 2 * np.pi)
    wave = lambda v: np.sin(2 * np.pi * v / period + phase) > 0  # noqa: E731
    if pattern == "stripes":  # horizontal or vertical bands
        mask = wave(x if rng.random() < 0.5 else y)
    elif pattern == "checkerboard":
        mask = wave(x) ^ wave(y)
    elif pattern == "dots":
        cx, cy = (x + phase) % period - period / 2, (y + phase) % period - period / 2
        mask = cx**2 + cy**2 < (period / 4) ** 2
    elif pattern == "rings":
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
        mask = wave(np.hypot(x - cx, y - cy))
    elif pattern == "waves":
        mask = wave(y + 4 * np.sin(2 * np.pi * x / (2 * period)))
    elif pattern == "zigzag":
        mask = wave(y + np.abs((x % period) - period / 2) * 1.5)
    elif pattern == "grid":
        mask = ((x + phase) % period < 2) | ((y + phase) % period < 2)
    elif pattern == "diagonal":
        mask = wave((x + y) / 1.4 if rng.random() < 0.5 else (x - y) / 1.4)
    elif pattern == "speckles":
        mask = np.random.default_rng(rng.getrandbits(32)).random((size, size)) < 0.3
    elif pattern == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * x + np.sin(angle) * y) / size
        mask = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)  # a smooth ramp, not a binary mask
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    fg, bg = (np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32) for _ in range(2))
    while np.abs(fg - bg).sum() < 150:  # enough contrast that the pattern is visible
        fg = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    weight = np.asarray(mask, dtype=np.float32)[..., None]
    pixels = weight * fg + (1 - weight) * bg
    pixels += np.random.default_rng(rng.getrandbits(32)).normal(0, noise * 255, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def synthesize_textures(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, size: int = 64,
                        patterns: tuple[str, ...] = PATTERNS) -> Path:
    """Write `train/` and `test/` (images/ + qa.json, LLaVA JSON) under out_dir; return it."""
    out = Path(out_dir)
    for split, n in (("train", n_train), ("test", n_test)):
        rng = random.Random(f"mmdlm-textures-{seed}-{split}")
        patterns_deck, questions = Deck(patterns, rng), Deck(QUESTIONS, rng)
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        entries = []
        for index in range(n):
            pattern = patterns_deck.draw()
            relative = f"images/{index:06d}.png"
            draw_texture(pattern, rng, size).save(out / split / relative)
            entries.append({"id": f"{split}-tex-{index:06d}", "image": relative, "conversations": [
                {"from": "human", "value": "<image>\n" + questions.draw()}, {"from": "gpt", "value": pattern}]})
        (out / split / "qa.json").write_text(json.dumps(entries, indent=1))
    return out
