"""Parity with open_clip: tiny random CLIP / CustomTextCLIP models built here, saved as a hub-style
directory or a bare state dict (+ an architecture name), loaded with imagefm.load."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")

import imagefm  # noqa: E402
import imagefm.convert.open_clip as oc  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.open_clip import UnsupportedOpenClipConfig  # noqa: E402
from imagefm.convert.open_clip_export import export_open_clip  # noqa: E402

TOL = 1e-5
VOCAB, LENGTH, SIZE = 100, 12, 32
EOS = VOCAB - 1  # CLIP's EOS is its largest id, which argmax pooling relies on


def _model_cfg(quick_gelu: bool = False, vision: dict | None = None, text: dict | None = None,
               **top) -> dict:
    return {"embed_dim": 24, "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": SIZE, "patch_size": 8, "width": 32, "layers": 2,
                           "head_width": 8, "mlp_ratio": 2.0, **(vision or {})},
            "text_cfg": {"context_length": LENGTH, "vocab_size": VOCAB, "width": 32, "heads": 4,
                         "layers": 2, "mlp_ratio": 2.0, **(text or {})},
            **top}


def _reference(model_cfg: dict) -> torch.nn.Module:
    """open_clip's own model for a config, with every parameter randomised."""
    cfg = copy.deepcopy(model_cfg)
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    model = cls(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.logit_scale.fill_(2.0)
    return model


def _save_hub_dir(model: torch.nn.Module, model_cfg: dict, directory: Path,
                  preprocess: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": preprocess or {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return directory


def _inputs(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, size, size, generator=gen)
    ids = torch.zeros(3, LENGTH, dtype=torch.long)  # open_clip pads with 0
    for row, n in enumerate((LENGTH, 7, 3)):
        ids[row, :n] = torch.randint(1, EOS - 1, (n,), generator=gen)
        ids[row, 0], ids[row, n - 1] = EOS - 1, EOS  # <start>, <end>
    return pixels, ids


def _assert_parity(ours, reference, size: int = SIZE) -> None:
    pixels, ids = _inputs(size)
    mask = (ids != 0).long()  # what a tokenizer returns; open_clip itself never masks padding
    with torch.no_grad():
        out = ours(pixels, ids, mask)
        image = reference.encode_image(pixels, normalize=True)
        text = reference.encode_text(ids, normalize=True)
        logits, _ = reference.get_logits(pixels, ids)
    for name, a, b in (("image", out.image_embeds, image), ("text", out.text_embeds, text),
                       ("logits", out.logits_per_image, logits)):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g}"


CASES = {
    "quick_gelu": _model_cfg(quick_gelu=True),
    "gelu": _model_cfg(),
    "avg_pool_no_ln_pre": _model_cfg(vision={"pool_type": "avg", "no_ln_pre": True}),
    # CustomTextCLIP ("text." keys), bidirectional text pooled at the last token, Linear proj.
    "custom_text_last_bias": _model_cfg(custom_text=True,
                                        text={"no_causal_mask": True, "pool_type": "last",
                                              "proj_bias": True},
                                        init_logit_bias=-5.0),
    "eos_pool_tanh": _model_cfg(text={"pool_type": "eos", "eos_id": EOS},
                                vision={"act_kwargs": {"approximate": "tanh"}},
                                nonscalar_logit_scale=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hub_directory_parity(tmp_path: Path, case: str) -> None:
    model_cfg = copy.deepcopy(CASES[case])
    if case == "eos_pool_tanh":
        model_cfg["text_cfg"]["act_kwargs"] = {"approximate": "tanh"}
    reference = _reference(model_cfg)
    directory = _save_hub_dir(reference, model_cfg, tmp_path / case)
    model = imagefm.load(directory)
    assert not model.config.text.use_padding_mask
    _assert_parity(model, reference)
    assert model.card.mean == (0.5, 0.5, 0.5) and model.card.image_size == SIZE


@pytest.fixture
def fake_model_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model_configs/ directory holding a tiny config under a real architecture name."""
    configs = tmp_path / "model_configs"
    configs.mkdir()
    (configs / "ViT-B-32.json").write_text(json.dumps(_model_cfg()))
    monkeypatch.setattr(oc, "model_configs_dir", lambda: configs)
    return configs


@pytest.mark.parametrize(("arch", "quick_gelu", "suffix"), [
    ("ViT-B-32", False, ".safetensors"),
    ("ViT-B-32-quickgelu", True, ".pt"),  # no file of its own: ViT-B-32 + QuickGELU
])
def test_bare_state_dict_with_arch_name(tmp_path: Path, fake_model_configs: Path, arch: str,
                                        quick_gelu: bool, suffix: str) -> None:
    reference = _reference(_model_cfg(quick_gelu=quick_gelu))
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if suffix == ".pt":  # a training checkpoint: {"state_dict": ...} with DDP's module. prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file(state, str(path))
    model = imagefm.load(path, arch=arch)
    assert model.config.vision.act == ("quick_gelu" if quick_gelu else "gelu")
    _assert_parity(model, reference)
    with pytest.raises(CheckpointError, match="arch="):
        imagefm.load(path)


def test_state_dict_from_wrong_arch_fails_strictly(tmp_path: Path,
                                                   fake_model_configs: Path) -> None:
    reference = _reference(_model_cfg(vision={"layers": 3}))
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="visual.transformer.resblocks.2"):
        imagefm.load(path, arch="ViT-B-32")


def test_real_architecture_configs_are_read_without_importing_open_clip() -> None:
    code = ("import sys, imagefm.convert.open_clip as oc\n"
            "c = oc.config_from_open_clip(oc.arch_config('ViT-B-32-quickgelu'))\n"
            "v = c.vision\n"
            "assert (v.width, v.patch_size, v.act) == (768, 32, 'quick_gelu')\n"
            "assert 'open_clip' not in sys.modules, 'open_clip was imported'\n")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {"PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("arch", "message"), [
    ("convnext_base_w", "timm"),  # timm SigLIP ViTs load: tests/test_parity_open_clip_timm.py
    ("coca_ViT-B-32", "CoCa"),
    ("RN50", "ModifiedResNet"),
    # Hugging Face text towers load given their config.json: test_parity_open_clip_hf_text.py
])
def test_unsupported_architectures_are_refused_clearly(arch: str, message: str) -> None:
    with pytest.raises(UnsupportedOpenClipConfig, match=message):
        oc.config_from_open_clip(oc.arch_config(arch))


def test_unsupported_fields_are_named() -> None:
    with pytest.raises(UnsupportedOpenClipConfig, match="ls_init_value"):
        oc.config_from_open_clip(_model_cfg(vision={"ls_init_value": 0.0}))
    with pytest.raises(UnsupportedOpenClipConfig, match="final_ln_after_pool"):
        oc.config_from_open_clip(_model_cfg(vision={"pool_type": "avg",
                                                    "final_ln_after_pool": True}))
    with pytest.raises(UnsupportedOpenClipConfig, match="made_up"):
        oc.config_from_open_clip(_model_cfg(text={"made_up": 1}))
    with pytest.raises(CheckpointError, match="unknown open_clip architecture"):
        oc.arch_config("ViT-Nope-99")


def test_processor_follows_preprocess_cfg_and_open_clip_tokenizer(tmp_path: Path) -> None:
    model_cfg = _model_cfg()
    directory = _save_hub_dir(_reference(model_cfg), model_cfg, tmp_path,
                              {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                               "interpolation": "bilinear", "resize_mode": "squash"})
    processor = imagefm.load_processor(directory)
    card = processor.card
    assert (card.image_size, card.resize_mode, card.interpolation) == (SIZE, "squash",
                                                                       "bilinear")
    assert card.mean == (0.1, 0.2, 0.3)
    texts = ["a photo of a cat", "two dogs!"]
    reference = open_clip.get_tokenizer("ViT-B-32", context_length=LENGTH)(texts)
    assert torch.equal(processor.tokenizer(texts)["input_ids"], reference)


def test_export_open_clip_round_trip(tmp_path: Path) -> None:
    model_cfg = _model_cfg(quick_gelu=True, vision={"pool_type": "avg"})
    original = _reference(model_cfg)
    ours = imagefm.load(_save_hub_dir(original, model_cfg, tmp_path / "in"))
    export_open_clip(ours, tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())
    rebuilt = open_clip.CLIP(**exported["model_cfg"]).eval()
    from safetensors.torch import load_file

    rebuilt.load_state_dict(load_file(str(tmp_path / "out" / "open_clip_model.safetensors")))
    _assert_parity(ours, rebuilt)
    _assert_parity(imagefm.load(tmp_path / "out"), original)


def test_open_clip_to_hf_export_matches_open_clip(tmp_path: Path) -> None:
    """open_clip -> imagefm -> export_hf -> transformers.CLIPModel computes open_clip's logits
    (HF masks padding and open_clip does not; causal attention makes that irrelevant at EOS)."""
    transformers = pytest.importorskip("transformers")
    from imagefm.convert.hf import export_hf

    model_cfg = _model_cfg(quick_gelu=True)
    reference = _reference(model_cfg)
    export_hf(imagefm.load(_save_hub_dir(reference, model_cfg, tmp_path / "in")), tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels, ids = _inputs()
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels, attention_mask=(ids != 0).long())
        logits, _ = reference.get_logits(pixels, ids)
    assert (out.logits_per_image - logits).abs().max().item() <= TOL


def test_exports_refuse_a_letterbox_card(tmp_path: Path) -> None:
    """`pad` (letterbox on white) has no open_clip or HF processor equivalent: refused, not
    silently written as another resize."""
    import dataclasses

    from imagefm.checkpoint import CheckpointError
    from imagefm.convert.hf_card import card_to_hf

    model_cfg = _model_cfg(quick_gelu=True)
    ours = imagefm.load(_save_hub_dir(_reference(model_cfg), model_cfg, tmp_path / "in"))
    ours.card = dataclasses.replace(ours.card, resize_mode="pad")
    with pytest.raises(CheckpointError, match="'pad' has no open_clip equivalent"):
        export_open_clip(ours, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no HF image processor equivalent"):
        card_to_hf(ours.card)
