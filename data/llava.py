"""LLaVA JSON conversation sets, the format users bring for VQA fine-tuning, as a map-style Dataset.

    [{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] | absent,
      "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}]

Entries are checked when the file is loaded (structure, answers, placeholders, image files exist);
images are decoded when a sample is read. Every problem names the file, the entry id and the path.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from mmdlm.config import ConfigError
from mmdlm.data.errors import ON_ERROR, DataError, DataWarning
from mmdlm.data.template import conversation_problems, place_image_tokens


def read_json_list(json_path: Path) -> list:
    """Return the top-level list of a LLaVA JSON file; DataError naming the line for malformed JSON."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DataError(f"{json_path}: file not found") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{json_path}: not UTF-8 text ({error})") from error
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise DataError(f"{json_path}: malformed JSON at {where}: {error.msg}") from error
    if not isinstance(data, list):
        raise DataError(f"{json_path}: the top level must be a list of entries, got {type(data).__name__}")
    return data


def entry_name(json_path: Path, entry: object, index: int) -> str:
    """Return how problems refer to an entry: `qa.json entry id=17`, or by position when it has no id."""
    has_id = isinstance(entry, dict) and "id" in entry
    return f"{json_path.name} entry id={entry['id']}" if has_id else f"{json_path.name} entry #{index} (no id)"


def entry_id(entry: object, index: int) -> str:
    """Return the id answers and scores are matched by: the entry's "id", else its position in the file."""
    return str(entry["id"]) if isinstance(entry, dict) and "id" in entry else str(index)


def repeated_id(seen: dict[str, int], entry: object, index: int) -> str | None:
    """Record the entry's id in `seen` (id -> first position); return the problem when an earlier entry has it."""
    key = entry_id(entry, index)
    first = seen.setdefault(key, index)
    if first == index:
        return None
    return (f"id {key!r} is also entry #{first}'s: answers are matched to questions by id (evaluate.py, "
            "infer.py --resume), so each entry needs its own")


def entry_images(entry: dict) -> list[str]:
    """Return the entry's image paths: `image` as a string, a list of strings, or absent (text-only)."""
    image = entry.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) for p in image):
        return list(image)
    raise DataError(f"'image' must be a path, a list of paths or absent, got {image!r}")


def read_image(path: Path) -> Image.Image:
    """Return the image at `path` as RGB; DataError saying why not (corrupt, truncated, a decompression bomb)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes now: a truncated file fails here, not in a batch
    except Image.DecompressionBombError as error:  # not an OSError: Pillow refuses before allocating
        raise DataError(f"too large to decode safely ({error}); downscale it") from error
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
        raise DataError(f"unreadable ({error})") from error


def entry_problems(entry: object, image_folder: Path, check_files: bool = True) -> list[str]:
    """Return what is wrong with one entry (empty when it can train)."""
    if not isinstance(entry, dict):
        return [f"must be a JSON object, got {type(entry).__name__}"]
    try:
        images = entry_images(entry)
    except DataError as error:
        return [str(error)]
    problems = conversation_problems(entry.get("conversations"))
    if not problems:
        try:
            place_image_tokens(entry["conversations"], len(images))
        except DataError as error:
            problems.append(str(error))
    if check_files:
        problems += [f"image '{p}' not found under {image_folder}" for p in images if not (image_folder / p).is_file()]
    return problems


class LlavaDataset(Dataset):
    """Samples `{"id", "images": [PIL RGB], "conversations": [...]}` with '<image>' placeholders in place.

    on_error="stop": a bad entry stops loading with a DataError naming it (the default, so a typo in a
    custom set is seen at once); "skip": each bad entry is dropped with one warning line naming it
    (the first `max_warnings`; all are counted in `skipped`), and an image that fails to decode
    makes `__getitem__` return None, which the Collator drops and counts.
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path | None = None, on_error: str = "stop",
                 max_warnings: int = 20):
        if on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error={on_error!r} must be one of {ON_ERROR}")
        self.json_path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.json_path.parent
        self.on_error = on_error
        self.entries, bad = [], []
        for index, entry in enumerate(read_json_list(self.json_path)):
            problems = entry_problems(entry, self.image_folder)
            if problems:
                bad.append(f"{entry_name(self.json_path, entry, index)}: {problems[0]}")
            else:
                self.entries.append((index, entry))
        if bad and on_error == "stop":
            more = f" (and {len(bad) - 1} more; `mmdlm-data check {self.json_path}` lists them)" if len(bad) > 1 else ""
            raise DataError(bad[0] + more + "; set data.on_error=skip to train without the bad entries")
        for number, line in enumerate(bad[:max_warnings], start=1):
            more = number == max_warnings < len(bad)
            warnings.warn(f"skipped {line}" + (f" ({len(bad) - number} more: counted, not shown)" if more else ""),
                          DataWarning, 2)
        self.skipped = len(bad)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict | None:
        position, entry = self.entries[index]
        paths = entry_images(entry)
        images = []
        for path in paths:
            try:
                images.append(read_image(self.image_folder / path))
            except DataError as error:
                message = f"{entry_name(self.json_path, entry, position)}: image '{path}' {error}"
                if self.on_error == "stop":
                    raise DataError(message) from error
                warnings.warn(f"skipped {message}", DataWarning, 2)
                return None
        sample_id = entry_id(entry, position)
        conversations = place_image_tokens(entry["conversations"], len(paths))
        return {"id": sample_id, "images": images, "conversations": conversations}
