"""The main job end to end, shrunk to seconds (the real budget is measured in docs/results.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import imagefm
from imagefm.apps.quickstart import (
    GroupBatches,
    QuickstartSettings,
    generate_scenes,
    run_quickstart,
)
from imagefm.config import ConfigError, ImageCard


def test_quickstart_smoke_run_writes_model_and_report(tmp_path: Path) -> None:
    settings = QuickstartSettings(out=tmp_path, steps=3, batch_size=16, samples=64,
                                  eval_images=10, retrieval_images=16, progress=False,
                                  real_data=False, workers=1)
    result = run_quickstart(settings, log=lambda _: None)
    model = imagefm.load(result["model_dir"])
    assert model.tokenizer is not None
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    names = {(r["name"], r["lang"]) for r in report["results"]}
    for suite in ("colour", "shape", "heldout", "count", "relation"):
        assert {(suite, "en"), (suite, "ko")} <= names
    assert ("synthetic scenes", "ko") in names
    assert (tmp_path / "report" / "report.md").read_text().startswith("# imagefm quickstart")


def test_group_batches_keep_groups_together_and_are_deterministic() -> None:
    settings = QuickstartSettings(batch_size=8, group_size=4, samples=32, progress=False,
                                  workers=1, image_size=32)
    data = generate_scenes(settings, log=lambda _: None)
    ids = {lang: torch.arange(32)[:, None].repeat(1, 5) for lang in ("en", "ko")}
    masks = {lang: torch.ones(32, 5, dtype=torch.long) for lang in ("en", "ko")}
    batches = GroupBatches(data, ids, masks, ImageCard(image_size=32), settings)
    first = list(batches(0))
    assert len(first) == 4
    for batch in first:
        rows = batch["input_ids"][:, 0]
        # Rows come in whole groups of four consecutive scenes.
        assert torch.equal(rows.view(2, 4) % 4, torch.arange(4).repeat(2, 1))
    again = list(batches(0))
    assert all(torch.equal(a["pixel_values"], b["pixel_values"])
               for a, b in zip(first, again, strict=True))
    other = list(batches(1))
    assert not all(torch.equal(a["input_ids"], b["input_ids"])
                   for a, b in zip(first, other, strict=True))


def test_quickstart_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="multiple of group_size"):
        QuickstartSettings(batch_size=10, group_size=4)
    with pytest.raises(ConfigError, match="clip"):
        QuickstartSettings(loss="triplet")
