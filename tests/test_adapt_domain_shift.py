"""The domain-shift example: the clip-art recipe's labelling rules and pictures, and
cross-domain evaluation in ``imagefm adapt`` (``--also-test``, ``--only-classes``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from imagefm.adapt import Experiment, Splits, make_splits
from imagefm.adapt.data import LabelledImages, cap_per_class, shared_classes
from imagefm.adapt.experiment import parse_overrides
from imagefm.adapt.features import extract_features, feature_views
from imagefm.adapt.head import accuracy
from imagefm.adapt.report import write_adapt_report
from imagefm.cli.adapt import register
from imagefm.data.formats import SkipCounter
from imagefm.data.recipes import RECIPES
from imagefm.data.recipes.openclipart_classes import (
    EXCLUDED,
    MIN_PER_CLASS,
    build,
    label_drawing,
    labelled_drawings,
    title_words,
)
from tests.test_adapt import coloured, micro_model

OPENCLIPART = Path("/usr/share/openclipart/png")


# ------------------------------------------------------------------ the recipe's rules
@pytest.mark.parametrize(("paths", "title", "stem", "expected"), [
    # folders of one class
    (["animals/mammals/horses/cavallo_architetto_franc_01.png"], "cavallo",
     "cavallo_architetto_franc_01", "horse"),
    (["animals/birds/penguin/tux_clemente_01.png"], "tux", "tux_clemente_01", "bird"),
    (["animals/mammals/dogs/black_lab_ganson.png"], "black lab ganson", "black_lab_ganson",
     "dog"),
    # title words, English and Italian, plurals, digits cut off
    (["transportation/vehicles/trawler_01.png"], "trawler", "trawler_01", "ship"),
    (["animals/rana01_architetto_france_01.png"], "rana01", "rana01_architetto_france_01",
     "frog"),
    (["unsorted/Pinguino1.png"], "Pinguino1", "Pinguino1", "bird"),
    (["transportation/vehicles/aircraft_jarno_vasamaa1.png"], "aircraft jarno vasamaa1",
     "aircraft_jarno_vasamaa1", "airplane"),
    (["recreation/games/cards/two_cats_tess_brady_01.png"], "two cats",
     "two_cats_tess_brady_01", "cat"),
    (["people/fire_engine_mimooh_01.png"], "fire engine", "fire_engine_mimooh_01", "truck"),
    (["transportation/big_truck_01.png"], "big truck", "big_truck_01", "truck"),
    # brand names only under transportation/
    (["transportation/skoda_car_alejandro_teja_.png"], "skoda", "skoda_x", "automobile"),
    (["recreation/sports/dodge_ball.png"], "dodge ball", "dodge_ball", None),
    # explicit inclusions and exclusions
    (["transportation/boating/sailing_kids.png"], "sailing kids", "sailing_kids", "ship"),
    (["transportation/boating/sailing_capsize1.png"], "sailing capsize1", "sailing_capsize1",
     None),
    (["recreation/toys/toy_paper_plane_01.png"], "toy paper plane", "toy_paper_plane_01",
     None),
    (["animals/birds/contour_bat.png"], "contour bat", "contour_bat", None),
    (["animals/birds/turkey_on_platter_01.png"], "turkey on platter", "turkey_on_platter_01",
     None),
    # whole words only: "catalog" is no cat, "hotdog" no dog
    (["office/catalog_01.png"], "catalog", "catalog_01", None),
    (["recreation/party/hotdog_stand.png"], "hotdog stand", "hotdog_stand", None),
    # signs, icons and food, also when only a copy of the picture is filed there
    (["food/meats_and_eggs/hot_dog.png"], "hot dog", "hot_dog", None),
    (["transportation/horse.png", "transportation/roadsigns/horse.png"], "horse", "horse",
     None),
    (["signs_and_symbols/car_0_symbol_10cm_bwh.png"], "car 0 symbol", "car_0_symbol", None),
    (["computer/icons/flat-theme/applications/kbattleship.png"], "kbattleship",
     "kbattleship", None),
    # two classes: ambiguous, left out
    (["animals/cani_e_gatti_cat_and_do_01.png"], "cani e gatti cat and do",
     "cani_e_gatti_cat_and_do_01", None),
])
def test_rules_label_example_file_names(paths, title, stem, expected):
    label, why = label_drawing(paths, title, stem)
    assert label == expected, why


def test_title_words_are_lower_case_whole_words_without_trailing_digits():
    assert title_words("Rana01 di-notte  2") == ["rana", "di", "notte"]


def _png(colour: tuple[int, int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_recipe_composites_on_white_drops_duplicates_and_splits_per_class(tmp_path):
    root = tmp_path / "png"
    horses, cats = root / "animals/mammals/horses", root / "animals/mammals/housecats"
    horses.mkdir(parents=True)
    cats.mkdir(parents=True)
    for i in range(3):  # three distinct horses, fully transparent except one pixel
        image = Image.new("RGBA", (600, 300), (0, 0, 0, 0))
        image.putpixel((i, 0), (200, 0, 0, 255))
        image.save(horses / f"cavallo_{i}.png")
    (root / "transportation").mkdir()
    (root / "transportation/horse_copy.png").write_bytes((horses / "cavallo_0.png").read_bytes())
    (horses / "broken.png").write_bytes(b"not a png")
    (cats / "gatto.png").write_bytes(_png((10, 20, 30, 255)))  # one cat: too few, dropped
    skips = SkipCounter()
    records = list(build(root, skips, train_per_class=2, min_per_class=2))
    assert [r.label_name for r in records] == ["horse"] * 3
    assert [r.label for r in records] == [0, 0, 0]
    assert [r.split for r in records] == ["train", "train", "test"]
    assert skips.skipped["duplicate image"] == 1
    assert skips.skipped["undecodable image"] == 1  # broken.png: a horse by folder, no image
    assert skips.skipped["class with too few drawings"] == 1
    image = Image.open(io.BytesIO(records[0].image))
    assert image.mode == "RGB" and image.size == (512, 256)  # longer side capped
    assert image.getpixel((300, 200)) == (255, 255, 255)  # transparent → white, not black
    # The order (so the split) depends on the stems and the seed only, not on the file order.
    again = list(build(root, SkipCounter(), train_per_class=2, min_per_class=2))
    assert [r.meta["name"] for r in again] == [r.meta["name"] for r in records]


def test_debian_openclipart_labels(tmp_path):
    if not OPENCLIPART.is_dir():
        pytest.skip(f"openclipart-png not installed ({OPENCLIPART}); "
                    "sudo apt-get install -y openclipart-png")
    assert RECIPES["openclipart-cifar10"].default_src == str(OPENCLIPART)
    drawings = labelled_drawings(OPENCLIPART, SkipCounter())
    by_class: dict[str, list[str]] = {}
    for cls, _, path, _ in drawings:
        by_class.setdefault(cls, []).append(path.stem)
    assert not {stem for stems in by_class.values() for stem in stems} & set(EXCLUDED)
    enough = sorted(c for c, stems in by_class.items() if len(stems) >= MIN_PER_CLASS)
    assert enough == ["airplane", "automobile", "bird", "cat", "dog", "horse"]
    assert "trawler_01" in by_class["ship"] and "hummer_01" not in by_class["automobile"]


# ------------------------------------------------------------------ cross-domain evaluation
def _domain(colours: list[str], per_class: int, seed: int, size: int,
            classnames: list[str] | None = None) -> LabelledImages:
    """Noisy single-colour PNGs (``size`` px: another "domain" than the 32 px ones)."""
    names = classnames or colours
    images, labels, keys = [], [], []
    for colour in colours:
        for i in range(per_class):
            images.append(coloured(colour, seed + i, size))
            labels.append(names.index(colour))
            keys.append(f"{colour}-{size}-{seed}-{i}")
    return LabelledImages(images, torch.tensor(labels), list(names), keys,
                          ["train"] * len(images))


@pytest.fixture(scope="module")
def experiment():
    model, processor = micro_model()
    photos = _domain(["red", "green", "blue"], 6, 0, 32)
    # The second domain: other pictures, another class order, one class the first lacks.
    clipart = _domain(["blue", "red"], 4, 100, 48, ["purple", "blue", "red"])
    purple = _domain(["green"], 3, 200, 48)  # green pixels, labelled purple below
    purple.labels[:] = 0
    clipart = LabelledImages(clipart.images + purple.images,
                             torch.cat([clipart.labels, purple.labels]), clipart.classnames,
                             clipart.keys + purple.keys, clipart.splits + purple.splits)
    splits = make_splits(photos, val_per_class=1, test_fraction=0.34, seed=0)
    configs = parse_overrides(["lora.steps=2", "lora.eval_every=1", "lora.towers=vision",
                               "tip.epochs=2", "probe.max_iter=20"])
    exp = Experiment(model, processor, splits, configs=configs, also_test=clipart)
    return exp, model, processor, splits, clipart


def test_second_domain_keeps_its_images_of_the_experiments_classes_by_name(experiment):
    exp, _, _, _, clipart = experiment
    assert len(exp.also) == 8  # 4 blue + 4 red; the 3 purple ones are left out
    names = exp.splits.classnames  # red, green, blue (sorted folder-less: as given)
    expected = [names.index(clipart.classnames[label]) for label in clipart.labels.tolist()
                if clipart.classnames[label] != "purple"]
    assert exp.also.labels.tolist() == expected


def test_zero_shot_on_the_second_domain_equals_zero_shot_tested_there(experiment):
    exp, model, processor, splits, clipart = experiment
    shared = clipart.restrict(splits.classnames)
    direct = Experiment(model, processor, Splits(splits.pool, splits.val, shared))
    crossed = exp.run("zeroshot", 0)[0]
    assert crossed.also_top1 == pytest.approx(direct.run("zeroshot", 0)[0].top1, abs=1e-9)
    assert direct.test.labels.tolist() == exp.also.labels.tolist()


@pytest.mark.parametrize("method", ["probe", "tip-f", "lora"])
def test_second_domain_accuracy_uses_the_second_domains_images_only(experiment, method):
    exp, model, processor, _, clipart = experiment
    result = exp.run(method, 2)[0]
    assert result.also_top1 is not None
    # Recompute from the second domain's pictures alone, through the adapted model for LoRA
    # (it changed the image tower here), with the method's own head.
    wanted = [i for i, label in enumerate(clipart.labels.tolist())
              if clipart.classnames[label] != "purple"]

    def recomputed(run, labels: torch.Tensor) -> float:
        tower = run.model if run.model is not None else model
        feats = extract_features(tower, processor, [clipart.images[i] for i in wanted])
        views = feature_views(tower, feats.pre, labels)
        return accuracy(run.head.logits(views.get(run.head.feature)), views.labels)

    assert result.also_top1 == pytest.approx(recomputed(result, exp.also.labels), abs=1e-9)
    # Renaming the second domain's classes (blue <-> red) changes its accuracy only: the
    # training and the test accuracy never see it.
    swapped = LabelledImages(clipart.images, clipart.labels.clone(),
                             ["purple", "red", "blue"], clipart.keys, clipart.splits)
    other = Experiment(model, processor, exp.splits, configs=exp.configs, also_test=swapped)
    again = other.run(method, 2)[0]
    assert again.top1 == pytest.approx(result.top1, abs=1e-9)
    names = exp.splits.classnames
    relabelled = torch.tensor([names.index(swapped.classnames[swapped.labels[i]])
                               for i in wanted])
    assert again.also_top1 == pytest.approx(recomputed(again, relabelled), abs=1e-9)


def test_only_classes_keeps_the_same_images_and_renumbers(experiment):
    exp, model, processor, splits, clipart = experiment
    kept = Experiment(model, processor, splits, only_classes=["blue", "red"],
                      also_test=clipart)
    assert kept.classnames == ["blue", "red"] and kept.splits.classnames == ["blue", "red"]
    full_two = [k for k, label in zip(splits.shots(2).keys, splits.shots(2).labels.tolist(),
                                      strict=True) if splits.classnames[label] != "green"]
    assert sorted(kept.splits.shots(2).keys) == sorted(full_two)
    assert set(kept.test.labels.tolist()) == {0, 1} and len(kept.also) == 8
    assert kept.zero_shot.weight.shape[0] == 2
    assert shared_classes(splits.pool, clipart) == ["red", "blue"]  # the first's order
    with pytest.raises(ValueError, match="purple"):
        Experiment(model, processor, splits, only_classes=["purple"])


def test_cap_per_class_draws_the_test_images_make_splits_draws(tmp_path):
    labels = torch.arange(3).repeat_interleave(10)
    data = LabelledImages([b"x"] * 30, labels, ["a", "b", "c"], [f"k{i}" for i in range(30)],
                          ["test" if i % 2 else "train" for i in range(30)])
    splits = make_splits(data, val_per_class=1, test_per_class=3, seed=7)
    assert cap_per_class(data.split("test"), 3, seed=7).keys == splits.test.keys
    assert cap_per_class(data, None) is data


def test_report_puts_both_domains_side_by_side(experiment, tmp_path):
    exp = experiment[0]
    results = [r.to_dict() for m in ("zeroshot", "probe") for r in exp.run(m, 2)]
    paths = write_adapt_report(results, tmp_path, "t", domains=("photos", "clip-art"))
    report = paths["markdown"].read_text()
    zs = results[0]
    assert f"| zeroshot | {100 * zs['top1']:.1f} / {100 * zs['also_top1']:.1f} |" in report
    assert "photos / clip-art" in report
    assert np.asarray(Image.open(paths["shots"])).shape[1] > 1200  # two panels
    assert json.loads(paths["json"].read_text())["results"][1]["also_top1"] is not None


# ------------------------------------------------------------------ the command
@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    return app


def _folder(root: Path, colours: list[str], n: int, size: int) -> Path:
    for colour in colours:
        (root / colour).mkdir(parents=True)
        for i in range(n):
            pixels = "green" if colour == "purple" else colour  # a class the photos lack
            (root / colour / f"{i}.png").write_bytes(coloured(pixels, i + size, size))
    return root


def test_cli_also_test_with_shared_classes(app, tmp_path):
    model, _ = micro_model()
    path = model.save_pretrained(tmp_path / "model")
    photos = _folder(tmp_path / "photos", ["red", "green", "blue"], 5, 32)
    drawings = _folder(tmp_path / "drawings", ["red", "blue", "purple"], 3, 48)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "adapt", "zeroshot,probe", "--model", str(path), "--data", str(photos),
        "--also-test", str(drawings), "--only-classes", "shared", "--shots", "1,2",
        "--val-per-class", "1", "--threads", "1", "--set", "probe.max_iter=20",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["only_classes"] == "blue, red"  # the photos' (sorted) order
    assert "(6 images)" in data["meta"]["also_test"]
    assert all(r["also_top1"] is not None for r in data["results"])
    assert "photos test / drawings" in (out / "report.md").read_text()
    refused = CliRunner().invoke(app, [
        "adapt", "zeroshot", "--model", str(path), "--data", str(photos), "--only-classes",
        "shared", "--val-per-class", "1", "--out", str(out)])
    assert refused.exit_code != 0 and "--also-test" in refused.output
