"""Webdataset shards: writing interleaved documents and captions, and the reading pipeline for training.

One sample is one document. Interleaved: `KEY.json` lists the segments in order, `{"text": ...}` or
`{"image": "0.png"}`, and `KEY.0.png`, `KEY.1.png` ... hold the images it names. Captions:
`KEY.jpg|png` + `KEY.txt`. Both read back as `{"id", "segments": [{"text": str} | {"image": PIL}]}`.
A sample that cannot be read (truncated shard, corrupt image, bad JSON) is skipped, counted and
warned about; training goes on.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from PIL import Image

from mmdlm.data.errors import DataError, DataWarning

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


# ----------------------------------------------------------------------------------------- writing
def _sample_key(key: str) -> str:
    # webdataset splits a member name at its first dot: a dot in the key would cut the sample in two.
    return str(key).replace(".", "_").replace("/", "_")


def _image_member(image) -> tuple[str, bytes]:
    """Return (extension, encoded bytes) for a path, raw bytes or a PIL image (PNG)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        return path.suffix.lstrip(".").lower().replace("jpeg", "jpg"), path.read_bytes()
    if isinstance(image, bytes):
        return Image.open(io.BytesIO(image)).format.lower().replace("jpeg", "jpg"), image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _writer(out_pattern: str, maxcount: int, written: list[str]) -> wds.ShardWriter:
    if "%" not in out_pattern:
        raise DataError(f"out_pattern {out_pattern!r} needs a shard-number field, e.g. 'out/docs-%06d.tar'")
    Path(out_pattern).parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same samples give byte-identical shards.
    return wds.ShardWriter(out_pattern, maxcount=maxcount, verbose=0, post=written.append, mtime=0)


def write_interleaved_shards(docs: Iterable[dict], out_pattern: str, maxcount: int = 1000) -> list[str]:
    """Return the shard paths written from `docs` ({"id", "segments"}; an image is a path, bytes or PIL image).

    `out_pattern` is a printf pattern such as `out/docs-%06d.tar`.
    """
    written: list[str] = []
    with _writer(out_pattern, maxcount, written) as sink:
        for doc in docs:
            sample, segments = {"__key__": _sample_key(doc["id"])}, []
            for segment in doc["segments"]:
                if "text" in segment:
                    segments.append({"text": segment["text"]})
                else:
                    extension, data = _image_member(segment["image"])
                    name = f"{len(sample) - 1}.{extension}"
                    sample[name] = data
                    segments.append({"image": name})
            sample["json"] = json.dumps(segments).encode()
            sink.write(sample)
    return written


def write_caption_shards(items: Iterable[dict], out_pattern: str, maxcount: int = 1000) -> list[str]:
    """Return the shard paths written from `items` ({"id", "image": path | bytes | PIL, "text": caption})."""
    written: list[str] = []
    with _writer(out_pattern, maxcount, written) as sink:
        for item in items:
            extension, data = _image_member(item["image"])
            sink.write({"__key__": _sample_key(item["id"]), extension: data, "txt": item["text"].encode()})
    return written


# ----------------------------------------------------------------------------------------- reading
def describe(error: Exception) -> str:
    """Return one line for a pipeline error: its type, its message and the shard it came from."""
    # webdataset appends the stream and the url to an exception's args on its way up.
    message, _, stream = str(error.args[0]).partition(" @ <") if error.args else ("", "", "")
    named = re.search(r"name='([^']+)'", stream)
    shard = named.group(1) if named else next((a for a in reversed(error.args[1:]) if isinstance(a, str)), None)
    where = f" (shard {shard})" if shard and shard not in message else ""
    return f"{type(error).__name__}: {message}{where}"


class SkipCounter:
    """The pipeline's exception handler: warn (the first `max_warnings` times), count, and go on.

    Each DataLoader worker holds its own copy, so with workers > 0 the counts live in the workers
    and only the warnings reach the log.
    """

    def __init__(self, max_warnings: int = 20):
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self.max_warnings = max_warnings

    def __call__(self, error: Exception) -> bool:
        self.count += 1
        self.reasons[type(error).__name__] += 1
        if self.count <= self.max_warnings:
            suffix = " (further skips are counted, not shown)" if self.count == self.max_warnings else ""
            warnings.warn(f"skipped a shard sample: {describe(error)}{suffix}", DataWarning, 2)
        return True


def _open_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:
        raise DataError(f"{where}: unreadable image ({error})") from error
    return image.convert("RGB")


def decode_sample(sample: dict) -> dict:
    """Return {"id", "segments"} from a raw webdataset sample (interleaved json or image+txt caption)."""
    key = sample["__key__"]
    where = f"{sample.get('__url__', '?')} sample {key}"
    if "json" in sample:
        try:
            listed = json.loads(sample["json"])
        except ValueError as error:
            raise DataError(f"{where}: malformed json ({error})") from error
        listed = listed.get("segments") if isinstance(listed, dict) else listed
        if not isinstance(listed, list) or not listed:
            raise DataError(f"{where}: json must list segments, [{{'text': ...}} | {{'image': '0.jpg'}}, ...]")
        segments = []
        for segment in listed:
            if isinstance(segment, dict) and isinstance(segment.get("text"), str):
                segments.append({"text": segment["text"]})
            elif isinstance(segment, dict) and "image" in segment:
                name = str(segment["image"]).lower()
                if name not in sample:
                    raise DataError(f"{where}: image member '{key}.{name}' missing from the shard")
                segments.append({"image": _open_image(sample[name], f"{where} image {name}")})
            else:
                raise DataError(f"{where}: segment {segment!r} has neither 'text' nor 'image'")
        return {"id": key, "segments": segments}
    extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if extension is None or "txt" not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"{where}: incomplete sample {members}, neither a 'json' document nor an image + 'txt' caption")
    text = sample["txt"].decode("utf-8")
    return {"id": key, "segments": [{"image": _open_image(sample[extension], where)}, {"text": text}]}


def expand_shards(urls: str | list[str]) -> list[str]:
    """Return the shard list: brace patterns expanded, a directory's *.tar files, missing local files an error."""
    items = [urls] if isinstance(urls, (str, Path)) else list(urls)
    shards: list[str] = []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            shards += sorted(str(p) for p in Path(item).glob("*.tar"))
        else:
            shards += wds.shardlists.expand_urls(item)
    if not shards:
        hint = "give a .tar file, a folder of them or a pattern like a-{000..009}.tar"
        raise DataError(f"no shards found in {urls!r}; {hint}")
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not os.path.isfile(s)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) not found, first: {missing[0]}")
    return shards


def _world_size() -> int:
    return wds.utils.pytorch_worker_info()[1]  # RANK/WORLD_SIZE from the env, else torch.distributed


def shard_pipeline(
    urls: str | list[str],
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    epoch_length: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    skips: SkipCounter | None = None,
) -> wds.DataPipeline:
    """Return an iterable of {"id", "segments"} samples read from `urls`; `.skips` counts what was skipped.

    resampled=False: each epoch reads every shard once, split over ranks (`split_by_node`) and
    DataLoader workers (`split_by_worker`); needs at least ranks x workers shards.
    resampled=True: every rank and worker draws shards with replacement from its own seed, the
    stream is endless, and `epoch_length` makes epochs. An `epoch_length` also evens out ranks whose
    shards hold different numbers of samples (uneven ranks hang DDP).
    epoch_length counts samples per rank: each of the `num_workers` DataLoader workers yields its share.
    Shard order and resampling advance per epoch only in a living pipeline: give the DataLoader
    `persistent_workers=True`, or every epoch replays the first one's order.
    """
    shards = expand_shards(urls)
    skips = skips or SkipCounter()
    if resampled:
        # No node splitter: each rank and worker resamples from its own seed (rank * 1000 + worker).
        stages = [wds.ResampledShards(shards, seed=seed, deterministic=True)]
    else:
        readers = _world_size() * max(1, num_workers)
        if len(shards) < readers:
            raise DataError(
                f"{len(shards)} shard(s) for {readers} readers (ranks x workers): every reader needs a shard; "
                "write more, smaller shards (lower maxcount), use fewer workers, or resampled=True"
            )
        stages = [wds.SimpleShardList(shards)]
        if shuffle_buffer > 0:  # the same shard order on every rank (same seed) before splitting
            stages.append(wds.detshuffle(bufsize=len(shards), initial=len(shards), seed=seed))
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=skips))
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    stages.append(wds.map(decode_sample, handler=skips))
    pipeline = wds.DataPipeline(*stages)
    if epoch_length is not None:
        pipeline = pipeline.with_epoch(-(-epoch_length // max(1, num_workers)))
    pipeline.skips = skips
    return pipeline
