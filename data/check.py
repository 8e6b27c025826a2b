"""`mmdlm-data check`: read a LLaVA JSON set or a shard set through and list what would hurt training.

Counts (entries, images, turns, samples) and problems: missing or unreadable images, empty turns,
conversations with no answer, unreadable shard members, and, given a tokenizer and max_length,
samples longer than max_length. Unlike the loaders it never stops at the first problem.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from mmdlm.data.errors import DataError
from mmdlm.data.llava import entry_images, entry_name, entry_problems, read_image, read_json_list
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
    """Measures samples in tokens as the Collator builds them (image runs and the model's system turn included)."""

    def __init__(self, tokenizer, max_length: int, num_image_tokens: int, system_prompt: str | None = None):
        self.chat, self.max_length, self.num_image_tokens = ChatEncoder(tokenizer), max_length, num_image_tokens
        self.system_prompt = system_prompt

    def conversation(self, conversations: list[dict], num_images: int) -> int:
        turns = with_system_turn(place_image_tokens(conversations, num_images), self.system_prompt)
        ids = self.chat.encode_conversation(turns).ids
        return len(ids) + num_images * (self.num_image_tokens - 1)

    def segments(self, segments: list[dict]) -> int:
        text = sum(len(self.chat.text_ids(s["text"])) for s in segments if "text" in s)
        return 2 + text + self.num_image_tokens * sum("image" in s for s in segments)  # + BOS and EOS

    def problem(self, length: int) -> str | None:
        if length <= self.max_length:
            return None
        return f"over-long: {length} tokens > max_length {self.max_length} (trailing turns/text would be dropped)"


def _image_problem(path: Path) -> str | None:
    try:
        read_image(path)
    except DataError as error:
        return str(error)
    return None


def check_llava(json_path: str | Path, image_folder: str | Path | None = None, length: LengthCheck | None = None):
    """Return the Report of a LLaVA JSON file; DataError if the file itself cannot be read."""
    json_path = Path(json_path)
    folder = Path(image_folder) if image_folder is not None else json_path.parent
    report = Report(f"{json_path} (LLaVA JSON, images under {folder})")
    entries = read_json_list(json_path)
    for index, entry in enumerate(entries):
        name = entry_name(json_path, entry, index)
        problems = entry_problems(entry, folder)
        report.counts["entries"] += 1
        if isinstance(entry, dict) and isinstance(entry.get("conversations"), list):
            report.counts["turns"] += len(entry["conversations"])
        try:
            paths = entry_images(entry) if isinstance(entry, dict) else []
        except DataError:
            paths = []
        report.counts["images"] += len(paths)
        report.counts["text-only"] += not paths
        for path in paths:
            problem = _image_problem(folder / path) if (folder / path).is_file() else None
            if problem:
                problems.append(f"image '{path}' {problem}")
        if not problems and length is not None:
            problems.append(length.problem(length.conversation(entry["conversations"], len(paths))))
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
