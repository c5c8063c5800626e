"""Inference cuts the padding columns a text tower cannot see (CLIP's causal towers, masked
encoders) and keeps them where it can (SigLIP pools the last position): same embeddings, fewer
positions computed."""

from __future__ import annotations

import pytest
import torch

from imagefm.apps.zeroshot import encode_tokens
from imagefm.config import BertConfig, DualEncoderConfig, TextConfig, VisionConfig
from imagefm.convert.towers import build_dual_encoder
from imagefm.train.local import LOCAL_TOWERS

VISION = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64)
TEXT = dict(vocab_size=64, context_length=12, width=32, layers=2, heads=2, mlp_dim=64)
TOWERS = {
    "clip (causal, argmax)": TextConfig(**TEXT),
    "causal, eos": TextConfig(**TEXT, pool="eos", eos_token_id=63),
    "bidirectional, masked, first": TextConfig(**TEXT, causal=False, pool="first"),
    "bert (masked mean)": BertConfig(**LOCAL_TOWERS["bert"]),
}


def model_with(text) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dual_encoder(DualEncoderConfig("clip", VISION, text, embed_dim=16)).eval()


def padded_batch(lengths: list[int], width: int = 12, pad_id: int = 0, eos_id: int = 63
                 ) -> dict[str, torch.Tensor]:
    """Right-padded rows of random tokens ending in EOS, as the tokenizer pads to max_length."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.full((len(lengths), width), pad_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, :n - 1] = torch.randint(1, 60, (n - 1,), generator=generator)
        input_ids[row, n - 1] = eos_id
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def columns_seen(model) -> list[int]:
    """The widths of the token batches the text tower gets from now on."""
    seen: list[int] = []
    model.text.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    return seen


def full_length(model, batch) -> torch.Tensor:
    with torch.no_grad():
        embeds = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return torch.nn.functional.normalize(embeds, dim=-1)


@pytest.mark.parametrize("name", list(TOWERS))
def test_padding_only_columns_are_cut_and_change_nothing(name):
    model = model_with(TOWERS[name])
    batch = padded_batch([3, 5, 4])
    expected = full_length(model, batch)
    seen = columns_seen(model)
    got = encode_tokens(model, batch)
    assert seen == [5]  # the longest row, not the context of 12
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_siglip_pools_the_last_position_so_nothing_is_cut():
    model = model_with(TextConfig(**TEXT, causal=False, pool="last", use_padding_mask=False))
    batch = padded_batch([3, 5, 4], pad_id=63)  # SigLIP pads with </s>
    expected = full_length(model, batch)
    seen = columns_seen(model)
    torch.testing.assert_close(encode_tokens(model, batch), expected)
    assert seen == [12]


def test_left_padding_and_pad_ids_above_eos_are_safe():
    model = model_with(TextConfig(**TEXT))
    left = {key: value.flip(1) for key, value in padded_batch([3, 5]).items()}
    # Argmax pooling with a pad id above every text id pools a padding column: keep them all.
    high_pad = padded_batch([3, 5], pad_id=63, eos_id=62)
    expected = full_length(model, high_pad)
    seen = columns_seen(model)
    encode_tokens(model, left)  # no trailing column is padding in every row: nothing to cut
    torch.testing.assert_close(encode_tokens(model, high_pad), expected)
    assert seen == [12, 12]
