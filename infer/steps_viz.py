"""--show-steps: the order in which the sampler unmasked an answer, as text, a PNG or a GIF.

Input is what the sampler reports: the answer's tokens as text pieces and, per position, the
forward pass that committed it (0 = given by a template, -1 = dropped after an early stop).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HOLE = "_"  # how a still-masked position is drawn
FONT_SIZE = 16


def canvases(pieces: list[str], commit_step: list[int]) -> list[tuple[int, str]]:
    """Return (forward, canvas text after it) for the start (forward 0) and each forward that committed a token."""
    kept = [(p, s) for p, s in zip(pieces, commit_step) if s >= 0]
    steps = sorted({s for _, s in kept if s > 0})
    return [(k, "".join(p if s <= k else HOLE for p, s in kept)) for k in [0, *steps]]


def order_text(pieces: list[str], commit_step: list[int]) -> str:
    """Return one line per forward: which tokens it committed (in canvas order) and the canvas after it."""
    lines = []
    for k, canvas in canvases(pieces, commit_step)[1:]:
        new = [repr(p) for p, s in zip(pieces, commit_step) if s == k]
        lines.append(f"forward {k:3d}: +{len(new)} {' '.join(new)}\n             {canvas}")
    dropped = sum(s < 0 for s in commit_step)
    if dropped:
        lines.append(f"(early stop: {dropped} tail positions never decoded)")
    return "\n".join(lines)


def _render(lines: list[tuple[str, bool]], width: int) -> Image.Image:
    """Return a white image with one text line per entry; highlighted lines are drawn in blue."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height = FONT_SIZE + 6
    image = Image.new("RGB", (width, 8 + line_height * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for row, (text, highlight) in enumerate(lines):
        draw.text((6, 4 + row * line_height), text, fill=(20, 60, 200) if highlight else (0, 0, 0), font=font)
    return image


def save_steps(path: str | Path, pieces: list[str], commit_step: list[int]) -> Path:
    """Write the unmasking order to `path`: .png one line per forward, .gif one frame per forward."""
    path = Path(path)
    frames = canvases(pieces, commit_step)
    labelled = [f"{k:3d} | {text}" for k, text in frames]
    width = 12 + int(max(ImageFont.load_default(size=FONT_SIZE).getlength(t) for t in labelled))
    if path.suffix.lower() == ".gif":
        images = [_render([(t, True)], width) for t in labelled]
        images[0].save(path, save_all=True, append_images=images[1:], duration=600, loop=0)
    elif path.suffix.lower() == ".png":
        _render([(t, k > 0) for (k, _), t in zip(frames, labelled)], width).save(path)
    else:
        raise ValueError(f"--show-steps {path}: give a .png or .gif path, or no path to print the steps")
    return path
