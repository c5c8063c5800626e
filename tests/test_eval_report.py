from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagefm.eval import report
from imagefm.eval.metrics import classification_metrics
from imagefm.eval.report import format_table, hangul_font, write_report
from imagefm.eval.retrieval import retrieval_metrics


def _classification(name: str, lang: str, classes: list[str]) -> dict:
    scores = torch.eye(len(classes))[[0, 1, 1, 2]] if len(classes) == 3 else torch.eye(len(classes))
    labels = torch.tensor([0, 1, 2, 2]) if len(classes) == 3 else torch.arange(len(classes))
    result = {"task": "classification", "name": name, "lang": lang}
    result.update(classification_metrics(scores, labels, classes))
    return result


def _results() -> list[dict]:
    retrieval = {"task": "retrieval", "name": "coco", "lang": "en"}
    retrieval.update(retrieval_metrics(torch.eye(3), [0, 1, 2]))
    return [
        _classification("colour", "en", ["red", "green", "blue"]),
        _classification("colour", "ko", ["빨간색", "초록색", "파란색"]),
        {**_classification("heldout", "en", [f"c{i}" for i in range(45)]),
         "colour_accuracy": 0.5},
        retrieval,
        {"task": "classification", "name": "text", "lang": "ko",
         "skipped_reason": "no Hangul font"},
    ]


def test_write_report_creates_json_markdown_and_plots(tmp_path: Path) -> None:
    results = _results()
    paths = write_report(results, tmp_path / "out", meta={"model": "tiny"})
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["meta"] == {"model": "tiny"}
    assert [r["name"] for r in data["results"]] == [r["name"] for r in results]
    assert data["results"][1]["classes"] == ["빨간색", "초록색", "파란색"]  # stored as UTF-8 text
    for name in ("accuracy.png", "retrieval.png", "confusion_colour_en.png",
                 "confusion_colour_ko.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    # 45 classes: too many for a readable plot; the matrix stays in the JSON.
    assert not (out / "confusion_heldout_en.png").exists()
    assert len(data["results"][2]["confusion"]) == 45
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "![confusion matrix](confusion_colour_ko.png)" in markdown
    assert "![top-1 accuracy](accuracy.png)" in markdown and "![recall](retrieval.png)" in markdown
    assert "| colour | en | 4 | 3 | 75.0 |" in markdown
    assert "| coco | en | 3 | 3 | 100.0 |" in markdown
    assert "text [ko]: no Hangul font" in markdown
    assert set(paths) >= {"json", "markdown", "accuracy", "retrieval"}


def test_format_table_lists_every_result() -> None:
    table = format_table(_results())
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["suite", "/", "data"]
    assert any(line.split()[:2] == ["colour", "ko"] and "75.0" in line for line in lines)
    assert any(line.startswith("heldout") and "colour 50.0" in line for line in lines)
    assert any(line.startswith("coco") for line in lines)
    assert "skipped text [ko]: no Hangul font" in table


def test_korean_labels_get_a_hangul_font_or_a_warning(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    result = _classification("colour", "ko", ["빨간색", "초록색", "파란색"])
    if hangul_font() is not None:
        assert report._fonts_for(result["classes"])[0] == hangul_font()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # matplotlib warns about missing glyphs otherwise
            report.plot_confusion(result, tmp_path / "ko.png")
    monkeypatch.setattr(report, "hangul_font", lambda: None)
    with pytest.warns(RuntimeWarning, match="no font with Hangul"):
        report.plot_confusion(result, tmp_path / "fallback.png")
    assert (tmp_path / "fallback.png").is_file()
    assert report._fonts_for(["red", "green"]) == ["DejaVu Sans"]
