"""`mmdlm-data check`: read a LLaVA JSON set or a shard set through and list what would hurt training.

Counts (entries, images, turns, samples) and problems: missing or unreadable images, empty turns,
conversations with no answer, unreadable shard members, and, given a tokenizer and max_length,
samples longer than max_length. Unlike the loaders it never stops at the first problem.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from mmdlm.data.errors import DataError
from mmdlm.data.llava import entry_images, entry_name, entry_problems, read_image, read_json_list, repeated_id
from mmdlm.data.shards import decode_sample, describe, expand_shards
from mmdlm.data.template import ChatEncoder, place_image_tokens, with_system_turn


@dataclass
class Report:
    name: str
    counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def lines(self, limit: int = 50) -> list[str]:
        """Return the printable report: a counts line, then at most `limit` problem lines."""
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        out = [f"{self.name}: {counts}; {len(self.problems)} problem(s)"]
        out += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"  ... {len(self.problems) - limit} more problem(s) not shown (--limit)")
        return out


class LengthCheck:
    """Measures samples in tokens as the Collator builds them (image runs and the model's system turn included).

    `num_image_tokens` is one run length, or a function of an image's (width, height) for any-resolution models.
    """

    def __init__(self, tokenizer, max_length: int, num_image_tokens: int | Callable[[tuple[int, int]], int],
                 system_prompt: str | None = None):
        self.chat, self.max_length, self.num_image_tokens = ChatEncoder(tokenizer), max_length, num_image_tokens
        self.system_prompt = system_prompt

    def run(self, size: tuple[int, int]) -> int:
        return self.num_image_tokens(size) if callable(self.num_image_tokens) else self.num_image_tokens

    def conversation(self, conversations: list[dict], sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """Return (the sample's length, its first question's prompt length) for images of these sizes."""
        turns = with_system_turn(place_image_tokens(conversations, len(sizes)), self.system_prompt)
        conv = self.chat.encode_conversation(turns)
        extra = [self.run(size) - 1 for size in sizes]  # each placeholder becomes a run
        first = conv.is_answer.index(True) if True in conv.is_answer else len(conv.ids)
        before = conv.ids[:first].count(self.chat.special.image)
        return len(conv.ids) + sum(extra), first + sum(extra[:before])

    def segments(self, segments: list[dict]) -> int:
        text = sum(len(self.chat.text_ids(s["text"])) for s in segments if "text" in s)
        return 2 + text + sum(self.run(s["image"].size) for s in segments if "image" in s)  # + BOS and EOS

    def problem(self, length: int, prompt: int = 0) -> str | None:
        if prompt >= self.max_length:
            return (f"over-long: the prompt alone is {prompt} tokens, no room for an answer within max_length "
                    f"{self.max_length} (training stops on it, or skips it with data.on_error=skip)")
        if length <= self.max_length:
            return None
        return f"over-long: {length} tokens > max_length {self.max_length} (trailing turns/text would be dropped)"


def _read_image(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """Return (why the image cannot be used or None, its (width, height) or None)."""
    try:
        return None, read_image(path).size
    except DataError as error:
        return str(error), None


def check_llava(json_path: str | Path, image_folder: str | Path | None = None, length: LengthCheck | None = None):
    """Return the Report of a LLaVA JSON file; DataError if the file itself cannot be read."""
    json_path = Path(json_path)
    folder = Path(image_folder) if image_folder is not None else json_path.parent
    report = Report(f"{json_path} (LLaVA JSON, images under {folder})")
    entries, seen = read_json_list(json_path), {}
    for index, entry in enumerate(entries):
        name = entry_name(json_path, entry, index)
        problems = entry_problems(entry, folder) + [repeated_id(seen, entry, index)]
        report.counts["entries"] += 1
        if isinstance(entry, dict) and isinstance(entry.get("conversations"), list):
            report.counts["turns"] += len(entry["conversations"])
        try:
            paths = entry_images(entry) if isinstance(entry, dict) else []
        except DataError:
            paths = []
        report.counts["images"] += len(paths)
        report.counts["text-only"] += not paths
        sizes = []
        for path in paths:
            problem, size = _read_image(folder / path) if (folder / path).is_file() else (None, None)
            problems.append(problem and f"image '{path}' {problem}")
            sizes.append(size)
        if not any(problems) and length is not None:
            problems.append(length.problem(*length.conversation(entry["conversations"], sizes)))
        report.problems += [f"{name}: {p}" for p in problems if p]
    return report


def check_shards(urls, length: LengthCheck | None = None) -> Report:
    """Return the Report of a shard set (a .tar, a folder of them, or a brace pattern)."""
    shards = expand_shards(urls)
    report = Report(f"{urls} ({len(shards)} shard(s))")
    report.counts["shards"] = len(shards)

    def record(error: Exception) -> bool:
        report.problems.append(f"shard read error: {describe(error)}")
        return True

    raw = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=record))
    for sample in raw:
        report.counts["samples"] += 1
        try:
            doc = decode_sample(sample)
        except DataError as error:
            report.problems.append(str(error))
            continue
        segments = doc["segments"]
        report.counts["images"] += sum("image" in s for s in segments)
        report.counts["text segments"] += sum("text" in s for s in segments)
        where = f"{sample.get('__url__')} sample {doc['id']}"
        if any("text" in s and not s["text"].strip() for s in segments):
            report.problems.append(f"{where}: empty text segment")
        if not any("text" in s and s["text"].strip() for s in segments):
            report.problems.append(f"{where}: no text to learn from")
        problem = length.problem(length.segments(segments)) if length is not None else None
        if problem:
            report.problems.append(f"{where}: {problem}")
    return report


def check_path(path: str, image_folder: str | None = None, length: LengthCheck | None = None) -> list[Report]:
    """Return the reports for PATH: a .json set, a shard set, or a folder holding either (e.g. a demo split)."""
    target = Path(path)
    if target.suffix == ".json":
        return [check_llava(target, image_folder, length)]
    if target.is_dir():
        reports = [check_llava(p, image_folder, length) for p in sorted(target.glob("*.json"))]
        for folder in (target, target / "shards"):
            if folder.is_dir() and any(folder.glob("*.tar")):
                reports.append(check_shards(str(folder), length))
        if not reports:
            raise DataError(f"{path}: no *.json set and no *.tar shards found in this folder")
        return reports
    return [check_shards(path, length)]
