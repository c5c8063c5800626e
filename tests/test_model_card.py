"""Model cards: the Hub's YAML header read back with yaml.safe_load, the body's facts taken from
the model itself (parameter count, towers, preprocessing), writing README.md atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import imagefm
from imagefm.checkpoint import write_model_card
from imagefm.config import VisionConfig
from imagefm.model_card import model_card, model_kind, parameter_count
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.dual_encoder import DualEncoder
from imagefm.models.vlm import VLM, VLMConfig

TINY_LM = DecoderConfig(vocab_size=96, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64,
                        context_length=64)


def _split(card: str) -> tuple[dict, str]:
    """The YAML header (parsed) and the Markdown body."""
    assert card.startswith("---\n")
    header, sep, body = card[4:].partition("\n---\n")
    assert sep, "no closing --- after the metadata header"
    return yaml.safe_load(header), body


def _rows(body: str) -> dict[str, str]:
    """The | field | value | rows of the body's Model table."""
    rows = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_dual_encoder_card_header_and_body() -> None:
    model = DualEncoder(imagefm.preset("tiny"))
    card = model_card(model, license="apache-2.0", languages=["en", "ko"],
                      training_data=["synthetic scenes (imagefm synth)", "org/captions-ko"],
                      base_model="openai/clip-vit-base-patch32", name="me/tiny-clip")
    meta, body = _split(card)
    assert meta == {"library_name": "imagefm", "license": "apache-2.0", "language": ["en", "ko"],
                    "tags": ["imagefm", "clip", "dual-encoder"],
                    "pipeline_tag": "zero-shot-image-classification",
                    "base_model": "openai/clip-vit-base-patch32",
                    "datasets": ["org/captions-ko"]}  # the description is not a Hub dataset
    count = sum(p.numel() for p in model.parameters())
    rows = _rows(body)
    assert rows["parameters"].startswith(f"{count:,} (")
    config = model.config
    assert f"{config.vision.layers} layers × {config.vision.width} wide" in rows["image tower"]
    assert f"vocabulary {config.text.vocab_size}" in rows["text tower"]
    assert rows["embedding"].startswith(f"{config.embed_dim}-d, softmax (CLIP)")
    assert f"resize the shortest side to {model.card.image_size} px" in body
    assert 'model = imagefm.load("me/tiny-clip")' in body
    assert 'imagefm.load_processor("me/tiny-clip")' in body
    assert "- synthetic scenes (imagefm synth)" in body and "- org/captions-ko" in body
    assert "No evaluation results recorded." in body


def test_siglip_card_names_its_loss_and_tag() -> None:
    model = DualEncoder(imagefm.preset("tiny", model_type="siglip", init_logit_bias=-10.0))
    meta, body = _split(model_card(model))
    assert meta["tags"] == ["imagefm", "siglip", "dual-encoder"]
    assert "sigmoid (SigLIP) loss" in body
    assert "license" not in meta and "language" not in meta and "datasets" not in meta
    assert _rows(body)["licence"] == "not stated"


def test_decoder_card(tiny_llama_dir: Path) -> None:
    model = imagefm.load(tiny_llama_dir)
    meta, body = _split(model_card(model, license="mit", languages="ko",
                                   base_model=["a/b", "c/d"]))
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["imagefm", "llama", "decoder"]
    assert meta["language"] == ["ko"] and meta["base_model"] == ["a/b", "c/d"]
    rows = _rows(body)
    c = model.config
    assert rows["architecture"] == (f"llama decoder, {c.layers} layers × {c.width} wide, "
                                    f"{c.heads} heads ({c.kv_heads} key/value), vocabulary "
                                    f"{c.vocab_size}, context {c.context_length}")
    assert rows["parameters"].startswith(f"{sum(p.numel() for p in model.parameters()):,} (")
    assert f"vocabulary {model.tokenizer.vocab_size}" in body  # the tokenizer is described
    assert "tokenizer = model.tokenizer" in body and "load_processor" not in body


def test_vlm_card() -> None:
    tower = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64,
                         act="gelu")
    model = VLM(VLMConfig(vision=tower, lm=TINY_LM, image_token_id=5))
    meta, body = _split(model_card(model))
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["tags"] == ["imagefm", "vision-language", "llama"]
    rows = _rows(body)
    assert rows["projector"] == "mlp2x_gelu"
    assert rows["language model"].startswith("llama decoder, 2 layers × 32 wide")
    assert model_kind(model) == "vlm"


def test_qwen_vl_card_uses_its_own_type_and_image_settings() -> None:
    from imagefm.models.qwen2_vl_vision import QwenVisionConfig
    from imagefm.models.qwen_vl import QwenVL, QwenVLConfig

    lm = DecoderConfig(model_type="qwen2", vocab_size=64, width=32, layers=1, heads=4,
                       kv_heads=2, mlp_dim=64, qkv_bias=True, mrope_section=(2, 1, 1))
    vision = QwenVisionConfig(width=32, layers=1, heads=2, mlp_dim=64, out_width=32,
                              patch_size=4)
    model = QwenVL(QwenVLConfig(vision=vision, lm=lm, image_token_id=10, video_token_id=11,
                                vision_start_token_id=12, vision_end_token_id=13))
    meta, body = _split(model_card(model))
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["tags"] == ["imagefm", "vision-language", "qwen2_vl", "qwen2"]
    assert f"max_pixels {model.config.image.max_pixels}" in body  # no ImageCard: its own sizing
    assert _rows(body)["parameters"].startswith(f"{sum(p.numel() for p in model.parameters()):,}")


def test_quantised_layers_count_their_weights_once() -> None:
    from imagefm.models.quantized import quantize_model

    model = DecoderLM(TINY_LM)
    floats = sum(p.numel() for p in model.parameters())
    quantize_model(model)  # Q8_0: weights become int8 blocks held as buffers
    assert sum(p.numel() for p in model.parameters()) < floats
    count, note = parameter_count(model)
    assert count == floats and "8-bit blocks" in note
    meta, body = _split(model_card(model))
    assert "quantized" in meta["tags"] and f"{floats:,}" in body


def test_eval_results_tables() -> None:
    model = DualEncoder(imagefm.preset("tiny"))
    _, body = _split(model_card(model, eval_results={"zero-shot top-1 (ko)": 0.61234,
                                                     "images": 300}))
    assert "| metric | value |" in body
    assert "| zero-shot top-1 (ko) | 0.6123 |" in body and "| images | 300 |" in body
    results = [{"task": "classification", "name": "colour", "lang": "ko", "top1": 0.5,
                "per_class": [0.1, 0.9]},
               {"task": "retrieval", "name": "tuxpaint", "lang": "en",
                "image_to_text": {"R@1": 0.25}}]
    _, body = _split(model_card(model, eval_results=results))
    assert "| task | name | lang | top1 | image_to_text.R@1 |" in body  # lists left out
    assert "| classification | colour | ko | 0.5 |  |" in body
    assert "| retrieval | tuxpaint | en |  | 0.25 |" in body


def test_write_model_card_is_atomic_and_named_after_the_directory(tmp_path: Path) -> None:
    model = DualEncoder(imagefm.preset("tiny"))
    out = tmp_path / "한국어-clip"
    path = write_model_card(model, out, license="apache-2.0")
    assert path == out / "README.md"
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # no temporary left behind
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n") and "# 한국어-clip" in text
    assert _split(text)[0]["license"] == "apache-2.0"


def test_what_cannot_be_described_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot write a model card for a Linear"):
        model_card(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="languages must be"):
        model_card(DualEncoder(imagefm.preset("tiny")), languages=["en", 3])


def test_save_pretrained_writes_a_card_but_keeps_the_users(tmp_path: Path) -> None:
    model = DualEncoder(imagefm.preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    header, _ = _split((tmp_path / "m" / "README.md").read_text(encoding="utf-8"))
    assert header["library_name"] == "imagefm"
    assert header["pipeline_tag"] == "zero-shot-image-classification"
    (tmp_path / "m" / "README.md").write_text("# my notes\n")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == "# my notes\n"
