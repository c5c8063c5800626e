"""Every synthetic suite, zero-shot and retrieval end to end with a tiny random DualEncoder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import imagefm
from imagefm.data.formats import write_shards
from imagefm.data.records import Caption, Record
from imagefm.data.synthetic.vocab import COLOUR_NAMES, DEFAULT_HELD_OUT, SHAPE_NAMES
from imagefm.eval.suites import SUITES, count_phrases, run_suite, run_suites
from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer
from imagefm.processor import Processor
from imagefm.tokenizer import train_bpe

CORPUS = ["a photo of a red circle", "two blue stars to the left of", "a sign that says",
          "빨간 원 그림", "파란 별 세 개가 있다", "고양이를 찍은 사진", "표지판"] * 3


@pytest.fixture(scope="module")
def tiny() -> tuple[DualEncoder, Processor]:
    tokenizer = train_bpe(CORPUS, 300, context_length=32)
    model = DualEncoder(fit_text_to_tokenizer(imagefm.preset("tiny"), tokenizer)).eval()
    model.tokenizer = tokenizer
    return model, Processor.for_model(model)


@pytest.mark.parametrize("lang", ["en", "ko"])
@pytest.mark.parametrize("name", list(SUITES))
def test_every_suite_runs_end_to_end(tiny, name: str, lang: str) -> None:
    model, processor = tiny
    result = run_suite(model, processor, name, lang, n=6, seed=3)
    assert (result["name"], result["lang"], result["task"]) == (name, lang, "classification")
    if "skipped_reason" in result:  # the text suite without a Hangul font
        assert name == "text" and "font" in result["skipped_reason"]
        return
    num_classes = len(result["classes"])
    assert result["n"] == 6 and result["num_classes"] == num_classes
    for key in ("top1", "mean_per_class", "chance") + (("top5",) if num_classes > 5 else ()):
        assert 0.0 <= result[key] <= 1.0, key
    assert "top5" in result or num_classes <= 5
    assert len(result["per_class"]) == num_classes
    assert len(result["confusion"]) == num_classes
    assert sum(map(sum, result["confusion"])) == 6
    hits = sum(result["confusion"][i][i] for i in range(num_classes))
    assert result["top1"] == pytest.approx(hits / 6)
    json.dumps(result)  # reports need plain JSON values
    if name == "heldout":
        assert num_classes == len(COLOUR_NAMES) * len(SHAPE_NAMES)
        assert 0 <= result["colour_accuracy"] <= 1 and 0 <= result["shape_accuracy"] <= 1
        # Only held-out combinations are shown.
        shown = {c for c, row in zip(result["classes"], result["confusion"], strict=True)
                 if sum(row)}
        assert len(shown) == min(6, len(DEFAULT_HELD_OUT))


def test_suites_are_reproducible_from_the_seed(tiny) -> None:
    model, processor = tiny
    first = run_suite(model, processor, "count", "ko", n=5, seed=11)
    again = run_suite(model, processor, "count", "ko", n=5, seed=11)
    assert first["confusion"] == again["confusion"]
    assert len(run_suites(model, processor, ["colour", "count"], ["en"], n=3)) == 2
    with pytest.raises(ValueError, match="unknown suite"):
        run_suite(model, processor, "nope", "en", n=2)
    with pytest.raises(ValueError, match="languages"):
        run_suite(model, processor, "colour", "fr", n=2)


def test_count_prompts_use_natural_numbers() -> None:
    assert count_phrases("red", "star", 1, "en")[0] == "a red star"
    assert count_phrases("red", "star", 3, "en")[0] == "three red stars"
    assert count_phrases("red", "circle", 2, "ko") == ["빨간 원 두 개", "빨간 원이 두 개 있다",
                                                       "빨간 원 두 개가 그려진 그림"]
    assert count_phrases("red", "heart", 3, "ko")[1] == "빨간 하트가 세 개 있다"


def _png(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), rgb).save(buffer, "PNG")
    return buffer.getvalue()


def _cli() -> typer.Typer:
    from imagefm.cli.eval import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app)
    return app


def test_cli_runs_synthetic_zeroshot_and_retrieval(tiny, tmp_path: Path) -> None:
    model, _ = tiny
    checkpoint = model.save_pretrained(tmp_path / "model")
    names = ["cat", "deer", "horse"]
    records = [Record(key=f"k{i}", image=_png((40 * i, 90, 200 - 20 * i)), label=i % 3,
                      label_name=names[i % 3], split="test",
                      captions=[Caption(f"a thing number {i}", "en"), Caption(f"물건 {i}", "ko"),
                                Caption(f"another thing {i}", "en")])
               for i in range(7)]
    records[3].image = b"not an image"
    write_shards(records, tmp_path / "data")
    (tmp_path / "classes.json").write_text(json.dumps({"en": names, "ko": ["고양이", "사슴", "말"]},
                                                      ensure_ascii=False), encoding="utf-8")
    runner = CliRunner()

    result = runner.invoke(_cli(), ["eval", str(checkpoint), "--suite", "count,heldout",
                                    "--lang", "ko", "--n", "4", "--out", str(tmp_path / "syn")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "syn" / "results.json").read_text(encoding="utf-8"))
    assert [(r["name"], r["lang"]) for r in data["results"]] == [("count", "ko"),
                                                                  ("heldout", "ko")]
    assert (tmp_path / "syn" / "confusion_count_ko.png").is_file()
    assert "count" in result.output and "heldout" in result.output

    result = runner.invoke(_cli(), ["eval", str(checkpoint), "--suite", "zeroshot", "--data",
                                    str(tmp_path / "data"), "--classes",
                                    str(tmp_path / "classes.json"), "--split", "test",
                                    "--out", str(tmp_path / "zs")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "zs" / "results.json").read_text(encoding="utf-8"))
    by_lang = {r["lang"]: r for r in data["results"]}
    assert by_lang["ko"]["classes"] == ["고양이", "사슴", "말"]
    assert by_lang["en"]["n"] == 6 and by_lang["en"]["skipped"]["skipped"] == {
        "undecodable image": 1}
    assert "skipped 1 undecodable image" in result.output

    result = runner.invoke(_cli(), ["eval", str(checkpoint), "--suite", "retrieval", "--data",
                                    str(tmp_path / "data"), "--out", str(tmp_path / "ret")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "ret" / "results.json").read_text(encoding="utf-8"))
    by_lang = {r["lang"]: r for r in data["results"]}
    assert (by_lang["en"]["n_images"], by_lang["en"]["n_texts"]) == (6, 12)
    assert (by_lang["ko"]["n_images"], by_lang["ko"]["n_texts"]) == (6, 6)
    for r in by_lang.values():
        assert all(0 <= v <= 1 for v in r["image_to_text"].values())
    assert (tmp_path / "ret" / "retrieval.png").is_file()

    result = runner.invoke(_cli(), ["eval", str(checkpoint), "--suite", "zeroshot"])
    assert result.exit_code != 0 and "--data" in result.output
