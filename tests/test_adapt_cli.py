"""``imagefm adapt``: a tiny model and a tiny class-per-folder tree in, a report and a saved
adapted model out; the anomaly command on synthetic defects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from imagefm.adapt import AdaptedClassifier
from imagefm.cli.adapt import register
from imagefm.config import ConfigError
from tests.test_adapt import CLASSES, coloured, micro_model


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keeps "adapt" a subcommand, as in the real CLI
        pass

    return app


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    model, _ = micro_model()
    return model.save_pretrained(tmp_path / "model")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "parts"
    for colour in CLASSES:
        (root / colour).mkdir(parents=True)
        for i in range(6):
            (root / colour / f"{i}.png").write_bytes(coloured(colour, i))
    (root / "red" / "broken.png").write_bytes(b"not an image")  # skipped and counted
    return root


def test_auto_recipe_from_folder_to_adapted_model_and_report(app, tiny_model, folder,
                                                              tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "adapt", "auto", "--model", str(tiny_model), "--data", str(folder), "--out", str(out),
        "--val-per-class", "1", "--threads", "1", "--set", "coop.steps=4",
        "--set", "coop.eval_every=2", "--set", "lora.steps=4", "--set", "lora.eval_every=2",
        "--set", "tip.epochs=2", "--set", "probe.max_iter=20"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "Forgetting check" in report and "| zeroshot |" in report
    assert (out / "accuracy_vs_shots.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in results["results"]}
    assert methods == {"zeroshot", "probe", "zs-probe", "tip", "tip-f", "coop", "lora"}
    assert {r["shots"] for r in results["results"] if r["method"] == "probe"} == {1, 2, None}
    assert "corrupt image" in results["meta"]["skipped"]
    # The recipe saved its best method as an ordinary checkpoint plus a head.
    assert (out / "model" / "imagefm.json").is_file()
    classifier = AdaptedClassifier.load(out / "model")
    predictions = classifier.predict([coloured("blue", 50), coloured("red", 51)])
    assert len(predictions) == 2 and all(name in CLASSES for name, _ in predictions)


def test_finetune_reports_the_forgetting_check(app, tiny_model, folder, tmp_path):
    out = tmp_path / "ft"
    result = CliRunner().invoke(app, [
        "adapt", "finetune", "--model", str(tiny_model), "--data", str(folder),
        "--out", str(out), "--shots", "2", "--val-per-class", "1", "--threads", "1",
        "--reference", "synthetic:colour", "--set", "finetune.steps=2",
        "--set", "finetune.eval_every=1", "--set", "wise.alphas=[0.0, 0.5, 1.0]"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["finetune", "wise-ft"]
    assert all(set(r["reference"]) == {"before", "after"} for r in rows)
    assert "reference before %" in (out / "report.md").read_text()


def test_anomaly_on_synthetic_defects(app, tiny_model, tmp_path):
    out = tmp_path / "defects"
    result = CliRunner().invoke(app, [
        "adapt", "anomaly", "--model", str(tiny_model), "--data", "synthetic", "--out", str(out),
        "--n", "6", "--shots", "0,1", "--repeats", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["results"]
    means = [r for r in rows if r["category"] == "mean"]
    assert {(r["method"], r["shots"]) for r in means} == {("zero-shot", 0), ("memory", 1),
                                                        ("memory+text", 1)}
    for r in rows:
        assert 0.0 <= r["image_auroc"] <= 1.0
    assert (out / "anomaly_maps_metal.png").stat().st_size > 0


def test_anomaly_on_defect_shards_keeps_both_kinds_and_refuses_what_it_cannot_do(
        app, tiny_model, tmp_path):
    from imagefm.adapt.inspection import inspection_from_shards
    from imagefm.data.formats import write_shards
    from imagefm.data.synthetic import generate

    # As `imagefm synth defects` writes them: one train split, defects first in file order
    # here, so a cap that took the first images would keep defects only.
    records = sorted(generate("defects", 40, seed=0, image_size=32), key=lambda r: -r.label)
    write_shards(records, tmp_path / "defects", prefix="train")
    for item in inspection_from_shards(tmp_path / "defects", test_per_category=4):
        assert len(item.labels) <= 4 and 0 < sum(item.labels) < len(item.labels)

    result = CliRunner().invoke(app, [
        "adapt", "anomaly", "--model", str(tiny_model), "--data", str(tmp_path / "defects"),
        "--n", "4", "--shots", "0,50", "--repeats", "1", "--threads", "1",
        "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "50 normal shots asked" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "results.json").exists()


def test_bad_input_is_refused_with_the_fix(app, tiny_model, folder, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["adapt", "bogus", "--model", str(tiny_model), "--data",
                                 str(folder)])
    assert result.exit_code != 0 and "unknown method" in result.output
    result = runner.invoke(app, ["adapt", "probe", "--model", str(tiny_model), "--data",
                                 str(folder), "--set", "probe.bogus=1"])
    assert isinstance(result.exception, ConfigError) and "bogus" in str(result.exception)
    result = runner.invoke(app, ["adapt", "probe", "--model", str(tiny_model), "--data",
                                 str(folder), "--shots", "9", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, ValueError) and "val-per-class" in str(result.exception)


def test_data_reference_embeds_images_once_per_image_tower(folder, monkeypatch):
    import imagefm.adapt.features as features
    from imagefm.adapt.reference import parse_reference

    model, processor = micro_model()
    calls = []
    original = features.extract_features
    monkeypatch.setattr(features, "extract_features",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    reference = parse_reference(f"zeroshot:{folder}")
    first = reference.accuracy(model, processor, "test")
    text_changed = micro_model(seed=3)[0]
    text_changed.vision.load_state_dict(model.vision.state_dict())
    reference.accuracy(text_changed, processor, "test")  # same image tower: features reused
    assert 0.0 <= first <= 1.0 and len(calls) == 1
    reference.accuracy(model, processor, "val")
    assert len(calls) == 2
