"""Parity with Hugging Face VisionTextDualEncoderModel (CLIP / SigLIP vision, BERT / RoBERTa /
XLM-RoBERTa text): tiny random reference models with odd shapes built here, saved with
save_pretrained next to tokenizers trained here with `tokenizers` (English and Korean), loaded
with imagefm.convert.vision_text; embeddings, logits and token ids equal the reference's.

Every reference parameter is perturbed before saving (HF initialises LayerNorms to exactly 1/0 and
biases to 0, which would hide a swapped norm or a dropped bias).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_text_fixtures import (  # noqa: E402  (tests/hf_text_fixtures.py)
    TEXTS,
    perturb,
    text_config,
    tokenizer_dir,
    wordpiece_dir,
)

import imagefm  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.keymap import KeyMapError  # noqa: E402
from imagefm.convert.vision_text import (  # noqa: E402
    is_vision_text_config,
    load_vision_text,
    load_vision_text_processor,
)

TOL = 1e-5
SIZE, PATCH = 30, 6  # a 5x5 grid


def _vision_config(vision: str):
    common = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=2, image_size=SIZE, patch_size=PATCH)
    if vision == "clip":
        return transformers.CLIPVisionConfig(**common, hidden_act="quick_gelu")
    return transformers.SiglipVisionConfig(**common)


def _reference(directory: Path, text_type: str, vision: str = "clip"):
    """A VisionTextDualEncoderModel directory (weights, config, tokenizer, image processor)."""
    tokenizer_dir(directory, text_type)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
        _vision_config(vision), text_config(text_type, len(tokenizer), tokenizer.pad_token_id),
        projection_dim=11)
    model = transformers.VisionTextDualEncoderModel(config).eval()
    perturb(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
    model.save_pretrained(directory)
    if vision == "clip":
        transformers.CLIPImageProcessor(size={"shortest_edge": SIZE},
                                        crop_size={"height": SIZE, "width": SIZE}
                                        ).save_pretrained(directory)
    else:
        transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}
                                          ).save_pretrained(directory)
    return model, tokenizer


def _pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOL) -> None:
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)


def _assert_same_outputs(model, reference, batch: dict, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        theirs = reference(pixel_values=pixels, **batch)
        ours = model(pixels, batch["input_ids"], batch["attention_mask"])
        text = reference.get_text_features(**batch).pooler_output
        image = reference.get_image_features(pixel_values=pixels).pooler_output
        _close(model.encode_text(batch["input_ids"], batch["attention_mask"]), text)
        _close(model.encode_image(pixels), image)
    _close(ours.text_embeds, theirs.text_embeds)
    _close(ours.image_embeds, theirs.image_embeds)
    _close(ours.logits_per_image, theirs.logits_per_image, 1e-4)
    _close(ours.logits_per_text, theirs.logits_per_text, 1e-4)


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text_type", "vision"), [("bert", "clip"), ("roberta", "clip"),
                                                   ("xlm-roberta", "clip"),
                                                   ("xlm-roberta", "siglip")])
def test_vision_text_parity(tmp_path: Path, text_type: str, vision: str) -> None:
    reference, hf_tokenizer = _reference(tmp_path, text_type, vision)
    config = json.loads((tmp_path / "config.json").read_text())
    assert is_vision_text_config(config)
    model = load_vision_text(tmp_path)
    assert model.config.text.positions == ("arange" if text_type == "bert" else "roberta")

    # The tokenizer: ids and mask equal transformers' on English and Korean, padded batch.
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    ours = model.tokenizer(TEXTS)
    assert torch.equal(ours["input_ids"], batch["input_ids"])
    assert torch.equal(ours["attention_mask"], batch["attention_mask"])
    assert (batch["attention_mask"] == 0).any()  # the batch has padding

    _assert_same_outputs(model, reference, dict(batch), _pixels())


def test_roberta_positions_skip_left_padding(tmp_path: Path) -> None:
    """RoBERTa positions count non-pad tokens only, so left padding gives the same positions
    to the text as right padding: ours as the reference's, from the ids."""
    reference, hf_tokenizer = _reference(tmp_path, "xlm-roberta")
    model = load_vision_text(tmp_path)
    hf_tokenizer.padding_side = "left"
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"][:, 0].eq(0).any()
    with torch.no_grad():
        theirs = reference.get_text_features(**batch).pooler_output
        _close(model.encode_text(batch["input_ids"], batch["attention_mask"]), theirs)


def test_transformers_4_layout(tmp_path: Path) -> None:
    """transformers 4.x saved the vision tower as vision_model.vision_model.* (its CLIPVisionModel
    wrapped a CLIPVisionTransformer); both layouts load to the same model."""
    from safetensors.torch import load_file, save_file

    reference, hf_tokenizer = _reference(tmp_path, "bert")
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    save_file({("vision_model." + k if k.startswith("vision_model.") else k): v
               for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    batch = dict(hf_tokenizer(TEXTS, padding=True, return_tensors="pt"))
    _assert_same_outputs(load_vision_text(tmp_path), reference, batch, _pixels())


def test_save_and_reload_in_imagefm_format(tmp_path: Path) -> None:
    reference, hf_tokenizer = _reference(tmp_path / "hf", "xlm-roberta")
    model = load_vision_text(tmp_path / "hf")
    model.save_pretrained(tmp_path / "ours")
    reloaded = imagefm.load(tmp_path / "ours")
    assert reloaded.config == model.config
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    ours = reloaded.tokenizer(TEXTS)
    assert torch.equal(ours["input_ids"], batch["input_ids"])
    _assert_same_outputs(reloaded, reference, dict(batch), _pixels())


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_tokenizer_parity_en_ko(tmp_path: Path, lowercase: bool) -> None:
    """Uncased BERT strips accents through NFD (Hangul becomes jamo); cased keeps syllables.
    transformers takes do_lower_case from tokenizer_config.json, and so do we."""
    from imagefm.convert.hf_text import bert_family_tokenizer

    wordpiece_dir(tmp_path, lowercase)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = bert_family_tokenizer(tmp_path)
    texts = [*TEXTS, "Naïve CAFÉ 고양이", "소파에서 자는 고양이 두 마리"]
    batch = theirs(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours(texts)["input_ids"], batch["input_ids"])
    assert torch.equal(ours(texts)["attention_mask"], batch["attention_mask"])
    assert ours.context_length == 24  # model_max_length
    long = ["고양이 " * 40]  # truncated as transformers truncates: [CLS] ... [SEP]
    assert ours(long)["input_ids"].tolist() == theirs(long, truncation=True)["input_ids"]


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_processor(tmp_path: Path, vision: str) -> None:
    """Images as the directory's image processor (PIL backend) prepares them, odd sizes; texts
    as its tokenizer."""
    import numpy as np
    from PIL import Image

    _, hf_tokenizer = _reference(tmp_path, "xlm-roberta", vision)
    processor = load_vision_text_processor(tmp_path)
    card = processor.card
    assert card.image_size == SIZE
    assert card.resize_mode == ("shortest" if vision == "clip" else "squash")
    name = "CLIP" if vision == "clip" else "Siglip"
    settings = json.loads((tmp_path / "preprocessor_config.json").read_text())
    settings = {k: v for k, v in settings.items() if k not in ("image_processor_type",
                                                               "processor_class")}
    reference = getattr(transformers, f"{name}ImageProcessorPil",
                        getattr(transformers, f"{name}ImageProcessor"))(**settings)
    rng = np.random.default_rng(0)
    for width, height in ((47, 33), (31, 64)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = reference(image, return_tensors="pt")["pixel_values"]
        _close(processor(images=[image])["pixel_values"], expected)
    batch = processor(texts=TEXTS)
    assert torch.equal(batch["input_ids"], hf_tokenizer(TEXTS, padding=True,
                                                        return_tensors="pt")["input_ids"])


def test_refusals(tmp_path: Path) -> None:
    _reference(tmp_path, "bert")
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())

    vit = {**config, "vision_config": {**config["vision_config"], "model_type": "vit"}}
    config_path.write_text(json.dumps(vit))
    with pytest.raises(CheckpointError, match="vision_config.model_type 'vit' is not supported"):
        load_vision_text(tmp_path)

    t5 = {**config, "text_config": {**config["text_config"], "model_type": "t5"}}
    config_path.write_text(json.dumps(t5))
    with pytest.raises(CheckpointError, match="text model_type 't5' is not supported"):
        load_vision_text(tmp_path)

    # A checkpoint without BERT's pooler cannot give the reference's pooled text.
    config_path.write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "pooler" not in k},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyMapError, match="text.pooler.weight"):
        load_vision_text(tmp_path)


def test_loads_by_hub_id_with_its_processor(hub, tmp_path: Path) -> None:
    reference, hf_tokenizer = _reference(tmp_path / "repo", "xlm-roberta")
    hub.add_repo("org/ko-clip", tmp_path / "repo")
    model, proc = imagefm.load("org/ko-clip", processor=True)
    texts = ["a photo of a cat", "고양이 사진"]
    batch = proc(texts=texts)
    expected = hf_tokenizer(texts, padding="max_length", max_length=batch["input_ids"].shape[1],
                            truncation=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    with torch.no_grad():
        ours = model.encode_text(batch["input_ids"], batch["attention_mask"])
        theirs = reference.get_text_features(input_ids=expected["input_ids"],
                                             attention_mask=expected["attention_mask"])
    theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
    _close(ours, theirs)
