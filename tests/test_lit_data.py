"""The ``recipes`` data source and the ``lit-effnet`` preset: train splits only, determinism,
rank slicing, cached locked-tower features, and the preset's run.local smoke run."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagefm.convert import towers
from imagefm.data.recipes import RECIPES, Recipe, reserved_test_split
from imagefm.data.records import Caption, Record
from imagefm.train import recipe_data
from imagefm.train.config import load_config
from imagefm.train.distributed import DistInfo
from imagefm.train.launch import build_model, run
from imagefm.train.metrics import read_metrics

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lit-effnet.yaml"
TUXPAINT = Path("/usr/share/tuxpaint/stamps")


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_records(_src: Path, _skips) -> list[Record]:
    """12 pictures, every third one in the test split, captions in en/ko/fr."""
    return [Record(key=f"fake-{i}", image=_png((i * 20, 0, 255 - i * 20)), image_ext="png",
                   captions=[Caption(f"thing {i}", "en"), Caption(f"물건 {i}", "ko"),
                             Caption(f"chose {i}", "fr")],
                   split="test" if i % 3 == 0 else "train", source="fake")
            for i in range(12)]


@pytest.fixture
def fake_recipe(tmp_path, monkeypatch):
    recipe = Recipe(name="fake", summary="fake", license="none", install="nothing",
                    build=_fake_records, default_src=str(tmp_path))
    monkeypatch.setitem(RECIPES, "fake", recipe)
    return recipe


def _config(tmp_path, *overrides: str):
    return load_config(CONFIG, [f"run.output_dir={tmp_path}", "run.local=true",
                                "run.progress=false", "run.tensorboard=false",
                                "data.options.recipes=[fake]", "data.batch_size=4",
                                *overrides])


def test_only_train_records_in_the_chosen_languages(fake_recipe):
    records = list(recipe_data.read_train_records(["fake"], ["en", "ko"]))
    assert [r.key for r in records] == [f"fake-{i}" for i in range(12) if i % 3]
    assert all([c.lang for c in r.captions] == ["en", "ko"] for r in records)


def test_batches_are_deterministic_per_epoch_and_split_over_ranks(tmp_path, fake_recipe):
    config = _config(tmp_path, "data.options.views=2")
    model = build_model(config)
    single = recipe_data.recipe_source(config, model, DistInfo())
    ranks = [recipe_data.recipe_source(config, model, DistInfo(rank=r, world_size=2))
             for r in (0, 1)]
    assert single.features  # stage lit locks the image tower: its features are cached
    first, again, other = list(single(0)), list(single(0)), list(single(1))
    assert len(first) == 2  # 8 train images, batches of 4
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a["pixel_values"], b["pixel_values"])
                   for a, b in zip(first, other, strict=True))
    for whole, *parts in zip(first, *(r(0) for r in ranks), strict=True):
        assert torch.equal(whole["pixel_values"],
                           torch.cat([p["pixel_values"] for p in parts]))
        for part, rows in zip(parts, (slice(0, 2), slice(2, 4)), strict=True):
            # Each rank pads to its own longest caption; the real tokens agree.
            length = part["input_ids"].shape[1]
            assert torch.equal(part["input_ids"], whole["input_ids"][rows, :length])


def test_cached_features_are_the_locked_towers_output(tmp_path, fake_recipe):
    config = _config(tmp_path, "data.options.views=2")
    model = build_model(config).eval()
    cached = recipe_data.recipe_source(config, model, DistInfo())
    records = list(recipe_data.read_train_records(["fake"], ["en", "ko"]))
    pixels = recipe_data.preprocess([r.image for r in records], model.card)
    with torch.no_grad():
        assert torch.allclose(cached.inputs[0], model.vision(pixels), atol=1e-6)
        assert torch.allclose(cached.inputs[1], model.vision(pixels.flip(-1)), atol=1e-6)
    unlocked = recipe_data.recipe_source(
        _config(tmp_path, "stage.preset=full"), model, DistInfo())
    assert not unlocked.features and unlocked.inputs.shape[1:] == pixels.shape[1:]
    with pytest.raises(Exception, match="cache_image_features=true needs a locked image tower"):
        recipe_data.recipe_source(_config(tmp_path, "stage.preset=full",
                                          "data.options.cache_image_features=true"),
                                  model, DistInfo())


def test_more_images_than_fit_in_memory_are_refused_with_the_streaming_way(fake_recipe,
                                                                          monkeypatch):
    from imagefm.config import ConfigError

    monkeypatch.setattr(recipe_data, "MAX_IN_MEMORY", 5)
    records = recipe_data.read_train_records(["fake"], ["en"])
    with pytest.raises(ConfigError, match="data.source=stream"):
        recipe_data.collect(records, _CountingTokenizer())


class _CountingTokenizer:
    def encode_batch(self, texts):
        return [[len(t)] for t in texts]


def test_the_source_needs_a_model_tokenizer(tmp_path, fake_recipe):
    config = _config(tmp_path)
    model = build_model(config)
    model.tokenizer = None
    with pytest.raises(Exception, match="the model's own tokenizer"):
        recipe_data.recipe_source(config, model, DistInfo())


@pytest.mark.skipif(not TUXPAINT.is_dir(), reason="apt-get install tuxpaint-stamps-default")
def test_tuxpaint_reserved_stamps_are_never_read_for_training():
    records = list(recipe_data.read_train_records(["tuxpaint"], ["en", "ko"]))
    assert len(records) > 500
    assert not any(reserved_test_split(r.meta["name"]) for r in records)


@pytest.mark.parametrize("name", ["lit-effnet", "lit-effnet-en"])
def test_local_lit_presets_are_tiny_with_random_towers(name):
    config = load_config(None, [f"model.preset={name}", "run.local=true"])
    assert config.model.pretrained is False
    model = build_model(config)
    assert type(model.vision).__name__ == "EfficientNetLite"
    assert type(model.text).__name__ == "BertEncoder"
    assert model.num_parameters < 200_000 and model.tokenizer is not None


def test_lit_effnet_config_smoke_run(tmp_path, fake_recipe):
    """configs/lit-effnet.yaml with run.local=true trains and saves a loadable model."""
    import imagefm

    run_dir = run(_config(tmp_path, "train.steps=3", "run.log_every=1"))
    assert [r["step"] for r in read_metrics(run_dir)][-1] == 3
    model = imagefm.load(run_dir / "final")
    processor = imagefm.load_processor(run_dir / "final")
    batch = processor(images=[_png((1, 2, 3))], texts=["thing 1", "물건 1"])
    with torch.no_grad():
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert out.logits_per_image.shape == (1, 2)
    assert towers.PRESET_TOWERS["lit-effnet"] == {"vision": "efficientnet-lite0",
                                                   "text": "multilingual-e5-small"}
