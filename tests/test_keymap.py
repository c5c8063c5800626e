"""The key-map engine: transforms, reports, strictness, export; and strict loading end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import imagefm
from imagefm.config import DualEncoderConfig, TextConfig, VisionConfig
from imagefm.convert.hf import CLIP_KEY_MAP, SIGLIP_KEY_MAP, export_hf
from imagefm.convert.keymap import (
    TRANSPOSE,
    KeyMap,
    KeyMapError,
    load_with_key_map,
    reshape,
    rule,
    split,
)
from imagefm.models.dual_encoder import DualEncoder

QKV = [f"blocks.{{i}}.{p}.weight" for p in "qkv"]
TOY = KeyMap("toy", (
    rule("layers.{i}.in_proj", QKV, split(3)),
    rule("proj", "out.weight", TRANSPOSE),
    rule("scale", "scale", reshape((1,))),
), ignore=("buffer.{i}",))
TOY_SHAPES = {"blocks.0.q.weight": (2, 4), "blocks.0.k.weight": (2, 4),
              "blocks.0.v.weight": (2, 4), "out.weight": (3, 4), "scale": ()}


def _toy_source() -> dict[str, torch.Tensor]:
    return {"layers.0.in_proj": torch.randn(6, 4), "proj": torch.randn(4, 3),
            "scale": torch.tensor([2.5]), "buffer.0": torch.arange(3)}


def test_transforms_load_and_export_round_trip() -> None:
    source = _toy_source()
    ours, report = TOY.to_ours(source, TOY_SHAPES)
    assert report.ok and report.ignored == ["buffer.0"]
    assert torch.equal(ours["blocks.0.k.weight"], source["layers.0.in_proj"][2:4])
    assert torch.equal(ours["out.weight"], source["proj"].t())
    assert ours["scale"].shape == () and ours["scale"].item() == 2.5
    back = TOY.to_source(ours)
    assert set(back) == {"layers.0.in_proj", "proj", "scale"}  # buffers are not written back
    for key, value in back.items():
        assert torch.equal(value, source[key]) and value.shape == source[key].shape


def test_report_lists_missing_unexpected_and_mis_shaped() -> None:
    source = _toy_source()
    del source["proj"]
    source["layers.0.in_proj"] = torch.randn(7, 4)  # not divisible by 3
    source["scale"] = torch.tensor([1.0, 2.0])  # two values for a scalar
    source["layers.1.in_proj"] = torch.randn(6, 4)  # a layer the model does not have
    source["stray"] = torch.zeros(1)
    _, report = TOY.to_ours(source, TOY_SHAPES)
    assert not report.ok
    assert report.missing == ["out.weight"]
    assert any(u.startswith("layers.1.in_proj") for u in report.unexpected)
    assert "stray" in report.unexpected
    assert any(m.startswith("layers.0.in_proj [7, 4]") for m in report.mis_shaped)
    assert any(m.startswith("scale [2]") for m in report.mis_shaped)
    text = str(report)
    for name in ("out.weight", "stray", "layers.1.in_proj", "scale"):
        assert name in text


def test_ambiguous_map_and_unexportable_parameters_fail() -> None:
    ambiguous = KeyMap("bad", (rule("a.{i}", "x.{i}"), rule("a.{j}", "y.{j}")))
    with pytest.raises(KeyMapError, match="ambiguous"):
        ambiguous.to_ours({"a.0": torch.zeros(1)}, {"x.0": (1,), "y.0": (1,)})
    with pytest.raises(KeyMapError, match="extra.weight"):
        TOY.to_source({**TOY.to_ours(_toy_source(), TOY_SHAPES)[0], "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="placeholders"):
        rule("a.{i}", "b")


# --- strict loading of a real format -------------------------------------------------------------

def _tiny(kind: str = "clip") -> DualEncoder:
    vision = VisionConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64)
    text = TextConfig(vocab_size=50, context_length=8, width=32, layers=2, heads=4, mlp_dim=64)
    if kind == "siglip":
        vision = dataclasses.replace(vision, class_token=False, patch_bias=True, pre_norm=False,
                                     pool="map")
        text = dataclasses.replace(text, causal=False, pool="last")
        return DualEncoder(DualEncoderConfig("siglip", vision, text, embed_dim=32,
                                             image_projection="none",
                                             text_projection="linear_bias", init_logit_bias=-1.0))
    return DualEncoder(DualEncoderConfig("clip", vision, text, embed_dim=24))


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    export_hf(_tiny(), tmp_path)
    return tmp_path


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(("edit", "named"), [
    (lambda s: s.pop("text_model.final_layer_norm.weight"), "text.norm_final.weight"),
    (lambda s: s.__setitem__("vision_model.extra.weight", torch.zeros(2)),
     "vision_model.extra.weight"),
    (lambda s: s.__setitem__("visual_projection.weight", torch.zeros(24, 31)),
     "visual_projection.weight [24, 31] -> image_proj.weight: expected [24, 32]"),
    (lambda s: s.__setitem__("vision_model.encoder.layers.2.mlp.fc1.bias", torch.zeros(64)),
     "vision_model.encoder.layers.2.mlp.fc1.bias"),
])
def test_strict_load_names_the_bad_key(hf_dir: Path, edit, named: str) -> None:
    _edit_weights(hf_dir, edit)
    with pytest.raises(KeyMapError) as info:
        imagefm.load(hf_dir)
    assert named in str(info.value)
    assert not info.value.report.ok


def test_non_strict_load_warns_and_loads_the_rest(hf_dir: Path) -> None:
    _edit_weights(hf_dir, lambda s: s.pop("text_model.final_layer_norm.weight"))
    with pytest.warns(UserWarning, match="text.norm_final.weight"):
        model = imagefm.load(hf_dir, strict=False)
    reference = load_file(str(hf_dir / "model.safetensors"))
    assert torch.equal(model.text.norm_final.bias, reference["text_model.final_layer_norm.bias"])


def test_listed_buffers_are_ignored_not_dropped_silently(hf_dir: Path) -> None:
    _edit_weights(hf_dir, lambda s: s.__setitem__("text_model.embeddings.position_ids",
                                                  torch.arange(8)[None]))
    model = _tiny()
    from imagefm.convert.hf import read_hf_weights

    report = load_with_key_map(model, CLIP_KEY_MAP, read_hf_weights(hf_dir))
    assert report.ok and report.ignored == ["text_model.embeddings.position_ids"]
    assert len(report.loaded) == len(model.state_dict())


def test_strict_failure_leaves_the_model_untouched() -> None:
    model = _tiny("siglip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = SIGLIP_KEY_MAP.to_source(model.state_dict())
    state = {k: v + 1 for k, v in state.items()}
    state.pop("vision_model.head.probe")
    with pytest.raises(KeyMapError, match="vision.head.probe"):
        load_with_key_map(model, SIGLIP_KEY_MAP, state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
