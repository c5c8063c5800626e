"""A Qwen2-VL-architecture VLM composed from parts: a pretrained decoder LM and a small ViT.

    lm (Llama / Qwen2 decoder) ─► + <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>
                               ─► Qwen2 decoder: zero q/k/v biases, M-RoPE sections
    vit (e.g. the quickstart's) ─► QwenVisionTower: blocks copied, patch embedding split over
                                   the two frames, learned positions dropped for 2-D rotary,
                                   merger = the ViT's final norm + a new 2x2-merge MLP
                               ─► QwenVL (exports to transformers' Qwen2VLForConditionalGeneration)

Why each step keeps the parts' function:

- A Llama decoder *is* a Qwen2 decoder whose q/k/v biases are zero, and M-RoPE on text (all
  three position rows equal) is ordinary 1-D rotary: on text alone the new LM computes exactly
  what the old one did (tests/test_qwen_vl_recipe.py). The sections split the head's frequency
  pairs in Qwen2-VL's proportions (16/24/24 of 64 pairs; 8/12/12 for SmolLM2's 32).
- Qwen2-VL embeds a patch of two frames with a Conv3d; a still image is two identical frames, so a
  2-D patch kernel halved and copied into both frames computes the same patch embedding.
- The ViT's blocks (pre-norm, q/k/v/o, fc1/fc2) have the Qwen2-VL vision block's shape. What
  cannot carry over: the learned position table (Qwen2-VL rotates q/k by row and column instead),
  the class token and CLIP's ``ln_pre`` (Qwen2-VL has neither). The transplanted tower therefore
  sees its patches without absolute positions; docs/results.md measures it against a tower with
  the same shape and random weights.
- Qwen2-VL's merger starts with a norm over the tower's output, the role of the ViT's final norm,
  which initialises it; the merger's MLP (the projector) is new.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from imagefm.config import ConfigError
from imagefm.models.decoder import DecoderLM
from imagefm.models.qwen2_vl_vision import QwenVisionConfig, QwenVisionTower
from imagefm.models.qwen_vl import QwenImageConfig, QwenVideoConfig, QwenVL, QwenVLConfig
from imagefm.models.vit import VisionTransformer

VISION_TOKENS = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                 "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
QWEN_VISION_NORM_EPS = 1e-6  # fixed in the reference's vision blocks (what the export needs)

# ChatML whose image and video parts are Qwen2-VL's placeholders (the reference's template
# without its default system prompt), so the HF export's processor renders what training saw.
QWEN_VL_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def default_mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Qwen2-VL's split of a head's frequency pairs (temporal 1/4, height and width 3/8 each)."""
    pairs = head_dim // 2
    temporal = pairs // 4
    height = (pairs - temporal) // 2
    return temporal, height, pairs - temporal - height


def qwen2_decoder(lm: DecoderLM, mrope_section: tuple[int, ...] | None = None) -> DecoderLM:
    """``lm`` (Llama or Qwen2) as the Qwen2 decoder of a Qwen2-VL: q/k/v biases (zero where it
    had none) and M-RoPE sections; tokenizer and chat template carried over."""
    old = lm.config
    if old.o_bias or old.mlp_bias or old.qk_norm or old.rope_scaling != "default":
        raise ConfigError("only a decoder without o/MLP biases, q/k norms and rotary scaling is "
                          "a Qwen2 decoder (Qwen2-VL's language model)")
    if old.attn_head_dim != old.width // old.heads:
        raise ConfigError(f"head_dim {old.attn_head_dim} != width / heads: Qwen2 cannot "
                          f"express it")
    config = dataclasses.replace(old, model_type="qwen2", qkv_bias=True, mrope_section=tuple(
        mrope_section or default_mrope_section(old.attn_head_dim)))
    with torch.device("meta"):
        new = DecoderLM(config)
    new = new.to_empty(device=lm.embed_tokens.weight.device).to(lm.embed_tokens.weight.dtype)
    state = lm.state_dict()
    missing, unexpected = new.load_state_dict(state, strict=False)
    biases = [k for k in missing if k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj")
              and k.endswith(".bias")]
    if unexpected or set(missing) != set(biases):
        raise ConfigError(f"the decoder's weights do not fit a Qwen2 decoder: missing "
                          f"{sorted(set(missing) - set(biases))[:3]}, unexpected "
                          f"{unexpected[:3]}")
    with torch.no_grad():
        for name, param in new.named_parameters():
            if name in biases:
                param.zero_()
    new.tokenizer, new.chat_template = lm.tokenizer, lm.chat_template
    return new


def qwen_vision_from_vit(vit: VisionTransformer, out_width: int, *, merge_size: int = 2,
                         transplant: bool = True, temporal_patch_size: int = 2) -> QwenVisionTower:
    """A Qwen2-VL vision tower of ``vit``'s shape; with ``transplant`` its weights (see the
    module docstring), else random (the from-scratch control)."""
    c = vit.config
    if c.stem != "patch" or c.naflex or c.patch_bias or c.mlp_dim % c.width:
        raise ConfigError("the ViT needs a plain patch embedding without bias (stem 'patch', "
                          "not NaFlex) and mlp_dim a multiple of width to become a Qwen2-VL tower")
    config = QwenVisionConfig(width=c.width, layers=c.layers, heads=c.heads, mlp_dim=c.mlp_dim,
                              act=c.act, norm_eps=QWEN_VISION_NORM_EPS, patch_size=c.patch_size,
                              temporal_patch_size=temporal_patch_size,
                              in_channels=c.in_channels, merge_size=merge_size,
                              out_width=out_width)
    tower = QwenVisionTower(config)
    if not transplant:
        return tower
    with torch.no_grad():
        kernel = vit.patch_embed.weight  # Conv2d [width, C, P, P]
        frames = kernel[:, :, None].expand(-1, -1, temporal_patch_size, -1, -1)
        tower.patch_embed.weight.copy_(frames.reshape(c.width, -1) / temporal_patch_size)
        tower.blocks.load_state_dict(vit.transformer.blocks.state_dict())
        tower.merger.norm.load_state_dict(vit.norm_post.state_dict())
    return tower


def compose_qwen_vl(vision: nn.Module, lm: DecoderLM, *, merge_size: int = 2,
                    min_pixels: int = 48 * 48, max_pixels: int = 96 * 96,
                    mrope_section: tuple[int, ...] | None = None, transplant: bool = True,
                    chat_template: str | None = QWEN_VL_CHATML) -> QwenVL:
    """A Qwen2-VL from ``vision`` (a ViT, or a dual encoder with one: its image tower and its
    card's mean/std) and ``lm`` (a Llama/Qwen2 decoder with a tokenizer). The four vision
    tokens join the LM's vocabulary; ``min_pixels``/``max_pixels`` bound the processor's
    ``smart_resize``; ``chat_template`` None keeps the built-in ChatML."""
    from imagefm.models.vocab import extend_vocabulary

    tower = getattr(vision, "vision", vision)
    if not isinstance(tower, VisionTransformer):
        raise ConfigError(f"the vision model must be a ViT (or a dual encoder with one), got "
                          f"{type(tower).__name__}")
    if lm.tokenizer is None:
        raise ConfigError("the language model has no tokenizer; load it from a checkpoint with one")
    card = getattr(vision, "card", None)
    extend_vocabulary(lm, list(VISION_TOKENS.values()))
    ids = {f"{name}_id": lm.tokenizer.token_to_id(token) for name, token in VISION_TOKENS.items()}
    if None in ids.values():
        raise ConfigError(f"the vision tokens could not all be added to the vocabulary: {ids}")
    decoder = qwen2_decoder(lm, mrope_section)
    vision_tower = qwen_vision_from_vit(tower, decoder.config.width, merge_size=merge_size,
                                        transplant=transplant)
    pixels: dict[str, Any] = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    if card is not None:
        pixels.update(mean=card.mean, std=card.std, interpolation=card.interpolation)
    config = QwenVLConfig(vision=vision_tower.config, lm=decoder.config,
                          image=QwenImageConfig(**pixels), video=QwenVideoConfig(**pixels),
                          **ids, **VISION_TOKENS)
    with torch.device("meta"):  # the shell only: its parts are the ones built above
        model = QwenVL(config)
    model.vision, model.lm = vision_tower, decoder
    model.chat_template = chat_template
    return model.eval()
