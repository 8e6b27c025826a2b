"""Webdataset shards: writing, the reading pipeline (splitting, shuffling, resampling), and broken shards."""

import io
import tarfile
import warnings

import pytest
import torch
from PIL import Image

from mmdlm.data.cli import main
from mmdlm.data.errors import DataError, DataWarning
from mmdlm.data.shards import shard_pipeline, write_caption_shards, write_interleaved_shards


def solid(colour, size=(8, 8)):
    return Image.new("RGB", size, colour)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_docs(n, start=0):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    return [
        {"id": f"doc.{i}", "segments": [{"text": f"doc {i} begins"}, {"image": solid(colours[i % 3])},
                                        {"text": "then"}, {"image": png_bytes(solid((9, 9, 9), (4, 6)))}]}
        for i in range(start, start + n)
    ]


def read_all(urls, **kw):
    kw.setdefault("shuffle_buffer", 0)
    pipeline = shard_pipeline(urls, **kw)
    return list(pipeline), pipeline.skips


def test_interleaved_round_trip(tmp_path):
    written = write_interleaved_shards(make_docs(5), str(tmp_path / "docs-%06d.tar"), maxcount=2)
    assert [p.rsplit("/", 1)[1] for p in written] == ["docs-000000.tar", "docs-000001.tar", "docs-000002.tar"]
    docs, skips = read_all(str(tmp_path / "docs-{000000..000002}.tar"))
    assert [d["id"] for d in docs] == [f"doc_{i}" for i in range(5)]  # dots in keys replaced
    segments = docs[1]["segments"]
    assert [next(iter(s)) for s in segments] == ["text", "image", "text", "image"]
    assert segments[0]["text"] == "doc 1 begins" and segments[1]["image"].getpixel((0, 0)) == (0, 255, 0)
    assert segments[3]["image"].size == (4, 6) and segments[3]["image"].mode == "RGB"
    assert skips.count == 0


def test_caption_shards(tmp_path):
    (tmp_path / "c.png").write_bytes(png_bytes(solid((1, 2, 3))))
    items = [{"id": "a", "image": tmp_path / "c.png", "text": "a dot"}, {"id": "b", "image": solid(7), "text": "b"}]
    write_caption_shards(items, str(tmp_path / "cap-%03d.tar"))
    docs, _ = read_all(str(tmp_path / "cap-000.tar"))
    assert docs[0]["segments"][1] == {"text": "a dot"} and docs[0]["segments"][0]["image"].getpixel((0, 0)) == (1, 2, 3)
    assert docs[1]["id"] == "b"


def test_shuffle_is_seeded_permutation(tmp_path):
    write_interleaved_shards(make_docs(12), str(tmp_path / "d-%03d.tar"), maxcount=3)
    ids = [[d["id"] for d in read_all(str(tmp_path), shuffle_buffer=8, seed=s)[0]] for s in (0, 0, 1)]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert sorted(ids[0]) == sorted(f"doc_{i}" for i in range(12)) and ids[0] != sorted(ids[0])


def test_split_by_node(tmp_path, monkeypatch):
    write_interleaved_shards(make_docs(8), str(tmp_path / "d-%03d.tar"), maxcount=2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({d["id"] for d in read_all(str(tmp_path), shuffle_buffer=4, seed=3)[0]})
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(DataError, match="4 shard\\(s\\) for 16 readers"):
        shard_pipeline(str(tmp_path), num_workers=2)


def test_resampled_epochs(tmp_path):
    write_interleaved_shards(make_docs(4), str(tmp_path / "d-%03d.tar"), maxcount=1)
    docs, _ = read_all(str(tmp_path), resampled=True, epoch_length=10, seed=1)
    assert len(docs) == 10 and len({d["id"] for d in docs}) <= 4
    assert [d["id"] for d in read_all(str(tmp_path), resampled=True, epoch_length=10, seed=1)[0]] == [
        d["id"] for d in docs
    ]  # deterministic per seed
    pipeline = shard_pipeline(str(tmp_path), shuffle_buffer=0, resampled=True, epoch_length=10, num_workers=2)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    assert len(list(loader)) == 10  # epoch_length counts per rank, over all its workers


def test_dataloader_workers_split_shards(tmp_path):
    write_interleaved_shards(make_docs(6), str(tmp_path / "d-%03d.tar"), maxcount=2)
    loader = torch.utils.data.DataLoader(
        shard_pipeline(str(tmp_path), shuffle_buffer=0, num_workers=2), batch_size=None, num_workers=2
    )
    assert sorted(d["id"] for d in loader) == [f"doc_{i}" for i in range(6)]


def test_missing_shards_clear_error(tmp_path):
    with pytest.raises(DataError, match="no shards found"):
        shard_pipeline(str(tmp_path))
    write_caption_shards([{"id": "x", "image": solid(1), "text": "fine"}], str(tmp_path / "x-%03d.tar"))
    with pytest.raises(DataError, match="1 shard\\(s\\) not found, first: .*x-001.tar"):
        shard_pipeline(str(tmp_path / "x-{000..001}.tar"))


def truncated_shard(tmp_path):
    """Two shards: the first cut in the middle of its fourth document's image, the second intact."""
    write_interleaved_shards(make_docs(4), str(tmp_path / "t-%03d.tar"), maxcount=10)
    write_interleaved_shards(make_docs(2, start=4), str(tmp_path / "u-%03d.tar"), maxcount=10)
    data = (tmp_path / "t-000.tar").read_bytes()
    cut = data.index(b"doc_3.1.png") + 512 + 40  # header block, then 40 bytes of the image
    (tmp_path / "t-000.tar").write_bytes(data[:cut])
    return tmp_path / "t-000.tar"


def test_truncated_shard_skips_and_goes_on(tmp_path):
    truncated_shard(tmp_path)
    with pytest.warns(DataWarning, match="skipped a shard sample"):
        docs, skips = read_all([str(tmp_path / "t-000.tar"), str(tmp_path / "u-000.tar")])
    assert [d["id"] for d in docs] == ["doc_0", "doc_1", "doc_2", "doc_4", "doc_5"]
    assert skips.reasons["DataError"] == 1 and skips.reasons["ReadError"] >= 1  # the cut document, the tar error


def test_corrupt_image_and_bad_json_in_shard(tmp_path):
    docs = make_docs(3)
    docs[1]["segments"][1]["image"] = b"\x89PNG\r\n\x1a\n broken"
    with pytest.raises(Exception):  # noqa: B017 - the writer sniffs the format of raw bytes
        write_interleaved_shards(docs, str(tmp_path / "never-%03d.tar"))
    docs[1]["segments"][1]["image"] = tmp_path / "bad.png"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_interleaved_shards(docs, str(tmp_path / "b-%03d.tar"))
    write_caption_shards([{"id": "x", "image": solid(1), "text": "fine"}], str(tmp_path / "c-%03d.tar"))
    with tarfile.open(tmp_path / "j-000.tar", "w") as tar:  # a document whose json is not JSON
        info = tarfile.TarInfo("doc9.json")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"[{oops"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read, skips = read_all([str(tmp_path / "b-000.tar"), str(tmp_path / "c-000.tar"), str(tmp_path / "j-000.tar")])
    assert [d["id"] for d in read] == ["doc_0", "doc_2", "x"]
    assert skips.count == 2 and skips.reasons["DataError"] == 2
    messages = [str(w.message) for w in caught if w.category is DataWarning]
    assert any("sample doc_1" in m and "unreadable image" in m for m in messages)
    assert any("sample doc9: malformed json" in m for m in messages)


def test_check_shards(tmp_path, capsys):
    write_interleaved_shards(make_docs(2, start=4), str(tmp_path / "ok-%03d.tar"))
    assert main(["check", str(tmp_path / "ok-000.tar")]) == 0
    assert "shards=1, samples=2, images=4, text segments=4; 0 problem(s)" in capsys.readouterr().out
    truncated_shard(tmp_path)
    assert main(["check", str(tmp_path / "t-000.tar")]) == 1
    out = capsys.readouterr().out
    assert "shard read error" in out or "missing from the shard" in out
