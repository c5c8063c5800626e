"""imagefm.data.stream: one shard reader (webdataset), every input as units, deterministic
virtual streams split over ranks and workers, skip counts, exact resume with skip_batches."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from imagefm.config import ConfigError
from imagefm.data.formats import ShardWriter, read_shards, text_captions
from imagefm.data.records import Caption, Record
from imagefm.data.shards import expand_shard_spec
from imagefm.data.stream import StreamLoader, detect_format, input_units
from imagefm.data.stream_units import InputOptions


def png(index: int, size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (index * 37 % 256, index * 11 % 256, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (200, index * 13 % 256, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


def numbered(directory: Path, shards: int, per_shard: int, prefix: str = "part",
             key: str = "n") -> list[str]:
    """``shards`` shards of ``per_shard`` captioned records each (our layout); their keys."""
    keys = []
    with ShardWriter(directory, prefix=prefix, max_samples=per_shard) as writer:
        for index in range(shards * per_shard):
            record = Record(key=f"{key}{index:03d}", image=png(index),
                            captions=[Caption(f"number {index}"), Caption(f"숫자 {index}", "ko")])
            writer.write(record)
            keys.append(record.key)
    return keys


def keys_of(loader, epoch: int = 0, skip: int = 0) -> list[list[str]]:
    epoch_loader = loader(epoch)
    epoch_loader.skip_batches(skip)
    return [batch["keys"] for batch in epoch_loader]


class Noise:
    """A transform whose output depends on the generator: equal outputs mean equal seeds."""

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).mean()
        return pixels + torch.rand(3, generator=generator)


# --- the reader and the layouts ------------------------------------------------------------------

def test_webdataset_written_and_img2dataset_shards_read_like_ours(tmp_path: Path) -> None:
    """The same samples written by our ShardWriter, by webdataset's TarWriter (plain members,
    <lang>.txt, a JSON list of captions) and in img2dataset's layout come out alike."""
    captions = [[Caption("a red thing"), Caption("빨간 것", "ko")],
                [Caption("a green thing"), Caption("another caption")],
                [Caption("a blue thing")]]
    ours = tmp_path / "ours"
    with ShardWriter(ours, prefix="ours") as writer:
        for i, caps in enumerate(captions):
            writer.write(Record(key=f"k{i}", image=png(i), captions=caps))
    (tmp_path / "wds").mkdir()
    with wds.TarWriter(str(tmp_path / "wds" / "x.tar")) as sink:
        sink.write({"__key__": "k0", "png": png(0), "txt": "a red thing", "ko.txt": "빨간 것"})
        sink.write({"__key__": "k1", "png": png(1),
                    "txt": json.dumps(["a green thing", "another caption"])})
        sink.write({"__key__": "k2", "png": png(2),
                    "json": json.dumps([{"text": "a blue thing", "lang": "en"}])})
    (tmp_path / "i2d").mkdir()
    metadata = []
    with wds.ShardWriter(str(tmp_path / "i2d" / "%05d.tar"), maxcount=2, verbose=0) as sink:
        for i, caps in enumerate(captions):
            meta = {"url": f"http://x/{i}.png", "key": f"k{i}", "status": "success",
                    "caption": caps[0].text, "width": 8, "height": 6, "original_width": 80,
                    "original_height": 60, "exif": None, "sha256": "0" * 64,
                    "error_message": None}
            metadata.append(meta)
            sink.write({"__key__": f"k{i}", "png": png(i), "json": json.dumps(meta).encode(),
                        "txt": caps[0].text})
    def read(path: Path) -> list[Record]:
        return sorted(read_shards(path), key=lambda r: r.key)

    expected = read(ours)
    got_wds, got_i2d = read(tmp_path / "wds"), read(tmp_path / "i2d")
    for mine, theirs in zip(expected, got_wds, strict=True):
        assert (theirs.key, theirs.image, theirs.captions) == (mine.key, mine.image, mine.captions)
    for mine, theirs, meta in zip(expected, got_i2d, metadata, strict=True):
        assert (theirs.key, theirs.image, theirs.captions) == (mine.key, mine.image,
                                                               mine.captions[:1])
        assert theirs.meta == meta  # img2dataset's metadata kept, not mistaken for a record
    # The stream reads the same samples from each (file order, no shuffling).
    for folder in (ours, tmp_path / "wds", tmp_path / "i2d"):
        loader = StreamLoader(input_units(folder), batch_size=1, shuffle=False, log=None)
        assert sum(keys_of(loader), []) == ["k0", "k1", "k2"]


def test_shard_specs_braces_globs_joins_and_pipes(tmp_path: Path) -> None:
    keys = numbered(tmp_path / "d", shards=4, per_shard=3)
    names = [f"{tmp_path}/d/part-{i:06d}.tar" for i in range(4)]
    assert expand_shard_spec(tmp_path / "d") == names
    assert expand_shard_spec(f"{tmp_path}/d/part-{{000000..000003}}.tar") == names
    assert expand_shard_spec(f"{tmp_path}/d/part-00000[02].tar") == [names[0], names[2]]
    assert expand_shard_spec(f"{names[3]}::{tmp_path}/d/part-00000{{0,1}}.tar") == \
        [names[3], names[0], names[1]]
    with pytest.raises(FileNotFoundError, match="1 of the 2 shard"):
        expand_shard_spec(f"{tmp_path}/d/part-00000{{3,4}}.tar")
    spec = f"pipe:cat {tmp_path}/d/part-{{000000..000003}}.tar"
    assert expand_shard_spec(spec) == [f"pipe:cat {n}" for n in names]
    assert [r.key for r in read_shards(spec)] == keys
    assert [r.image for r in read_shards(spec)] == [r.image for r in read_shards(tmp_path / "d")]
    failing = tmp_path / "fails.sh"
    failing.write_text("cat \"$1\"; exit 3\n")
    with pytest.raises(OSError, match="exit 3"):  # a failing command is not a quiet success
        list(read_shards(f"pipe:sh {failing} {names[0]}"))


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http with curl")
def test_http_shards(tmp_path: Path) -> None:
    keys = numbered(tmp_path, shards=2, per_shard=2)
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/part-{{000000..000001}}.tar"
        assert detect_format(url) == "shards"
        assert [r.key for r in read_shards(url)] == keys
    finally:
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


# --- splitting, equivalence, skips ---------------------------------------------------------------

def test_ranks_and_workers_cover_every_sample_once_per_epoch(tmp_path: Path) -> None:
    keys = numbered(tmp_path, shards=4, per_shard=6)
    units = input_units(tmp_path)
    seen: list[str] = []
    for rank in range(2):
        loader = StreamLoader(units, batch_size=8, rank=rank, world_size=2, num_workers=2,
                              shuffle_buffer=4, seed=5, log=None)
        assert loader.streams == 4
        batches = keys_of(loader)
        assert len(batches) == 3 and all(len(b) == 4 for b in batches)  # 6 per stream, chunk 2
        seen += sum(batches, [])
    assert sorted(seen) == keys  # each sample exactly once
    # Uneven shards: the epoch ends with the first dry stream; nothing is read twice.
    extra = numbered(tmp_path, shards=1, per_shard=5, prefix="extra", key="x")
    uneven = input_units(tmp_path)
    seen = sum((sum(keys_of(StreamLoader(uneven, batch_size=4, rank=r, world_size=2,
                                         num_workers=2, seed=1, log=None)), [])
                for r in range(2)), [])
    assert len(seen) == len(set(seen)) and set(seen) < set(keys + extra)


@pytest.mark.parametrize("shards", [4, 1])
def test_one_process_two_ranks_two_workers_give_the_same_batches(tmp_path: Path,
                                                                 shards: int) -> None:
    """S=2 in one process == the two ranks' local batches joined == two workers; with one shard
    both streams share it (every other sample)."""
    numbered(tmp_path, shards=shards, per_shard=12 // shards)
    options = dict(batch_size=4, streams=2, seed=7, shuffle_buffer=3, transform=Noise(),
                   log=None)
    units = input_units(tmp_path)

    def batches(**more: object) -> list[dict]:
        return list(StreamLoader(units, **options, **more)(1))

    single = batches()
    ranks = [batches(rank=r, world_size=2) for r in range(2)]
    workers = batches(num_workers=2)
    assert len(single) == 3
    joined = [{"keys": a["keys"] + b["keys"],
               "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]])}
              for a, b in zip(*ranks, strict=True)]
    for other in (joined, workers):
        assert len(other) == len(single)
        for want, got in zip(single, other, strict=True):
            assert got["keys"] == want["keys"]
            assert torch.equal(got["pixel_values"], want["pixel_values"])  # same augment seeds
    assert sorted(sum((b["keys"] for b in single), [])) == [f"n{i:03d}" for i in range(12)]
    # Another epoch, another order; the same epoch, the same order.
    assert [b["keys"] for b in batches()] == [b["keys"] for b in single]
    assert [b["keys"] for b in StreamLoader(units, **options)(2)] != [b["keys"] for b in single]


def bad_shards(directory: Path) -> dict[str, int]:
    """Two shards with bad samples, the second truncated; the counts expected."""
    directory.mkdir(parents=True)
    good = json.dumps({"captions": [{"text": "fine", "lang": "en"}]}).encode()
    first = [("g0", {"png": png(0), "json": good}), ("corrupt", {"png": b"not a png",
                                                                 "json": good}),
             ("g1", {"png": png(1), "json": good}),
             ("empty", {"png": png(2), "json": json.dumps({"captions": []}).encode()}),
             ("badjson", {"png": png(3), "json": b"{oops"}), ("g2", {"png": png(4), "txt": b"x"}),
             ("g3", {"png": png(5), "json": good})]
    second = [(f"h{i}", {"png": png(10 + i), "txt": f"h {i}".encode()}) for i in range(5)]
    for name, samples in (("a.tar", first), ("b.tar", second)):
        with tarfile.open(directory / name, "w") as tar:
            for key, members in samples:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shard = directory / "b.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmember("h3.png").offset_data + 5
    shard.write_bytes(shard.read_bytes()[:cut])  # h0..h2 stand, h3 is damaged
    return {"corrupt image": 1, "empty caption": 1, "bad json": 1, "unreadable shard": 1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_and_a_truncated_shard_are_skipped_and_counted(tmp_path: Path,
                                                                   num_workers: int) -> None:
    expected = bad_shards(tmp_path / "bad")
    lines: list[str] = []
    # In file order, stream 0 reads a.tar (4 good samples), stream 1 b.tar (3 good, then the
    # damage): the epoch ends when stream 1 runs dry, after all the bad samples were met.
    loader = StreamLoader(input_units(tmp_path / "bad"), batch_size=2, streams=2, shuffle=False,
                          num_workers=num_workers, seed=0, log=lines.append)
    epoch = loader(0)
    assert [b["keys"] for b in epoch] == [["g0", "h0"], ["g1", "h1"], ["g2", "h2"]]
    assert epoch.skips.skipped == Counter(expected)
    assert lines and lines[0].startswith("skipped 4 of ")
    one = StreamLoader(input_units(tmp_path / "bad"), batch_size=1, streams=1, shuffle=False,
                       log=None)(0)
    assert sum((b["keys"] for b in one), []) == ["g0", "g1", "g2", "g3", "h0", "h1", "h2"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_batches_gives_exactly_the_rest_of_the_pass(tmp_path: Path,
                                                         num_workers: int) -> None:
    bad_shards(tmp_path / "bad")
    numbered(tmp_path / "good", shards=3, per_shard=7)
    units = input_units(f"{tmp_path}/bad::{tmp_path}/good")
    loader = StreamLoader(units, batch_size=4, streams=2, num_workers=num_workers, seed=3,
                          shuffle_buffer=5, transform=Noise(), log=None)
    full_epoch = loader(1)
    full = list(full_epoch)
    assert len(full) >= 4
    for n in (0, 2, len(full) + 3):
        resumed = loader(1)
        resumed.skip_batches(n)
        rest = list(resumed)
        assert [b["keys"] for b in rest] == [b["keys"] for b in full[n:]]
        for want, got in zip(full[n:], rest, strict=True):
            assert torch.equal(got["pixel_values"], want["pixel_values"])
        # The skipped part was still read and checked: the counts are those of a whole pass.
        assert resumed.skips.skipped == full_epoch.skips.skipped


def test_resampled_streams_draw_units_with_replacement(tmp_path: Path) -> None:
    keys = numbered(tmp_path, shards=3, per_shard=4)
    units = input_units(tmp_path)
    loader = StreamLoader(units, batch_size=4, streams=2, resampled=True, samples_per_epoch=40,
                          seed=2, shuffle_buffer=1, log=None)
    first = keys_of(loader, 0)
    assert len(first) == 10  # samples_per_epoch / batch_size, beyond the 12 samples there are
    flat = sum(first, [])
    assert set(flat) <= set(keys) and max(Counter(flat).values()) > 1
    assert keys_of(loader, 0) == first and keys_of(loader, 1) != first
    parts = [keys_of(StreamLoader(units, batch_size=4, streams=2, resampled=True,
                                  samples_per_epoch=40, seed=2, shuffle_buffer=1, rank=r,
                                  world_size=2, log=None), 0) for r in range(2)]
    assert [a + b for a, b in zip(*parts, strict=True)] == first
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        StreamLoader(units, batch_size=4, resampled=True)


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    numbered(tmp_path, shards=1, per_shard=2)
    units = input_units(tmp_path)
    with pytest.raises(ConfigError, match="multiple of processes x loader workers = 2 x 2"):
        StreamLoader(units, batch_size=8, streams=2, world_size=2, num_workers=2)
    with pytest.raises(ConfigError, match="divisible by streams = 3"):
        StreamLoader(units, batch_size=8, streams=3)
    with pytest.raises(FileNotFoundError):
        input_units(tmp_path / "nothing-*.tar")


# --- CSV / TSV and Hugging Face datasets ---------------------------------------------------------

def image_folder(root: Path, count: int) -> list[tuple[str, str]]:
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(count):
        name = f"img/{i}.png" if i % 2 else f"img/{i}.jpg"
        (root / name).write_bytes(png(i) if i % 2 else jpeg(i))
        rows.append((name, f"picture, number {i}" if i != 3 else '["three", "셋"]'))
    return rows


def stream_pairs(units, batch_size: int = 1) -> list[tuple[bytes, list[str]]]:
    """(image bytes, captions) of every record of ``units`` in order."""
    from imagefm.data.formats import SkipCounter

    skips = SkipCounter()
    return [(r.image, [c.text for c in r.captions]) for u in units for r in u.records(skips)]


def test_csv_and_tsv_in_open_clips_convention(tmp_path: Path) -> None:
    rows = image_folder(tmp_path, 7)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("filepath\ttitle\n" + "".join(
        f"{path}\t{title}\n" for path, title in rows) + "img/missing.png\tgone\n")
    units = input_units(tsv, InputOptions(rows_per_unit=3))
    assert [u.count for u in units] == [3, 3, 2]
    pairs = stream_pairs(units)
    expected = [((tmp_path / p).read_bytes(), [t]) for p, t in rows]
    expected[3] = (expected[3][0], ["three", "셋"])  # a JSON list: several captions
    assert pairs == expected
    # Other keys and a comma separator (quoted fields with commas and newlines too).
    csv_file = tmp_path / "sub" / "data.csv"
    csv_file.parent.mkdir()
    csv_file.write_text("caption,image,extra\n" + "".join(
        f'"{t}",../{p},x\n' for p, t in rows[:3]) + '"two\nlines",../img/0.jpg,y\n')
    options = InputOptions(csv_img_key="image", csv_caption_key="caption", rows_per_unit=2)
    units = input_units(csv_file, options)
    assert stream_pairs(units) == [*expected[:3], (expected[0][0], ["two\nlines"])]
    assert units[0].columns.base == str(csv_file.parent)  # paths relative to the file
    with pytest.raises(ConfigError, match="no caption column 'title'.*csv_caption_key"):
        input_units(csv_file, InputOptions(csv_img_key="image"))
    loader = StreamLoader(input_units(tsv, InputOptions(rows_per_unit=2)), batch_size=2,
                          streams=2, log=None)
    epoch = loader(0)
    assert sorted(sum(keys_of(loader), [])) == sorted(sum((b["keys"] for b in epoch), []))
    assert epoch.skips.skipped == {"missing image": 1}


def test_hugging_face_imagefolder_parquet_and_saved_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = image_folder(tmp_path / "folder" / "train", 5)
    with open(tmp_path / "folder" / "train" / "metadata.jsonl", "w") as handle:
        for path, text in rows:
            handle.write(json.dumps({"file_name": path, "text": text}) + "\n")
    reference = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "folder"),
                                      split="train", cache_dir=str(tmp_path / "hf_cache"))
    reference = reference.cast_column("image", datasets.Image(decode=False))
    want = [(Path(r["image"]["path"]).read_bytes(), [c.text for c in text_captions(r["text"])])
            for r in reference]
    assert stream_pairs(input_units(tmp_path / "folder")) == want
    assert detect_format(str(tmp_path / "folder")) == "hf"

    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(i), "path": None} for i in range(10)],
         "caption": [f"caption {i}" for i in range(10)]},
        features=datasets.Features({"image": datasets.Image(),
                                    "caption": datasets.Value("string")}))
    table.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"), batch_size=4)
    table.select(range(3)).to_parquet(str(tmp_path / "pq" / "test-00000.parquet"))
    options = InputOptions(hf_text_column="caption")
    units = input_units(tmp_path / "pq", options)
    assert [u.count for u in units] == [4, 4, 2]  # one unit per row group, train files only
    expected = [(png(i), [f"caption {i}"]) for i in range(10)]
    assert stream_pairs(units) == expected
    table.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    units = input_units(tmp_path / "saved", InputOptions(hf_text_column="caption",
                                                         rows_per_unit=3))
    assert [u.count for u in units] == [3, 3, 3, 1]
    assert stream_pairs(units) == expected
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(
        str(tmp_path / "dict"))
    test_split = InputOptions(hf_text_column="caption", split="test")
    assert stream_pairs(input_units(tmp_path / "dict", test_split)) == expected[:2]
    with pytest.raises(ConfigError, match="no split 'val'"):
        input_units(tmp_path / "dict", InputOptions(hf_text_column="caption", split="val"))
    with pytest.raises(ConfigError, match="no caption column 'text'.*hf_text_column"):
        input_units(tmp_path / "saved")
    # The same stream logic on top: two ranks split the rows of the saved dataset.
    seen = [keys_of(StreamLoader(input_units(tmp_path / "saved", InputOptions(
        hf_text_column="caption", rows_per_unit=3)), batch_size=2, rank=r, world_size=2,
        num_workers=1, log=None)) for r in range(2)]
    # The 1-row unit puts 4 rows in one stream, 6 in the other: the ranks' loaders differ in
    # length (the Trainer ends the epoch for both at 4) and share no row.
    assert sorted(len(s) for s in seen) == [4, 6]
    flat = sum(sum(seen, []), [])
    assert len(flat) == len(set(flat)) == 10


def test_a_folder_of_linked_data_sets_finds_their_shards(tmp_path: Path) -> None:
    """Data sets are often linked in (data/coco -> /mnt/coco): shards under a symlinked folder
    are found, as under a real one."""
    numbered(tmp_path / "real", shards=2, per_shard=2)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "set").symlink_to(tmp_path / "real", target_is_directory=True)
    assert expand_shard_spec(tmp_path / "linked") == [
        f"{tmp_path}/linked/set/part-{i:06d}.tar" for i in range(2)]
