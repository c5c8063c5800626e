"""``imagefm index`` and ``imagefm search`` end to end with a real tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

pytest.importorskip("faiss")

from test_search_fixtures import NAMES, image_bytes, make_colour_folder, tiny_checkpoint  # noqa: E402

from imagefm.cli.search import register  # noqa: E402


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "photos"
    make_colour_folder(root)
    return root, tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "photos.index"


def test_index_then_search_by_text_and_image(cli, setup, tmp_path) -> None:
    root, ckpt, out = setup
    runner = CliRunner()
    result = runner.invoke(cli, ["index", str(root), "--model", str(ckpt), "--out", str(out),
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{len(NAMES)} images (flat)" in result.output and f"{len(NAMES)} added" in result.output

    result = runner.invoke(cli, ["search", str(out), "빨간 자동차", "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.strip().splitlines()]
    assert [line[0] for line in lines] == ["1", "2", "3"]
    scores = [float(line[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)

    gallery = tmp_path / "out.html"
    result = runner.invoke(cli, ["search", str(out), "--image", str(root / "red.png"), "-k", "2",
                                 "--json", "--html", str(gallery)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert rows[0]["path"] == "red.png" and rows[0]["score"] > 0.999
    page = gallery.read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 2 and "red.png" in page

    # A second run with nothing changed embeds nothing; the model comes from the index.
    (root / "more.png").write_bytes(image_bytes("blue", seed=3))
    result = runner.invoke(cli, ["index", str(root), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "1 added" in result.output and f"{len(NAMES)} unchanged" in result.output


def test_cli_errors_are_one_clear_line(cli, setup, tmp_path) -> None:
    root, ckpt, out = setup
    runner = CliRunner()
    result = runner.invoke(cli, ["search", str(tmp_path / "nope"), "cat"])
    assert result.exit_code == 2 and "not an image index" in result.output
    result = runner.invoke(cli, ["index", str(root), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "a model is needed" in result.output
    runner.invoke(cli, ["index", str(root), "-m", str(ckpt), "-o", str(out), "-q", "--workers",
                        "0"])
    result = runner.invoke(cli, ["search", str(out)])
    assert result.exit_code == 2 and "QUERY or --image" in result.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    result = runner.invoke(cli, ["search", str(out), "--image", str(bad)])
    assert result.exit_code == 2 and "bad.png" in result.output
    result = runner.invoke(cli, ["index", str(root), "-o", str(out), "--kind", "lsh", "-q"])
    assert result.exit_code == 2 and "unknown index kind" in result.output
