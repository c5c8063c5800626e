"""Contact sheets (Korean captions must render) and dataset statistics."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont
from typer.testing import CliRunner

from imagefm.data.formats import write_shards
from imagefm.data.inspect import (
    FONT_ENV,
    FontNotFoundError,
    contact_sheet,
    find_hangul_font,
    format_stats,
    sample_records,
    stats,
    wrap_text,
)
from imagefm.data.records import Caption, Record


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def korean_records(n: int = 6) -> list[Record]:
    return [Record(key=f"k{i}", image=png((40 * i, 200, 100)), split="train" if i % 3 else "test",
                   captions=[Caption(f"picture number {i}"),
                             Caption(f"그림 {i}번: 빨간 사과", "ko")])
            for i in range(n)]


@pytest.fixture
def hangul_font() -> Path:
    try:
        return find_hangul_font()
    except FontNotFoundError as err:
        pytest.skip(str(err))


def test_found_font_draws_hangul(hangul_font: Path) -> None:
    font = ImageFont.truetype(str(hangul_font), 20)
    hangul = font.getmask("한글").getbbox()
    assert hangul is not None
    # Not the "missing glyph" box: two different syllables draw differently.
    assert np.asarray(font.getmask("한")).tobytes() != np.asarray(font.getmask("글")).tobytes()


def test_missing_font_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(FONT_ENV, str(tmp_path / "none.ttf"))
    with pytest.raises(FontNotFoundError, match=FONT_ENV):
        find_hangul_font()


def test_contact_sheet_renders_korean(tmp_path: Path, hangul_font: Path) -> None:
    records = korean_records(6)
    out = contact_sheet(records, tmp_path / "sheet.png", n=6, thumb=64, columns=3)
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # 3 columns x 2 rows of 64-pixel thumbnails.
    assert sheet.shape[1] == 3 * (64 + 10) + 10
    # Thumbnail colours are where the grid puts them (first tile: colour of record 0).
    assert tuple(sheet[10 + 32, 10 + 32]) == (0, 200, 100)
    # The Korean caption is drawn: render the same sheet with the Korean text removed and
    # compare the caption area, which must differ where the Hangul was.
    english_only = [Record(key=r.key, image=r.image, split=r.split, captions=r.captions[:1])
                    for r in records]
    other = contact_sheet(english_only, tmp_path / "en.png", n=6, thumb=64, columns=3)
    plain = np.asarray(Image.open(other).convert("RGB")).astype(int)
    text_rows = slice(10 + 64, 10 + 64 + 16 * 7)
    diff = np.abs(sheet[text_rows] - plain[text_rows]).sum(axis=2)
    assert (diff > 100).sum() > 200  # many pixels of Hangul strokes


def test_contact_sheet_from_directory_is_reproducible(tmp_path: Path, hangul_font: Path) -> None:
    records = korean_records(10)
    records[3].image = b"broken"  # drawn as a red cross, not a crash
    write_shards(records, tmp_path / "d", max_samples=4)
    first = contact_sheet(tmp_path / "d", tmp_path / "a.png", n=4, seed=1)
    second = contact_sheet(tmp_path / "d", tmp_path / "b.png", n=4, seed=1)
    assert first.read_bytes() == second.read_bytes()
    chosen = [r.key for r in sample_records(tmp_path / "d", 4, seed=1)]
    assert len(set(chosen)) == 4
    # Every record can be drawn, including the broken one.
    contact_sheet(tmp_path / "d", tmp_path / "all.png", n=24)


def test_sampling_is_uniform_and_seeded() -> None:
    records = [Record(key=f"r{i}") for i in range(50)]
    picks = [tuple(r.key for r in sample_records(records, 5, seed=s)) for s in range(200)]
    assert picks[0] == tuple(r.key for r in sample_records(records, 5, seed=0))
    assert len(set(picks)) > 150  # seeds give different samples
    counts = np.bincount([int(k[1:]) for pick in picks for k in pick], minlength=50)
    assert counts.min() > 5 and counts.max() < 45  # about 20 each


def test_wrap_text_respects_width(hangul_font: Path) -> None:
    font = ImageFont.truetype(str(hangul_font), 13)
    text = "한국어는띄어쓰기없이도길어질수있습니다 and some English words here"
    lines = wrap_text(text, font, 60)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert all(font.getlength(line) <= 60 for line in lines)


def test_stats_counts(tmp_path: Path) -> None:
    records = [
        Record(key="a", image=png((1, 1, 1)), source="tux", split="train",
               captions=[Caption("x" * 5), Caption("한국어", "ko")], label=0, label_name="cat"),
        Record(key="b", image=png((1, 1, 1)), source="tux", split="test",
               captions=[Caption("y" * 15)], label=0, label_name="cat"),
        Record(key="c", image=png((1, 1, 1)), source="coco", split="train",
               captions=[Caption("z" * 45), Caption("w" * 400)], label=1, label_name="dog"),
        Record(key="d", image=None, source="coco", split="train"),
    ]
    write_shards(records, tmp_path, max_samples=3)
    result = stats(tmp_path)
    assert result["records"] == 4 and result["captions"] == 5
    assert result["without_caption"] == 1 and result["without_image"] == 1
    assert result["by_source"] == {"tux": 2, "coco": 2}
    assert result["by_split"] == {"train": 3, "test": 1}
    assert result["by_language"] == {"en": 4, "ko": 1}
    assert result["records_by_language"] == {"en": 3, "ko": 1}
    assert result["by_label"] == {"cat": 2, "dog": 1}
    bins = result["caption_length"]["bins"]
    assert bins == {"0-9": 2, "10-19": 1, "20-39": 0, "40-79": 1, "80-159": 0, "160-319": 0,
                    "320+": 1}
    assert result["caption_length"]["min"] == 3 and result["caption_length"]["max"] == 400
    assert result["caption_length"]["mean"] == round((5 + 3 + 15 + 45 + 400) / 5, 1)
    assert stats(records) == result  # records in memory give the same numbers
    table = format_stats(result)
    assert "records 4" in table and "  cat" in table and "320+" in table


def test_cli_show_and_stats(tmp_path: Path, hangul_font: Path) -> None:
    import typer

    from imagefm.cli.data import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app)
    write_shards(korean_records(5), tmp_path / "d")
    runner = CliRunner()
    shown = runner.invoke(app, ["data", "show", str(tmp_path / "d"), "--out",
                                str(tmp_path / "s.png"), "-n", "3"])
    assert shown.exit_code == 0, shown.output
    assert Image.open(tmp_path / "s.png").size[0] > 0
    table = runner.invoke(app, ["data", "stats", str(tmp_path / "d")])
    assert table.exit_code == 0 and "records 5" in table.output and "ko" in table.output
    as_json = runner.invoke(app, ["data", "stats", str(tmp_path / "d"), "--json"])
    assert '"records": 5' in as_json.output
