"""Readers and writers: WebDataset shards, caption files, image folders, LLaVA JSON."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from imagefm.data.files import (
    read_caption_file,
    read_image_folder,
    read_llava_json,
    write_caption_file,
    write_llava_json,
)
from imagefm.data.formats import (
    RecordError,
    ShardReadError,
    ShardWriter,
    SkipCounter,
    iter_tar_samples,
    list_shards,
    read_shards,
    safe_key,
    write_shards,
)
from imagefm.data.records import Box, Caption, Record, Turn


def png_bytes(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpg_bytes(color: tuple[int, int, int] = (0, 128, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sample_records() -> list[Record]:
    mask = io.BytesIO()
    Image.new("L", (8, 6), 0).save(mask, format="PNG")
    return [
        Record(key="a1", image=png_bytes(), captions=[Caption("a red square"),
                                                      Caption("빨간 사각형", "ko")],
               label=3, label_name="red", source="test", license="CC0", meta={"n": 1}),
        Record(key="a2", image=jpg_bytes(), image_ext="jpg", split="test",
               conversation=[Turn("user", "<image>\nWhat colour?"), Turn("assistant", "Blue.")],
               boxes=[Box(1, 2, 3, 4, "blob")], mask=mask.getvalue()),
        Record(key="a3", image=png_bytes((0, 255, 0)), captions=[Caption("green")]),
        Record(key="a4", image=None, captions=[Caption("text only")]),
        Record(key="a-5_x", image=png_bytes((9, 9, 9)), meta={"nested": {"k": [1, 2]}}),
    ]


def test_shard_round_trip_keeps_every_field(tmp_path: Path) -> None:
    records = sample_records()
    shards = write_shards(records, tmp_path, prefix="train", max_samples=2)
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert list(read_shards(tmp_path)) == records
    # Members of a sample are named <key>.<ext> as WebDataset expects.
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert names == ["a1.png", "a1.json", "a2.jpg", "a2.json", "a2.mask.png"]


def test_shards_are_byte_identical_across_runs(tmp_path: Path) -> None:
    first = write_shards(sample_records(), tmp_path / "a", max_samples=10)
    second = write_shards(sample_records(), tmp_path / "b", max_samples=10)
    assert first[0].read_bytes() == second[0].read_bytes()


def test_shard_writer_is_atomic(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, prefix="x", max_samples=2)
    records = sample_records()
    writer.write(records[0])
    # While a shard is open only its .tmp exists: readers never see half a shard.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar.tmp"]
    writer.write(records[1])
    writer.write(records[2])  # starts the second shard, finishing the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar", "x-000001.tar.tmp"]
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar", "x-000001.tar"]

    out = tmp_path / "failed"
    with pytest.raises(RuntimeError), ShardWriter(out, max_samples=2) as failing:
        for record in records[:3]:
            failing.write(record)
        raise RuntimeError("producer crashed")
    # The finished shard stays, the unfinished one is removed.
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]


def test_writer_refuses_bad_keys(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as writer:
        writer.write(Record(key="k", image=png_bytes()))
        with pytest.raises(ValueError, match="duplicate"):
            writer.write(Record(key="k", image=png_bytes()))
        with pytest.raises(ValueError, match="must not contain"):
            writer.write(Record(key="a.b", image=png_bytes()))


def test_safe_key() -> None:
    assert safe_key("animals/lion-2") == "animals_lion-2"
    assert safe_key("ok_key-1", unique=True) == "ok_key-1"
    # Different texts that clean to the same key stay distinct with unique=True.
    assert safe_key("view+", unique=True) != safe_key("view-", unique=True)
    assert "." not in safe_key("a.b.c", unique=True)
    with pytest.raises(ValueError):
        safe_key("...")


def test_member_names_split_at_the_basenames_first_dot(tmp_path: Path) -> None:
    """Keys end at the basename's first dot, extensions are lower-cased, members without an
    extension are no samples (webdataset's grouping, which iter_tar_samples uses)."""
    shard = tmp_path / "names.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("abc.png", "abc.mask.png", "dir/x.y/abc.JPG", "README", "def.ko.txt"):
            add_member(tar, name, name.encode())
    samples = list(iter_tar_samples(shard))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("abc", ["mask.png", "png"]), ("dir/x.y/abc", ["jpg"]), ("def", ["ko.txt"])]
    assert samples[0]["__url__"] == str(shard)


def test_reads_plain_webdataset_layout(tmp_path: Path) -> None:
    """CIFAR-style shards: NNNNNN.jpg + NNNNNN.cls, classes.json beside; .txt captions too."""
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))
    with tarfile.open(tmp_path / "train-0.tar", "w") as tar:
        add_member(tar, "000000.jpg", jpg_bytes())
        add_member(tar, "000000.cls", b"1\n")
        add_member(tar, "000001.jpg", jpg_bytes())
        add_member(tar, "000001.cls", b"0")
        add_member(tar, "000001.txt", "고양이".encode())
        add_member(tar, "000002.png", png_bytes())
        add_member(tar, "000002.cls", b"cat")  # not an index
    skips = SkipCounter()
    records = list(read_shards(tmp_path, skips))
    assert [(r.key, r.label, r.label_name, r.image_ext) for r in records] == [
        ("000000", 1, "dog", "jpg"), ("000001", 0, "cat", "jpg")]
    assert records[1].captions == [Caption("고양이", "en")]
    assert skips.skipped == {"bad label": 1}
    with pytest.raises(RecordError):
        list(read_shards(tmp_path))  # without a counter a bad sample raises


def test_truncated_shard_keeps_earlier_samples(tmp_path: Path) -> None:
    shard = write_shards(sample_records(), tmp_path, max_samples=10)[0]
    with tarfile.open(shard) as tar:
        cut = tar.getmember("a3.json").offset_data + 5  # inside the third sample's json
    shard.write_bytes(shard.read_bytes()[:cut])
    got = []
    with pytest.raises(ShardReadError, match=shard.name):
        for sample in iter_tar_samples(shard):
            got.append(sample["__key__"])
    assert got == ["a1", "a2"]  # the damaged third sample is dropped, not half-read
    skips = SkipCounter()
    assert len(list(read_shards(shard, skips))) == len(got)
    assert skips.skipped == {"unreadable shard": 1}


def test_list_shards(tmp_path: Path) -> None:
    write_shards(sample_records(), tmp_path / "d", prefix="test", max_samples=2)
    write_shards(sample_records(), tmp_path / "d", prefix="train", max_samples=5)
    found = list_shards(tmp_path / "d")
    assert [p.name for p in found] == ["test-000000.tar", "test-000001.tar", "test-000002.tar",
                                       "train-000000.tar"]
    assert list_shards(str(tmp_path / "d" / "test-*.tar")) == found[:3]
    assert list_shards([found[0], found[3]]) == [found[0], found[3]]
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path / "missing-*.tar")


def test_caption_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    (tmp_path / "img" / "b.jpg").write_bytes(jpg_bytes())
    (tmp_path / "caps.csv").write_text(
        "image,caption,lang\n"
        "img/a.png,a red square,en\n"
        'img/a.png,"빨간, 사각형",ko\n'
        "img/b.jpg,a blue square,\n"
        "img/b.jpg,   ,en\n"
        "img/missing.png,gone,en\n", encoding="utf-8")
    skips = SkipCounter()
    records = list(read_caption_file(tmp_path / "caps.csv", skips))
    assert [r.key for r in records] == ["img-a", "img-b"]
    assert records[0].captions == [Caption("a red square", "en"), Caption("빨간, 사각형", "ko")]
    assert records[1].captions == [Caption("a blue square", "en")]  # empty lang → default
    assert records[0].image == (tmp_path / "img" / "a.png").read_bytes()
    assert records[1].image_ext == "jpg"
    assert skips.skipped == {"missing image": 1}

    lines = [{"image": "img/a.png", "caption": "사각형", "lang": "ko"},
             {"image": "img/b.jpg", "caption": "blue"}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = list(read_caption_file(tmp_path / "caps.jsonl"))
    assert [(r.key, r.captions) for r in records] == [
        ("img-a", [Caption("사각형", "ko")]), ("img-b", [Caption("blue", "en")])]


@pytest.mark.parametrize("name", ["out/caps.csv", "out/caps.jsonl"])
def test_caption_file_round_trip(tmp_path: Path, name: str) -> None:
    records = [r for r in sample_records() if r.captions and r.image is not None]
    path = write_caption_file(records, tmp_path / name)
    back = list(read_caption_file(path))
    assert [(r.image, r.captions) for r in back] == [(r.image, r.captions) for r in records]


def test_image_folder(tmp_path: Path) -> None:
    for cls, count in (("dog", 2), ("cat", 1)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            (tmp_path / cls / f"{i}.png").write_bytes(png_bytes((i, 0, 0)))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    records = list(read_image_folder(tmp_path))
    assert [(r.key, r.label, r.label_name) for r in records] == [
        ("cat-0", 0, "cat"), ("dog-0", 1, "dog"), ("dog-1", 1, "dog")]


def test_llava_round_trip(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.png").write_bytes(png_bytes())
    entries = [
        {"id": "s1", "image": "pics/p.png", "conversations": [
            {"from": "human", "value": "<image>\n무엇이 보이나요?"},
            {"from": "gpt", "value": "빨간 사각형입니다."}]},
        {"id": "s2", "conversations": [{"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello"}]},
        {"id": "s3", "conversations": [{"from": "robot", "value": "?"}]},
        {"id": "s4", "image": ["pics/p.png", "pics/p.png"],
         "conversations": [{"from": "human", "value": "<image><image>"}]},
        {"id": "s5", "image": ["pics/p.png"], "conversations": [{"from": "human", "value": "?"}]},
    ]
    (tmp_path / "chat.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    skips = SkipCounter()
    records = list(read_llava_json(tmp_path / "chat.json", skips=skips))
    assert [r.key for r in records] == ["s1", "s2", "s5"]
    assert records[0].conversation == [Turn("user", "<image>\n무엇이 보이나요?"),
                                       Turn("assistant", "빨간 사각형입니다.")]
    assert records[0].image == (tmp_path / "pics" / "p.png").read_bytes()
    assert records[1].image is None
    assert records[2].image == records[0].image  # a one-image list is one image
    assert skips.skipped == {"bad conversation": 1, "several images": 1}

    out = write_llava_json(records, tmp_path / "out" / "chat.json")
    written = json.loads(out.read_text(encoding="utf-8"))
    assert [m["from"] for m in written[0]["conversations"]] == ["human", "gpt"]
    assert "image" not in written[1] and written[2]["image"] == written[0]["image"].replace(
        "s1", "s5")
    back = list(read_llava_json(out))
    assert [(r.key, r.image, r.conversation) for r in back] == [
        (r.key, r.image, r.conversation) for r in records]


def test_skip_counter_summary_and_merge() -> None:
    counter = SkipCounter()
    counter.ok(997)
    counter.add("corrupt image", "a.jpg: bad")
    counter.add("corrupt image", "b.jpg: bad")
    counter.add("empty caption", "c: empty")
    assert counter.summary() == "skipped 3 of 1000: 2 corrupt image, 1 empty caption"
    other = SkipCounter()
    other.merge(counter.take())
    assert counter.seen == 0 and not counter.skipped
    assert other.summary() == "skipped 3 of 1000: 2 corrupt image, 1 empty caption"
    assert "a.jpg: bad" in other.report()


def test_reads_real_cifar10_shard(shared_data: Path) -> None:
    shard = shared_data / "cifar10" / "test-a.tar"
    if not shard.is_file():
        pytest.skip(f"{shard} not present")
    from imagefm.data.image import open_image

    classes = json.loads((shared_data / "cifar10" / "classes.json").read_text())
    records = list(itertools.islice(read_shards(shard), 20))
    assert len(records) == 20
    for record in records:
        assert record.label is not None and record.label_name == classes[record.label]
        assert record.image_ext == "jpg"
        assert open_image(record.image).size == (32, 32)
