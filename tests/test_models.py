from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import imagefm
from imagefm.config import ConfigError, DualEncoderConfig, VisionConfig, from_dict
from imagefm.models.dual_encoder import DualEncoder
from imagefm.models.layers import Attention, make_attention_mask


def test_attention_matches_explicit_softmax() -> None:
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = make_attention_mask(5, padding, causal=True)
    q = attn.q_proj(x).view(2, 5, 4, 4).transpose(1, 2)
    k = attn.k_proj(x).view(2, 5, 4, 4).transpose(1, 2)
    v = attn.v_proj(x).view(2, 5, 4, 4).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / 2.0
    scores = scores.masked_fill(~mask, float("-inf"))
    expected = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, mask), expected, atol=1e-6, rtol=1e-5)


def test_causal_mask_blocks_future_tokens() -> None:
    model = DualEncoder(imagefm.preset("tiny")).eval()
    ids = torch.randint(1, 100, (1, 10))
    changed = ids.clone()
    changed[0, 7:] = 5
    a = model.text.forward_tokens(ids)
    b = model.text.forward_tokens(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_argmax_pooling_ignores_padding_after_eos() -> None:
    model = DualEncoder(imagefm.preset("tiny")).eval()
    ids = torch.tensor([[1, 20, 30, 4000, 0, 0, 0]])
    other_pad = torch.tensor([[1, 20, 30, 4000, 7, 7, 7]])
    torch.testing.assert_close(model.encode_text(ids), model.encode_text(other_pad))


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
def test_forward_shapes_and_logits(name: str) -> None:
    model = DualEncoder(imagefm.preset(name)).eval()
    pixels = torch.randn(3, 3, 64, 64)
    ids = torch.randint(0, 4096, (2, 32))
    out = model(pixel_values=pixels, input_ids=ids)
    assert out.logits_per_image.shape == (3, 2)
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(ids), dim=-1)
    expected = model.logit_scale.exp() * img @ txt.t()
    if model.logit_bias is not None:
        expected = expected + model.logit_bias
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.t())


def test_position_interpolation_to_other_sizes() -> None:
    model = DualEncoder(imagefm.preset("tiny")).eval()
    assert model.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 128)
    assert model.encode_image(torch.randn(1, 3, 64, 96)).shape == (1, 128)
    # At the native size the stored embeddings are used unchanged.
    grid = model.vision.config.grid_size
    torch.testing.assert_close(model.vision.position_embeddings((grid, grid)),
                               model.vision.pos_embed)


@pytest.mark.parametrize("pool", ["cls", "mean", "map"])
def test_vision_pooling_variants(pool: str) -> None:
    cfg = dataclasses.replace(imagefm.preset("tiny").vision, pool=pool)
    model = DualEncoder(imagefm.preset("tiny", vision=cfg)).eval()
    tokens = model.vision.forward_tokens(torch.randn(2, 3, 64, 64))
    pooled = model.vision(torch.randn(2, 3, 64, 64))
    assert pooled.shape == (2, 128)
    if pool == "mean":
        torch.testing.assert_close(model.vision.pool(tokens), tokens[:, 1:].mean(1))


def test_gradient_checkpointing_gives_same_gradients() -> None:
    model = DualEncoder(imagefm.preset("tiny"))
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(0, 4096, (2, 32))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(pixels, ids).logits_per_image.sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(True)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = imagefm.preset("siglip-tiny")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert DualEncoderConfig.from_dict(data) == cfg
    data["vision"]["patchsize"] = 8
    with pytest.raises(ConfigError, match="patchsize"):
        DualEncoderConfig.from_dict(data)


@pytest.mark.parametrize("bad, match", [
    (dict(act="swish"), "vision.act"),
    (dict(width=130, heads=4), "divisible"),
    (dict(image_size=4, patch_size=8), "at least"),
    (dict(pool="cls", class_token=False), "class_token"),
])
def test_bad_vision_config_is_refused(bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(VisionConfig, bad)


def test_presets_have_published_shapes() -> None:
    b16 = imagefm.preset("clip-vit-b-16")
    with torch.device("meta"):
        model = DualEncoder(b16)
    # OpenAI CLIP ViT-B/16 has 149.6 M parameters.
    assert abs(model.num_parameters - 149_620_737) < 1_000
    with pytest.raises(ConfigError, match="unknown preset"):
        imagefm.preset("vit-huge-typo")


def test_conv_stem_replaces_patch_embedding() -> None:
    vision = dataclasses.replace(imagefm.preset("tiny").vision, stem="conv")
    model = DualEncoder(imagefm.preset("tiny", vision=vision)).eval()
    tokens = model.vision.forward_tokens(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 1 + 8 * 8, 128)  # same grid as the 8-pixel patches
    # Three stride-2 stages reach the 8-pixel grid; the first sees only a 3x3 neighbourhood.
    strides = [m.stride[0] for m in model.vision.patch_embed.modules()
               if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 1]
    with pytest.raises(ConfigError, match="power-of-two"):
        dataclasses.replace(vision, patch_size=12)


def test_argmax_pooling_refuses_a_tokenizer_whose_eos_is_not_the_largest_id() -> None:
    # A trained BPE puts its specials first (EOS = 1): argmax pooling would read the output at
    # whichever word has the largest id and, under the causal mask, never see what follows it.
    from imagefm.tokenizer import train_bpe

    tokenizer = train_bpe(["a red star", "a blue circle", "빨간 별"] * 20, 300, context_length=16)
    assert tokenizer.eos_id != tokenizer.vocab_size - 1
    base = imagefm.preset("tiny")
    text = dataclasses.replace(base.text, vocab_size=tokenizer.vocab_size, context_length=16)
    model = DualEncoder(dataclasses.replace(base, text=text))
    with pytest.raises(ConfigError, match=rf"text.pool = 'eos'.*eos_token_id = {tokenizer.eos_id}"):
        model.tokenizer = tokenizer
    eos_text = dataclasses.replace(text, pool="eos", eos_token_id=tokenizer.eos_id)
    model = DualEncoder(dataclasses.replace(base, text=eos_text))
    model.tokenizer = tokenizer
    # EOS pooling reads the EOS position: changing the last word changes the embedding
    enc = tokenizer(["a red star", "a red circle"])
    tokens = model.text.forward_tokens(enc["input_ids"], enc["attention_mask"])
    eos_at = (enc["input_ids"] == tokenizer.eos_id).int().argmax(-1)
    pooled = model.text.pool(tokens, enc["input_ids"])
    torch.testing.assert_close(pooled, tokens[torch.arange(2), eos_at])


@pytest.mark.parametrize("kind", ["none", "causal", "mask", "causal+mask"])
def test_cpu_training_attention_path_equals_sdpa(kind: str) -> None:
    # Short sequences train through matmul-softmax-matmul on the CPU (faster there): values and
    # gradients must equal the fused kernel's.
    from imagefm.models.layers import attend

    q, k, v = (torch.randn(3, 2, 7, 8, requires_grad=True) for _ in range(3))
    padding = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])
    mask = make_attention_mask(7, padding) if "mask" in kind else None
    if mask is not None:
        assert mask.dtype == torch.bool and not mask.all()
    ours = attend(q, k, v, mask, is_causal="causal" in kind)
    grads = torch.autograd.grad(ours.sum(), (q, k, v))
    # SDPA takes a mask or is_causal, not both: give it the two combined.
    if kind == "causal+mask":
        reference = F.scaled_dot_product_attention(
            q, k, v, attn_mask=make_attention_mask(7, padding, causal=True))
    else:
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                   is_causal=kind == "causal")
    expected = torch.autograd.grad(reference.sum(), (q, k, v))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
