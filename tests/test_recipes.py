"""Recipes on small fixture trees built here, plus the real installed/shared data when present."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
import unicodedata
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from imagefm.data.formats import iter_tar_samples, read_shards
from imagefm.data.image import open_image
from imagefm.data.recipes import (
    MANIFEST,
    MissingSourceError,
    prepare,
    reserved_test_split,
    split_for,
)
from imagefm.data.recipes.openclipart import find_authors, title_from_stem
from imagefm.data.recipes.tuxpaint import clean_text, lang_tag, parse_description

TUXPAINT = Path("/usr/share/tuxpaint/stamps")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (12, 10),
        mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color + (255,)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpg(color: tuple[int, int, int] = (10, 100, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def by_key(out: Path) -> dict:
    return {r.key: r for r in read_shards(out)}


# ---------------------------------------------------------------- the reserved split rule


def test_reserved_split_rule() -> None:
    names = [f"stamp{i}" for i in range(2000)] + ["lion", "사자", "grinning_face"]
    for name in names:
        digest = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16)
        assert reserved_test_split(name) == (digest % 5 == 0)
        assert split_for(name) == ("test" if digest % 5 == 0 else "train")
    share = sum(map(reserved_test_split, names)) / len(names)
    assert 0.17 < share < 0.23  # about one in five held out


# ---------------------------------------------------------------- Tux Paint


def test_parse_description_handles_real_quirks() -> None:
    text = ("“Arrow”.\n"
            "ach.utf8=Labwor.\n"
            "ko.utf8=\t“T자 길”  \n"
            "pt_BR.utf8=Um leão.\n"
            "sr@latin.utf8=Lav.\n"
            "ko.utf8=second Korean line is ignored\n"
            "stray line without a language\n"
            "fr.utf8=\n")
    parsed = parse_description(text)
    assert parsed["en"] == "Arrow."
    assert parsed["ko"] == "T자 길"
    assert parsed["pt-BR"] == "Um leão." and parsed["sr-Latn"] == "Lav."
    assert "fr" not in parsed
    assert clean_text("A calculator.  6x7=42") == "A calculator. 6x7=42"
    assert clean_text("– Because a brain is a terrible thing to waste…").startswith("Because")
    assert clean_text("“Yield” means stop.") == "“Yield” means stop."  # not wrapped: kept
    assert lang_tag("ca@valencia") == "ca-valencia"


def make_tuxpaint(root: Path) -> None:
    stamps = {
        "animals/mammals/lion": ("A lion.\nko.utf8=사자\nfr.utf8=Un lion.\n", png()),
        "animals/cartoon/lion": ("A happy lion!\nko.utf8=행복한 사자\n", png((1, 2, 3))),
        "town/sign": ('"Stop".\nko.utf8=\t“정지”\n', png((9, 9, 9), mode="RGBA")),
        "food/apple": ("An apple.\n", png((0, 200, 0))),  # no Korean line
        "food/nfd": (f"Rice.\nko.utf8={unicodedata.normalize('NFD', '밥')}\n", png()),
        "symbols/vector": ("A vector stamp.\nko.utf8=벡터\n", None),  # svg only
        "seasonal/gift": ("A gift.\nko.utf8=선물\n", "missing"),  # no picture at all
        "broken/bad": ("A broken picture.\nko.utf8=깨진 그림\n", b"\x89PNG not really"),
        "blank/empty": ("   \n", png()),
    }
    for name, (text, image) in stamps.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".txt").write_text(text, encoding="utf-8")
        if image is None:
            path.with_suffix(".svg").write_text("<svg/>")
        elif isinstance(image, bytes):
            path.with_suffix(".png").write_bytes(image)
    (root / "cartoon").mkdir()
    (root / "cartoon" / "tux-drat.png").write_bytes(png())  # no description
    (root / "animals" / "mammals" / "lion_mirror.png").write_bytes(png())  # a variant: ignored


def test_tuxpaint_recipe_on_fixture(tmp_path: Path) -> None:
    src, out = tmp_path / "stamps", tmp_path / "out"
    make_tuxpaint(src)
    manifest = prepare("tuxpaint", out, src, progress=False)
    records = by_key(out)
    assert sorted(records) == ["tuxpaint-animals-cartoon-lion", "tuxpaint-animals-mammals-lion",
                               "tuxpaint-food-apple", "tuxpaint-food-nfd", "tuxpaint-town-sign"]
    lion = records["tuxpaint-animals-mammals-lion"]
    assert [(c.text, c.lang) for c in lion.captions] == [("A lion.", "en"), ("사자", "ko")]
    assert lion.image == (src / "animals/mammals/lion.png").read_bytes()
    assert lion.meta["name"] == "lion" and lion.license == "GPL-2.0-or-later"
    assert [c.text for c in records["tuxpaint-town-sign"].captions] == ["Stop.", "정지"]
    assert [c.lang for c in records["tuxpaint-food-apple"].captions] == ["en"]
    assert records["tuxpaint-food-nfd"].captions[1].text == "밥"  # NFC
    for record in records.values():  # the split is the project rule on the file stem
        assert record.split == split_for(record.meta["name"])
    assert manifest["skipped"] == {"svg only (no PNG)": 1, "missing image": 1,
                                   "corrupt image": 1, "empty caption": 1, "no description": 1}
    assert manifest["counts"]["total"] == 5
    assert manifest["counts"]["captions_per_lang"] == {"en": 5, "ko": 4}
    assert "GPL-2.0-or-later" in manifest["license"]
    assert json.loads((out / MANIFEST).read_text(encoding="utf-8")) == manifest
    splits = {r.split for r in records.values()}
    assert {p.name.split("-")[0] for p in out.glob("*.tar")} == splits


def test_prepare_refuses_to_mix_datasets(tmp_path: Path) -> None:
    src, out = tmp_path / "stamps", tmp_path / "out"
    make_tuxpaint(src)
    prepare("tuxpaint", out, src, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare("tuxpaint", out, src, progress=False)
    again = prepare("tuxpaint", out, src, progress=False, overwrite=True, max_per_shard=2)
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert sum(len(v) for v in again["shards"].values()) == len(shards)
    assert len(list(read_shards(out))) == 5


def test_missing_source_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(MissingSourceError, match="apt-get install -y tuxpaint-stamps-default"):
        prepare("tuxpaint", tmp_path / "out", tmp_path / "nowhere", progress=False)
    with pytest.raises(MissingSourceError, match="fonts-noto-color-emoji"):
        prepare("emoji", tmp_path / "out", tmp_path / "nowhere.ttf", progress=False)
    with pytest.raises(MissingSourceError, match="openclipart-png"):
        prepare("openclipart", tmp_path / "out", tmp_path / "nowhere", progress=False)
    with pytest.raises(MissingSourceError, match="--src"):
        prepare("cifar10", tmp_path / "out", None, progress=False)
    with pytest.raises(KeyError, match="known: "):
        prepare("imagenet", tmp_path / "out", tmp_path, progress=False)


def test_real_tuxpaint_descriptions() -> None:
    lion = TUXPAINT / "animals" / "mammals" / "cats" / "lion.txt"
    if not lion.is_file():
        pytest.skip("tuxpaint-stamps-default is not installed")
    parsed = parse_description(lion.read_text(encoding="utf-8"))
    assert parsed["en"] == "A lion." and parsed["ko"] == "사자"
    texts = sorted(TUXPAINT.rglob("*.txt"))
    korean = [parse_description(p.read_text(encoding="utf-8")).get("ko") for p in texts]
    assert sum(k is not None for k in korean) / len(texts) > 0.95  # almost all have Korean


def test_real_tuxpaint_subset(tmp_path: Path) -> None:
    src = TUXPAINT / "animals" / "mammals" / "cats"
    if not src.is_dir():
        pytest.skip("tuxpaint-stamps-default is not installed")
    manifest = prepare("tuxpaint", tmp_path, src, progress=False)
    records = list(read_shards(tmp_path))
    assert len(records) == manifest["counts"]["total"] > 3
    for record in records:
        assert record.captions[0].lang == "en" and record.captions[0].text
        assert record.split == split_for(record.meta["name"])
        assert open_image(record.image).mode == "RGB"


# ---------------------------------------------------------------- emoji


@pytest.fixture
def tiny_emoji(monkeypatch: pytest.MonkeyPatch) -> dict:
    emoji = pytest.importorskip("emoji")
    if not EMOJI_FONT.is_file():
        pytest.skip("fonts-noto-color-emoji is not installed")
    fq = emoji.STATUS["fully_qualified"]
    table = {
        "\U0001F600": {"en": ":grinning_face:", "ko": ":활짝_웃는_얼굴:", "status": fq},
        "\U0001F1F0\U0001F1F7": {"en": ":South_Korea:", "ko": ":깃발_대한민국:", "status": fq},
        "\U0001F3E7": {"en": ":ATM_sign:", "ko": ":atm:", "status": fq},  # untranslated
        "\U0001F44D\U0001F3FD": {"en": ":thumbs_up_medium_skin_tone:", "ko": ":엄지:",
                                 "status": fq},  # skin tone: not a base emoji
        "\U0001F468\u200d\U0001F4BB": {"en": ":man_technologist:", "ko": ":남성_기술자:",
                                       "status": fq},  # ZWJ sequence
        "\u263a": {"en": ":smiling_face:", "ko": ":웃는_얼굴:",
                   "status": emoji.STATUS["unqualified"]},
        "\U0001FAEA": {"en": ":distorted_face:", "ko": ":일그러진_얼굴:", "status": fq},  # too new
    }
    monkeypatch.setattr(emoji, "EMOJI_DATA", table)
    return table


def test_emoji_recipe(tmp_path: Path, tiny_emoji: dict) -> None:
    manifest = prepare("emoji", tmp_path, progress=False, size=64)
    records = by_key(tmp_path)
    assert sorted(records) == ["emoji-1f1f0-1f1f7", "emoji-1f3e7", "emoji-1f600"]
    face = records["emoji-1f600"]
    assert [(c.text, c.lang) for c in face.captions] == [("grinning face", "en"),
                                                        ("활짝 웃는 얼굴", "ko")]
    assert face.split == split_for("grinning_face")
    assert [c.text for c in records["emoji-1f1f0-1f1f7"].captions] == ["flag of South Korea",
                                                                      "깃발 대한민국"]
    assert [c.lang for c in records["emoji-1f3e7"].captions] == ["en"]
    image = open_image(face.image)
    assert image.size == (64, 64)
    pixels = image.convert("L").getextrema()
    assert pixels[0] < 100 and pixels[1] == 255  # a drawn glyph on white
    assert manifest["skipped"] == {"glyph missing from font": 1}
    assert "OFL-1.1" in manifest["license"]


# ---------------------------------------------------------------- Open Clip Art


def test_openclipart_titles_from_file_names(tmp_path: Path) -> None:
    stems = ["cigno_mario_rossi_01", "cavallo_mario_rossi_01", "gatto_nero_mario_rossi_02",
             "elefante_grande_mario_ro_01", "old_book_anna_bianchi_01", "star_5pt", "hummer_02"]
    authors = find_authors(stems)
    assert authors == {("mario", "rossi")}
    titles = [title_from_stem(s, authors) for s in stems]
    assert titles == ["cigno", "cavallo", "gatto nero", "elefante grande",
                      "old book anna bianchi", "star 5pt", "hummer"]

    src = tmp_path / "png"
    for i, stem in enumerate(stems):
        folder = src / ("animals/birds" if i < 4 else "misc")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.png").write_bytes(png((i * 30, 0, 0)))
    (src / "unsorted").mkdir()
    (src / "unsorted" / "copy_of_cigno.png").write_bytes((src / "animals/birds/cigno_mario_rossi_01"
                                                          ".png").read_bytes())
    manifest = prepare("openclipart", tmp_path / "out", src, progress=False)
    records = list(read_shards(tmp_path / "out"))
    captions = {r.meta["name"]: r.captions[0].text for r in records}
    assert captions["cigno_mario_rossi_01"] == "clip art of cigno"
    assert captions["hummer_02"] == "clip art of hummer"
    assert "copy_of_cigno" not in captions
    bird = next(r for r in records if r.meta["name"] == "gatto_nero_mario_rossi_02")
    assert bird.meta["keywords"] == ["animals", "birds"] and bird.license == "public domain"
    assert manifest["skipped"] == {"duplicate image": 1}
    assert "public domain" in manifest["license"]


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_from_folders(tmp_path: Path) -> None:
    for split, cls, n in (("train", "cat", 2), ("train", "dog", 1), ("test", "cat", 1)):
        folder = tmp_path / "src" / split / cls
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}.png").write_bytes(png((i, 50, 50)))
    (tmp_path / "src" / "train" / "dog" / "bad.png").write_bytes(b"garbage")
    manifest = prepare("cifar10", tmp_path / "out", tmp_path / "src", progress=False)
    records = list(read_shards(tmp_path / "out"))
    assert sorted((r.split, r.label, r.label_name) for r in records) == [
        ("test", 3, "cat"), ("train", 3, "cat"), ("train", 3, "cat"), ("train", 5, "dog")]
    dog = next(r for r in records if r.label_name == "dog")
    assert [(c.text, c.lang) for c in dog.captions] == [("a photo of a dog.", "en"),
                                                       ("개 사진.", "ko")]
    assert manifest["skipped"] == {"corrupt image": 1}
    assert manifest["counts"]["splits"] == {"test": 1, "train": 3}


def write_cifar_shard(path: Path, samples: list[tuple[bytes, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for index, (image, cls) in enumerate(samples):
            for ext, data in (("jpg", image), ("cls", cls)):
                info = tarfile.TarInfo(f"{index:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cifar10_from_shards(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "classes.json").write_text(json.dumps(["airplane", "automobile", "bird"]))
    write_cifar_shard(src / "train-x.tar", [(jpg(), b"0"), (jpg(), b"2"), (b"bad", b"1")])
    write_cifar_shard(src / "test-a.tar", [(jpg(), b"1")])
    manifest = prepare("cifar10", tmp_path / "out", src, progress=False)
    records = by_key(tmp_path / "out")
    assert sorted((k, r.split, r.label_name) for k, r in records.items()) == [
        ("cifar10-test-a-000000", "test", "automobile"),
        ("cifar10-train-x-000000", "train", "airplane"),
        ("cifar10-train-x-000001", "train", "bird")]
    assert records["cifar10-test-a-000000"].captions[0].text == "a photo of an automobile."
    assert records["cifar10-test-a-000000"].captions[1].text == "자동차 사진."
    assert manifest["skipped"] == {"corrupt image": 1}


def test_cifar10_real_subset(tmp_path: Path, shared_data: Path) -> None:
    real = shared_data / "cifar10"
    if not (real / "test-a.tar").is_file():
        pytest.skip("shared cifar10 not present")
    src = tmp_path / "src"
    src.mkdir()
    (src / "classes.json").write_bytes((real / "classes.json").read_bytes())
    samples = list(itertools.islice(iter_tar_samples(real / "test-a.tar"), 40))
    write_cifar_shard(src / "test-a.tar", [(s["jpg"], s["cls"]) for s in samples])
    classes = json.loads((real / "classes.json").read_text())
    manifest = prepare("cifar10", tmp_path / "out", src, progress=False)
    records = list(read_shards(tmp_path / "out"))
    assert manifest["counts"]["splits"] == {"test": 40} and not manifest["skipped"]
    for record, sample in zip(records, samples, strict=True):
        assert record.image == sample["jpg"]
        assert record.label_name == classes[int(sample["cls"])]
        assert record.captions[1].lang == "ko" and record.captions[1].text.endswith("사진.")


# ---------------------------------------------------------------- COCO


def test_coco_recipe_on_fixture(tmp_path: Path) -> None:
    src = tmp_path / "coco"
    (src / "annotations").mkdir(parents=True)
    (src / "val2017").mkdir()
    (src / "val2017" / "000000000001.jpg").write_bytes(jpg())
    (src / "val2017" / "000000000002.jpg").write_bytes(jpg((1, 2, 3)))
    (src / "val2017" / "000000000004.jpg").write_bytes(jpg())
    data = {
        "licenses": [{"id": 1, "name": "Attribution License", "url": "http://cc/by"}],
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "license": 1} for i in (1, 2, 3, 4)],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A dog on a  sofa. "},
            {"image_id": 1, "id": 11, "caption": "A sleeping dog."},
            {"image_id": 2, "id": 12, "caption": "   "},
            {"image_id": 3, "id": 13, "caption": "An image that is missing."},
            {"image_id": 4, "id": 14, "caption": "A cat."},
        ],
    }
    (src / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    manifest = prepare("coco", tmp_path / "out", src, progress=False)
    records = by_key(tmp_path / "out")
    assert sorted(records) == ["coco-val2017-000000000001", "coco-val2017-000000000004"]
    dog = records["coco-val2017-000000000001"]
    assert [c.text for c in dog.captions] == ["A dog on a sofa.", "A sleeping dog."]
    assert dog.split == "val" and dog.license == "Attribution License"
    assert dog.meta["license_url"] == "http://cc/by"
    assert manifest["skipped"] == {"empty caption": 1, "missing image": 1}


def test_coco_real_mini(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "coco-mini"
    annotation = src / "annotations" / "captions_train2017.json"
    if not annotation.is_file():
        pytest.skip("shared coco-mini not present")
    data = json.loads(annotation.read_text())
    manifest = prepare("coco", tmp_path, src, progress=False)
    records = list(read_shards(tmp_path))
    assert len(records) == len(data["images"]) == manifest["counts"]["splits"]["train"]
    assert sum(len(r.captions) for r in records) == len(data["annotations"])
    licences = {entry["id"]: entry["name"] for entry in data["licenses"]}
    by_id = {image["id"]: image for image in data["images"]}
    for record in records[:5]:
        assert record.license == licences[by_id[record.meta["coco_id"]]["license"]]


# ---------------------------------------------------------------- folder + CLI


def test_folder_recipe_inputs(tmp_path: Path) -> None:
    (tmp_path / "classes" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "train" / "cat" / "a.png").write_bytes(png())
    (tmp_path / "classes" / "val" / "cat" / "a.png").write_bytes(png())
    manifest = prepare("folder", tmp_path / "o1", tmp_path / "classes", progress=False)
    assert manifest["counts"]["splits"] == {"train": 1, "val": 1}
    records = list(read_shards(tmp_path / "o1"))
    assert {r.captions[1].text for r in records} == {"고양이 사진."}

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "x.png").write_bytes(png())
    (tmp_path / "csv" / "y.png").write_bytes(b"not a png")
    (tmp_path / "csv" / "c.csv").write_text("image,caption,lang\nx.png,빨강,ko\ny.png,bad,en\n",
                                            encoding="utf-8")
    manifest = prepare("folder", tmp_path / "o2", tmp_path / "csv" / "c.csv", progress=False)
    assert manifest["counts"]["captions_per_lang"] == {"ko": 1}
    assert manifest["skipped"] == {"corrupt image": 1}


def test_cli_prepare(tmp_path: Path) -> None:
    import typer

    from imagefm.cli.data import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app)
    runner = CliRunner()
    src = tmp_path / "stamps"
    make_tuxpaint(src)
    result = runner.invoke(app, ["data", "prepare", "tuxpaint", "--out", str(tmp_path / "out"),
                                 "--src", str(src), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "wrote 5 records" in result.output and "skipped 5 of 10" in result.output
    missing = runner.invoke(app, ["data", "prepare", "tuxpaint", "--out", str(tmp_path / "o"),
                                  "--src", str(tmp_path / "none")])
    assert missing.exit_code == 1
    assert "apt-get install -y tuxpaint-stamps-default" in missing.output
    listing = runner.invoke(app, ["data", "recipes"])
    assert all(name in listing.output for name in ("tuxpaint", "emoji", "coco", "folder"))
