"""Streamed training data for tests: synthetic scenes in shards and a tiny model that can
tokenise their captions (the `tiny` preset has no tokenizer of its own)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from imagefm.config import preset
from imagefm.data.formats import ShardWriter
from imagefm.data.synthetic import generate
from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer
from imagefm.tokenizer import train_bpe


def build_data(root: Path, image_size: int = 16) -> dict[str, Path]:
    """24 synthetic scenes in 4 shards (data/formats ShardWriter) and a `tiny`-preset model,
    shrunk, with a BPE tokenizer trained on their captions (model.init)."""
    records = list(generate("scenes", 24, seed=0, image_size=32))
    with ShardWriter(root / "shards", prefix="train", max_samples=6) as writer:
        for record in records:
            writer.write(record)
    tokenizer = train_bpe([c.text for r in records for c in r.captions], vocab_size=320,
                          context_length=16, min_frequency=1, padding="longest")
    base = preset("tiny")
    config = dataclasses.replace(
        base, embed_dim=32,
        vision=dataclasses.replace(base.vision, image_size=image_size, patch_size=8, layers=1,
                                   width=32,
                                   heads=2, mlp_dim=64),
        text=dataclasses.replace(base.text, layers=1, width=32, heads=2, mlp_dim=64))
    torch.manual_seed(0)
    model = DualEncoder(fit_text_to_tokenizer(config, tokenizer))
    model.tokenizer = tokenizer
    model.save_pretrained(root / "model")
    return {"root": root, "shards": root / "shards", "model": root / "model"}
