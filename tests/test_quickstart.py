"""The main job end to end, shrunk to seconds (the real budget is measured in docs/results.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import imagefm
from imagefm.apps.quickstart import (
    SCENE_STYLES,
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
    assert ("synthetic scenes (clean)", "ko") in names
    assert (tmp_path / "report" / "report.md").read_text().startswith("# imagefm quickstart")
    # The trained BPE's EOS is not its largest id: the text tower must pool at the EOS id.
    assert model.config.text.pool == "eos"
    assert model.config.text.eos_token_id == model.tokenizer.eos_id
    # Running the main job again replaces the previous run instead of refusing to start.
    again = run_quickstart(settings, log=lambda _: None)
    assert again["model_dir"] == result["model_dir"]


def test_clean_scenes_are_solid_on_plain_white_at_region_centres() -> None:
    from imagefm.data.synthetic import COLOURS, generate
    from imagefm.data.synthetic.scenes import REGION_CENTRES

    settings = QuickstartSettings(batch_size=8, group_size=4, samples=32, progress=False,
                                  workers=1, image_size=32, mixed=0.0)
    data = generate_scenes(settings, log=lambda _: None)
    corners = data.pixels[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # [N, 4 corners, RGB]
    assert (corners == corners[:, :1]).all()  # plain backgrounds: no noise, no gradient
    # White, except for groups built around a white object (their members share its background)
    white = (corners[:, 0] == COLOURS["white"].rgb).all(axis=-1)
    assert white.mean() >= 0.7
    style = {"style": SCENE_STYLES["clean"]}
    for record in generate("pairs", 16, seed=0, image_size=32, workers=1, mixed=0.0, **style):
        obj = record.meta["scene"]["objects"][0]
        assert obj["texture"] == "solid"
        assert (obj["x"], obj["y"]) in set(REGION_CENTRES.values())


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
    with pytest.raises(ConfigError, match="pool must be 'cls' or 'mean'"):
        QuickstartSettings(pool="max")


def test_quickstart_mean_pool_builds_a_tower_without_class_token() -> None:
    """``--pool mean``: no class token (the tower llama.cpp's VLM graph can run), so the
    tower's tokens are its patches only and the pooled vector is their mean."""
    from imagefm.apps.quickstart import build_model
    from imagefm.tokenizer import train_bpe

    tokenizer = train_bpe(["a red circle", "빨간 원"] * 4, 300, context_length=16)
    cls = build_model(QuickstartSettings(), tokenizer)
    mean = build_model(QuickstartSettings(pool="mean"), tokenizer)
    assert cls.config.vision.class_token and cls.config.vision.pool == "cls"
    assert not mean.config.vision.class_token and mean.config.vision.pool == "mean"
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embeds = mean.encode_image(pixels)
    assert embeds.shape == cls.encode_image(pixels).shape
