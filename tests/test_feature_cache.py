"""Locked-tower features kept on disk (train/feature_cache.py, data.options.feature_cache) and
the lit-effnet-prior preset's smoke run."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagefm.data.recipes import RECIPES, Recipe
from imagefm.data.records import Caption, Record
from imagefm.train import feature_cache, recipe_data
from imagefm.train.config import load_config
from imagefm.train.distributed import DistInfo
from imagefm.train.launch import build_model, run
from imagefm.train.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _records(_src: Path, _skips) -> list[Record]:
    return [Record(key=f"fake-{i}", image=_png((i * 20, 0, 255 - i * 20)), image_ext="png",
                   captions=[Caption(f"thing {i}", "en"), Caption(f"물건 {i}", "ko")],
                   split="train", source="fake") for i in range(8)]


@pytest.fixture
def fake_recipe(tmp_path, monkeypatch):
    recipe = Recipe(name="fake", summary="fake", license="none", install="nothing",
                    build=_records, default_src=str(tmp_path))
    monkeypatch.setitem(RECIPES, "fake", recipe)
    return recipe


def _config(tmp_path, name: str, *overrides: str):
    return load_config(CONFIGS / name, [f"run.output_dir={tmp_path}", "run.local=true",
                                        "run.progress=false", "run.tensorboard=false",
                                        "data.options.recipes=[fake]", "data.batch_size=4",
                                        *overrides])


def test_features_are_computed_once_then_read_back(tmp_path, fake_recipe, monkeypatch):
    config = _config(tmp_path, "lit-effnet.yaml", "data.options.views=2",
                     f"data.options.feature_cache={tmp_path / 'features'}")
    model = build_model(config).eval()
    first = recipe_data.recipe_source(config, model, DistInfo())
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 1

    def refuse(*_args, **_kwargs):
        raise AssertionError("the tower ran although its features were on disk")

    monkeypatch.setattr(recipe_data, "tower_features", refuse)
    again = recipe_data.recipe_source(config, model, DistInfo())
    assert again.features and torch.equal(again.inputs, first.inputs)
    # Other weights are another key: never a stale hit.
    with torch.no_grad():
        next(model.vision.parameters()).add_(1.0)
    with pytest.raises(AssertionError, match="tower ran"):
        recipe_data.recipe_source(config, model, DistInfo())


def test_key_depends_on_images_views_and_weights():
    tower = torch.nn.Linear(3, 2)
    images = [b"a", b"b"]
    key = feature_cache.feature_key(images, 2, tower, "card")
    assert key == feature_cache.feature_key(list(images), 2, tower, "card")
    assert key != feature_cache.feature_key([b"a", b"c"], 2, tower, "card")
    assert key != feature_cache.feature_key(images, 1, tower, "card")
    assert key != feature_cache.feature_key(images, 2, tower, "other card")
    assert key != feature_cache.feature_key(images, 2, torch.nn.Linear(3, 2), "card")


def test_lit_effnet_prior_config_smoke_run(tmp_path, fake_recipe):
    """configs/lit-effnet-prior.yaml with run.local=true trains the prior projection (its
    ImageNet classifier locked) and saves a model that loads."""
    import imagefm

    config = _config(tmp_path, "lit-effnet-prior.yaml", "train.steps=2", "run.log_every=1")
    model = build_model(config)
    assert type(model.image_proj).__name__ == "ClassPriorProjection"
    run_dir = run(config)
    assert [r["step"] for r in read_metrics(run_dir)][-1] == 2
    loaded = imagefm.load(run_dir / "final")
    assert loaded.config.image_projection == "imagenet_prior"
    assert loaded.card.resize_mode == "pad"  # model.preprocess, saved with the model
    assert (run_dir / "wise-start.safetensors").is_file()  # stage.wise_alpha's start
