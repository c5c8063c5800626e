"""Inputs the VLM parity tests share (tests/test_qwen2_vl.py, test_llava_onevision.py,
test_export_vlm.py): a tiny ChatML byte-level BPE tokenizer trained here, and test pictures
(random noise, awkward synthetic ones, real photos cut to odd shapes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def chatml_tokenizer(specials: Sequence[str]):
    """A transformers fast tokenizer (byte-level BPE, NFC, 280 entries) trained on a few English
    and Korean lines; ``specials`` whole tokens, the first of them the pad token (the others
    additional specials), ``<|im_end|>`` the EOS."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=list(specials),
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["You are a helpful assistant.", "What is in the picture?",
                                 "Describe both images.", "system user assistant",
                                 "고양이 사진입니다"] * 5, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token=specials[0],
        additional_special_tokens=list(specials[1:]))


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    """An RGB picture of uniform random pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def synthetic_images(wide: int) -> list[Image.Image]:
    """Grey, transparent, tiny and very wide (29 x ``wide``) images."""
    gradient = np.linspace(0, 255, 61 * 187).reshape(61, 187).astype(np.uint8)
    rgba = np.dstack([np.asarray(noise_image(50, 39, 5)), np.full((50, 39), 128, np.uint8)])
    return [Image.fromarray(gradient), Image.fromarray(rgba, "RGBA"), noise_image(9, 12, 6),
            noise_image(29, wide, 7)]


def photos(shared: Path) -> list[Image.Image]:
    """Real photos, whole and cut to odd sizes and aspect ratios."""
    files = sorted((shared / "coco-mini" / "train2017").glob("*.jpg"))[:3]
    pictures = [Image.open(f) for f in files]
    return [pictures[0], pictures[1].crop((13, 7, 346, 104)), pictures[2].crop((5, 0, 76, 301)),
            pictures[0].resize((17, 23))]
