"""Parity with Hugging Face SigLIP 2: the fixed-resolution checkpoints (a SiglipModel with Gemma's
tokenizer) and NaFlex ``Siglip2Model`` (variable resolution and aspect ratio), with their
processors. Tiny random reference models with odd shapes are built here, saved with
save_pretrained and loaded with imagefm; nothing is downloaded.

The Gemma-style tokenizer is built here too: a BPE with byte fallback over "▁"-joined text (no
pre-tokenizer), Gemma's special tokens first and the 256 byte tokens after them, so Korean and
emoji the vocabulary lacks fall back to bytes as they do with the real Gemma vocabulary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import imagefm  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.hf import export_hf, load_hf, load_hf_processor  # noqa: E402
from imagefm.convert.siglip2 import load_siglip2, load_siglip2_processor  # noqa: E402
from imagefm.data.naflex import naflex_size  # noqa: E402
from imagefm.tokenizer import Tokenizer  # noqa: E402

TOL = 1e-5
LENGTH = 64  # SigLIP 2's text length: the tokenizer pads every text to it
PATCH = 4
GRID = 7  # NaFlex position table: 7 x 7 = 49 entries
MAX_PATCHES = 40  # the processor's budget: fewer than the table, so the grid is resized both ways
# (width, height): tall, wide and square images; none a multiple of the patch size.
SIZES = [(37, 201), (300, 97), (64, 64)]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
TEXTS = ["A Photo of a CAT", "a photo of two dogs running", "고양이 사진",
         "강아지 두 마리가 달린다 🐶", "",
         "Xyzzy plugh, quoth the Raven " * 8]  # the last one is longer than 64 tokens


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import AddedToken, decoders, models, normalizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    corpus = ["a photo of a cat", "A Photo of Two Dogs running", "the quick brown fox",
              "고양이 사진", "강아지 두 마리"] * 20
    trainer = HFTokenizer(models.BPE(unk_token="<unk>"))
    trainer.normalizer = normalizers.Replace(" ", "▁")
    trainer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=150, limit_alphabet=45, show_progress=False))
    learned = json.loads(trainer.to_str())["model"]
    vocab = {token: index for index, token in enumerate(GEMMA_SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    gemma = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                   byte_fallback=True))
    gemma.normalizer = normalizers.Replace(" ", "▁")
    gemma.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    gemma.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t in GEMMA_SPECIALS])
    path = tmp_path_factory.mktemp("gemma") / "tokenizer.json"
    gemma.save(str(path))
    return path


def _save_gemma_tokenizer(tokenizer_json: Path, directory: Path) -> None:
    """The tokenizer files of a SigLIP 2 checkpoint, written as transformers' SigLIP 2 converter
    writes them: GemmaTokenizer, no BOS, EOS appended, right padding, input_ids only."""
    transformers.GemmaTokenizer(
        tokenizer_file=str(tokenizer_json), add_bos_token=False, add_eos_token=True,
        padding_side="right", model_max_length=LENGTH, model_input_names=["input_ids"],
    ).save_pretrained(directory)


def _vocab_size(tokenizer_json: Path) -> int:
    return len(json.loads(tokenizer_json.read_text())["model"]["vocab"])


def _tower(**kw) -> dict:
    """Odd shapes: 48 wide, 3 heads of 16, an MLP of 80, 2 layers."""
    return dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                **kw)


def _text_config(vocab: int) -> dict:
    return _tower(vocab_size=vocab, max_position_embeddings=LENGTH, pad_token_id=0,
                  bos_token_id=2, eos_token_id=1)


def _perturb_and_save(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Every parameter moved off its initial value (HF initialises LayerNorms to exactly 1/0,
    which would hide a swapped norm), a distinct temperature and bias, then saved."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        model.logit_scale.fill_(math.log(9.0))
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(directory)
    return model.eval()


def _naflex_reference(directory: Path, tokenizer_json: Path,
                      use_head: bool = True) -> transformers.Siglip2Model:
    config = transformers.Siglip2Config(
        text_config=_text_config(_vocab_size(tokenizer_json)),
        vision_config=_tower(patch_size=PATCH, num_patches=GRID * GRID, vision_use_head=use_head))
    model = _perturb_and_save(transformers.Siglip2Model(config), directory)
    transformers.Siglip2ImageProcessorPil(patch_size=PATCH,
                                          max_num_patches=MAX_PATCHES).save_pretrained(directory)
    _save_gemma_tokenizer(tokenizer_json, directory)
    return model


def _images(sizes=SIZES) -> list[Image.Image]:
    """Smooth gradients (where resampling filters differ most in rounding) plus noise."""
    rng = np.random.default_rng(0)
    images = []
    for width, height in sizes:
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin((x + y) / 9)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOL) -> None:
    diff = (ours.float() - theirs.float()).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"


def _reference_tokens(directory: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """transformers' SigLIP 2 text rule (Siglip2Tokenizer: Gemma + lower-case), called as
    Siglip2Processor calls it, with the attention mask asked for explicitly (the saved
    tokenizer returns input_ids only, as the published ones do)."""
    reference = transformers.Siglip2Tokenizer.from_pretrained(directory)
    return dict(reference(texts, padding="max_length", max_length=LENGTH, truncation=True,
                          return_attention_mask=True, return_tensors="pt"))


# --- tokenizer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["siglip", "siglip2"])
def test_gemma_tokenizer_matches_transformers(tmp_path: Path, gemma_tokenizer_json: Path,
                                              model_type: str) -> None:
    """Fixed-resolution (``siglip``) and NaFlex (``siglip2``) directories: the same ids and mask
    as transformers, English and Korean, byte fallback, the empty text, truncation to 64."""
    _save_gemma_tokenizer(gemma_tokenizer_json, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    ours = Tokenizer.from_hf_dir(tmp_path)
    got, expected = ours(TEXTS), _reference_tokens(tmp_path, TEXTS)
    assert got["input_ids"].shape == (len(TEXTS), LENGTH)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"].long())

    eos, pad = ours.token_to_id("<eos>"), ours.token_to_id("<pad>")
    assert ours.eos_id == eos and ours.pad_id == pad and ours.bos_id is None
    assert got["input_ids"][-1, -1] == eos  # truncated, EOS kept last
    assert got["input_ids"][4, 0] == eos and got["attention_mask"][4].sum() == 1  # empty text
    korean = ours.pieces(TEXTS[3])
    assert any(ours.id_to_token(i).startswith("<0x") for i in korean)  # byte fallback was used
    # Lower-casing is what this checks: without it the first text would get other ids.
    plain = transformers.GemmaTokenizer.from_pretrained(tmp_path)
    assert plain(TEXTS[0])["input_ids"] != ours.encode(TEXTS[0])
    if model_type == "siglip2":  # transformers' AutoTokenizer agrees for NaFlex directories
        auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
        assert auto(TEXTS, padding="max_length", max_length=LENGTH,
                    truncation=True)["input_ids"] == got["input_ids"].tolist()


# --- fixed resolution: SiglipModel + Gemma tokenizer ---------------------------------------------

def test_fixed_resolution_siglip2_parity(tmp_path: Path, gemma_tokenizer_json: Path) -> None:
    size = PATCH * GRID + 2  # 30 px: the remainder of the patch grid is dropped, as HF does
    config = transformers.SiglipConfig(
        text_config=_text_config(_vocab_size(gemma_tokenizer_json)),
        vision_config=_tower(image_size=size, patch_size=PATCH))
    reference = _perturb_and_save(transformers.SiglipModel(config), tmp_path)
    transformers.SiglipImageProcessorPil(size={"height": size, "width": size},
                                         resample=2).save_pretrained(tmp_path)
    _save_gemma_tokenizer(gemma_tokenizer_json, tmp_path)

    model, processor = load_hf(tmp_path), load_hf_processor(tmp_path)
    images = _images()
    batch = processor(images=images, texts=TEXTS)
    hf_pixels = transformers.SiglipImageProcessorPil.from_pretrained(tmp_path)(
        images, return_tensors="pt")["pixel_values"]
    _close(batch["pixel_values"], hf_pixels, 0.0)
    hf_text = _reference_tokens(tmp_path, TEXTS)
    assert torch.equal(batch["input_ids"], hf_text["input_ids"])
    with torch.no_grad():
        # SigLIP runs text without a mask (as trained; HF's processor returns none): ours
        # ignores the one our processor returns.
        ref = reference(pixel_values=hf_pixels, input_ids=hf_text["input_ids"])
        out = model(**batch)
    _close(out.image_embeds, ref.image_embeds)
    _close(out.text_embeds, ref.text_embeds)
    _close(out.logits_per_image, ref.logits_per_image)

    # Exported back, the tokenizer is a Gemma one transformers reads with the same rule.
    export_hf(model, tmp_path / "export")
    assert torch.equal(_reference_tokens(tmp_path / "export", TEXTS)["input_ids"],
                       batch["input_ids"])


# --- NaFlex: the image processor -----------------------------------------------------------------

def test_naflex_size_matches_transformers() -> None:
    from transformers.models.siglip2.image_processing_siglip2 import (
        get_image_size_for_max_num_patches,
    )

    rng = np.random.default_rng(1)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 2000, 2))
        patch, budget = int(rng.choice([4, 14, 16])), int(rng.integers(1, 1100))
        assert naflex_size(height, width, patch, budget) == get_image_size_for_max_num_patches(
            height, width, patch, budget)


def _check_naflex_inputs(ours: dict, theirs: dict, pixel_tol: float) -> None:
    assert set(ours) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
    assert torch.equal(ours["spatial_shapes"], theirs["spatial_shapes"])
    assert torch.equal(ours["pixel_attention_mask"], theirs["pixel_attention_mask"])
    _close(ours["pixel_values"], theirs["pixel_values"], pixel_tol)


# One grey level after rescaling and normalising with std 0.5: (1 / 255) / 0.5.
GREY_LEVEL = 2 / 255


def test_naflex_processor_matches_transformers(tmp_path: Path, gemma_tokenizer_json: Path) -> None:
    """Odd sizes and aspect ratios in one batch, the budget overridden per call, against both
    transformers backends: PIL (Siglip2ImageProcessorPil) bit for bit; torchvision (what
    AutoProcessor picks) within one grey level, since its antialiased 8-bit resize rounds a few
    pixels differently from PIL's."""
    _naflex_reference(tmp_path, gemma_tokenizer_json)
    processor = load_siglip2_processor(tmp_path)
    images = _images()
    pil = transformers.Siglip2ImageProcessorPil.from_pretrained(tmp_path)
    torchvision = transformers.Siglip2ImageProcessor.from_pretrained(tmp_path)
    for budget in (None, 97):
        kw = {} if budget is None else {"max_num_patches": budget}
        ours = processor(images=images) if budget is None else processor.image_processor(
            images, max_num_patches=budget)
        _check_naflex_inputs(ours, dict(pil(images, return_tensors="pt", **kw)), 0.0)
        fast = dict(torchvision(images, return_tensors="pt", **kw))
        _check_naflex_inputs(ours, fast, GREY_LEVEL + 1e-6)
        # About 6% of the values are one level off here (smooth gradients round the most):
        # rounding, not a shifted or blurred image.
        mean_diff = (ours["pixel_values"] - fast["pixel_values"]).abs().mean().item()
        assert mean_diff < 0.1 * GREY_LEVEL
    assert processor(images=images)["spatial_shapes"].tolist() == [[13, 3], [4, 10], [6, 6]]


def test_naflex_processor_on_a_photo(tmp_path: Path, gemma_tokenizer_json: Path,
                                     shared_data: Path) -> None:
    photo = sorted((shared_data / "coco-mini" / "train2017").glob("*.jpg"))[0]
    _naflex_reference(tmp_path, gemma_tokenizer_json)
    ours = load_siglip2_processor(tmp_path)(images=[str(photo)])
    with Image.open(photo) as image:
        theirs = transformers.Siglip2ImageProcessorPil.from_pretrained(tmp_path)(
            image.convert("RGB"), return_tensors="pt")
    _check_naflex_inputs(ours, dict(theirs), 0.0)


# --- NaFlex: the model ---------------------------------------------------------------------------

def test_naflex_parity(tmp_path: Path, gemma_tokenizer_json: Path) -> None:
    """Images of three shapes padded in one batch: embeddings, logits and every output token equal
    to Siglip2Model's; with the processors' outputs end to end; padding never leaks."""
    reference = _naflex_reference(tmp_path, gemma_tokenizer_json)
    model, processor = load_siglip2(tmp_path), load_siglip2_processor(tmp_path)
    assert model.config.vision.naflex and model.card.resize_mode == "naflex"
    batch = processor(images=_images(), texts=TEXTS)
    text = _reference_tokens(tmp_path, TEXTS)
    pixels = dict(transformers.Siglip2ImageProcessorPil.from_pretrained(tmp_path)(
        _images(), return_tensors="pt"))
    with torch.no_grad():
        ref = reference(**pixels, input_ids=text["input_ids"])  # no text mask, as trained
        out = model(**batch)
        tokens = model.vision.forward_tokens(**pixels)
        ref_tokens = reference.vision_model(**pixels).last_hidden_state
        unmasked = model.encode_text(batch["input_ids"])
        ref_unmasked = reference.get_text_features(input_ids=text["input_ids"]).pooler_output
        alone = model.encode_image(**processor(images=_images()[2:]))
    _close(out.image_embeds, ref.image_embeds)
    _close(out.text_embeds, ref.text_embeds)
    _close(out.logits_per_image, ref.logits_per_image)
    _close(out.logits_per_text, ref.logits_per_text)
    _close(tokens, ref_tokens)
    _close(unmasked, ref_unmasked)  # as HF's own pipeline calls it: input_ids only
    # The square image alone (no padding) embeds as it does padded among the others.
    _close(torch.nn.functional.normalize(alone, dim=-1), out.image_embeds[2:])


def test_naflex_without_head_pools_the_real_patches(tmp_path: Path,
                                                    gemma_tokenizer_json: Path) -> None:
    """No attention-pool head: the mean over the real patches (as transformers'
    Siglip2ForImageClassification pools), never over the padding."""
    reference = _naflex_reference(tmp_path, gemma_tokenizer_json, use_head=False)
    model = load_siglip2(tmp_path)
    assert model.config.vision.pool == "mean"
    pixels = dict(load_siglip2_processor(tmp_path)(images=_images()))
    with torch.no_grad():
        hidden = reference.vision_model(**pixels).last_hidden_state
        mask = pixels["pixel_attention_mask"][..., None].float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        got = model.encode_image(**pixels)
    _close(got, expected)


def test_naflex_bfloat16(tmp_path: Path, gemma_tokenizer_json: Path) -> None:
    """Both models cast to bfloat16 agree with each other as closely as each agrees with float32
    (bf16 keeps 8 bits of mantissa: a few 1e-3 on these unit vectors)."""
    reference = _naflex_reference(tmp_path, gemma_tokenizer_json)
    model, processor = load_siglip2(tmp_path), load_siglip2_processor(tmp_path)
    batch = processor(images=_images(), texts=TEXTS)
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}  # SigLIP: no text mask
    with torch.no_grad():
        fp32 = reference(**unmasked)
        ref = reference.to(torch.bfloat16)(**unmasked)
        out = model.to(torch.bfloat16)(**batch)
    assert out.image_embeds.dtype == torch.bfloat16
    for name in ("image_embeds", "text_embeds"):
        ours, theirs, exact = getattr(out, name), getattr(ref, name), getattr(fp32, name)
        _close(ours, theirs, 2e-2)
        assert (ours.float() - exact).abs().max() <= 2 * (theirs.float() - exact).abs().max() + 1e-2
    _close(out.logits_per_image, ref.logits_per_image, 0.25)  # logits are scaled by 9


def test_naflex_round_trip_in_imagefm_format(tmp_path: Path, gemma_tokenizer_json: Path) -> None:
    _naflex_reference(tmp_path / "hf", gemma_tokenizer_json)
    model = load_siglip2(tmp_path / "hf")
    model.save_pretrained(tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / "imagefm.json").read_text())
    assert meta["config"]["vision"]["naflex"] is True
    assert meta["preprocess"]["max_num_patches"] == MAX_PATCHES

    again, processor = imagefm.load(tmp_path / "ours", processor=True)
    batch = processor(images=_images(), texts=TEXTS)
    assert torch.equal(batch["input_ids"], model.tokenizer(TEXTS)["input_ids"])
    with torch.no_grad():
        before, after = model(**batch), again(**batch)
    assert torch.equal(before.logits_per_image, after.logits_per_image)


# --- errors --------------------------------------------------------------------------------------

def test_naflex_errors(tmp_path: Path, gemma_tokenizer_json: Path) -> None:
    _naflex_reference(tmp_path, gemma_tokenizer_json)
    model = load_siglip2(tmp_path)
    batch = load_siglip2_processor(tmp_path)(images=_images())
    with pytest.raises(ValueError, match="spatial_shapes"):
        model.encode_image(batch["pixel_values"])
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_patches"] = 50
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="square"):
        load_siglip2(tmp_path)
    config["vision_config"]["num_patches"] = GRID * GRID
    (tmp_path / "config.json").write_text(json.dumps(config))
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, "patch_size": 8}))
    with pytest.raises(CheckpointError, match="patch_size 8"):
        load_siglip2_processor(tmp_path)
