"""Qwen2-VL against transformers' Qwen2VLForConditionalGeneration / Qwen2VLProcessor.

A tiny random reference with odd shapes (vision width 32, 2 heads, depth 2; LM width 48, 4 heads,
2 KV heads, mrope_section [2, 2, 2]) and a tiny byte-level BPE tokenizer with Qwen's special
tokens are built here and saved the way transformers saves them; imagefm loads the directory and
must give the same processor outputs, logits and greedy tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2VLImageProcessorPil"):
    pytest.skip("the reference is built with transformers 5 (Qwen2VLImageProcessorPil)",
                allow_module_level=True)

from safetensors.torch import load_file, save_file  # noqa: E402
from vlm_fixtures import chatml_tokenizer, noise_image, photos, synthetic_images  # noqa: E402

from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.qwen2_vl import load_qwen2_vl, load_qwen2_vl_processor  # noqa: E402
from imagefm.models.qwen_vl import QwenVL  # noqa: E402
from imagefm.qwen_vl_processor import QwenVLImageProcessor, smart_resize  # noqa: E402

# Qwen2-VL-Instruct's chat template (its chat_template.json), as test data.
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 2, 28 * 28 * 9  # small grids: 2 to 9 image tokens


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    return chatml_tokenizer(SPECIALS)


def _reference_processor(tokenizer, backend: str = "pil", **sizes):
    sizes = sizes or dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image_processor = (transformers.Qwen2VLImageProcessorPil(**sizes) if backend == "pil"
                       else transformers.Qwen2VLImageProcessor(**sizes))
    return transformers.Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         video_processor=transformers.Qwen2VLVideoProcessor(),
                                         chat_template=TEMPLATE)


def token_settings(tokenizer) -> dict:
    """The special-token ids a Qwen-VL config names, and its tiny odd-shaped text config."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(vocab_size=300, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                max_position_embeddings=512, bos_token_id=None,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2],
                                 "rope_theta": 10000.0})
    return dict(text_config=text, image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"])


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Weights larger than HF's initialisation, so logits (and greedy tokens) differ by input."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            else:
                p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.1)
    return model.eval()


def tiny_qwen2_vl(tokenizer) -> torch.nn.Module:
    """A tiny random Qwen2VLForConditionalGeneration with odd shapes."""
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=3),
        **token_settings(tokenizer))
    torch.manual_seed(0)
    return perturb(transformers.Qwen2VLForConditionalGeneration(config))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model, HF processor, saved directory)."""
    tokenizer = _tokenizer()
    model = tiny_qwen2_vl(tokenizer)
    processor = _reference_processor(tokenizer)
    directory = tmp_path_factory.mktemp("qwen2_vl")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor, directory


def _conversations():
    """Two conversations: two images of different odd sizes, and one tall image after Korean."""
    first = [{"role": "user", "content": [
        {"type": "image", "image": noise_image(45, 71, 1)},
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image", "image": noise_image(97, 33, 2)},
        {"type": "text", "text": "Describe both images."}]}]
    second = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": [{"type": "text", "text": "고양이?"},
                                           {"type": "image", "image": noise_image(140, 30, 3)}]}]
    return first, second


def _images(messages):
    return [p["image"] for m in messages if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image"]


def _reference_batch(processor, conversations):
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
             for c in conversations]
    images = [image for c in conversations for image in _images(c)]
    return texts, processor(text=texts, images=images, return_tensors="pt", padding=True,
                            padding_side="left")


# --- processor -------------------------------------------------------------------------------


def test_processor_matches_reference(reference):
    _, hf_processor, directory = reference
    processor = load_qwen2_vl_processor(directory)
    conversations = _conversations()
    texts, expected = _reference_batch(hf_processor, conversations)
    assert [processor.render(c) for c in conversations] == texts  # the chat template
    ours = processor.apply_chat_template(list(conversations))
    assert set(ours) == set(expected)
    for key in expected:
        assert torch.equal(ours[key], expected[key].to(ours[key].dtype)), key
    grids = ours["image_grid_thw"].tolist()
    assert len({tuple(g) for g in grids}) == 3  # three different sizes
    image_id = processor.config.image_token_id
    assert int((ours["input_ids"] == image_id).sum()) == sum(t * h * w // 4 for t, h, w in grids)


def _check_image_processor(reference, images, max_pixels):
    """Pixel values and grids equal to the reference's PIL processor bit for bit; its default
    torchvision processor resamples a little differently (bounded here)."""
    _, hf_processor, directory = reference
    config = load_qwen2_vl_processor(directory).config
    config = config.replace(image=config.image.__class__(min_pixels=MIN_PIXELS,
                                                         max_pixels=max_pixels))
    ours = QwenVLImageProcessor(config)(images)
    sizes = dict(min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    pil = transformers.Qwen2VLImageProcessorPil(**sizes)(images=images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], pil["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], pil["pixel_values"])
    fast = transformers.Qwen2VLImageProcessor(**sizes)(images=images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], fast["image_grid_thw"])
    assert (ours["pixel_values"] - fast["pixel_values"]).abs().mean() < 0.02
    for (t, h, w), image in zip(ours["image_grid_thw"].tolist(), images, strict=True):
        assert (t, h * 14, w * 14) == (1, *smart_resize(image.height, image.width, 28,
                                                         MIN_PIXELS, max_pixels))


@pytest.mark.parametrize("max_pixels", [MAX_PIXELS, 28 * 28 * 200])
def test_image_processor_synthetic_images(reference, max_pixels):
    _check_image_processor(reference, synthetic_images(wide=1500), max_pixels)  # tiny: upscaled


@pytest.mark.parametrize("max_pixels", [MAX_PIXELS, 28 * 28 * 200])
def test_image_processor_real_photos(reference, shared_data, max_pixels):
    _check_image_processor(reference, photos(shared_data), max_pixels)


def test_smart_resize_refuses_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


# --- model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(reference):
    _, _, directory = reference
    return load_qwen2_vl(directory), load_qwen2_vl_processor(directory)


def test_logits_match_reference(reference, loaded):
    hf_model, hf_processor, _ = reference
    model, processor = loaded
    _, expected_batch = _reference_batch(hf_processor, _conversations())
    batch = processor.apply_chat_template(list(_conversations()))
    with torch.no_grad():
        expected = hf_model(**expected_batch).logits
        ours = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert expected.abs().max() > 1.0  # logits that say something
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)
    # Each conversation alone (no padding) gives what its padded row gave.
    for row, conversation in enumerate(_conversations()):
        single = processor.apply_chat_template(conversation)
        with torch.no_grad():
            alone = model(**single).logits[0]
        torch.testing.assert_close(alone, ours[row][real[row]], atol=1e-4, rtol=1e-4)


def test_rope_index_continues_text_after_images(loaded):
    model, processor = loaded
    batch = processor.apply_chat_template(_conversations()[0])
    positions, deltas = model.rope_index(batch["input_ids"], batch["image_grid_thw"],
                                         batch["attention_mask"])
    ids = batch["input_ids"][0]
    image = ids == model.config.image_token_id
    text_positions = positions[:, 0, ~image]
    assert torch.equal(text_positions[0], text_positions[1])  # text: one position, three rows
    assert (text_positions[0].diff() > 0).all()  # ... strictly increasing across the images
    first_grid = batch["image_grid_thw"][0].tolist()
    start = int(image.nonzero()[0])
    count = model.config.image_tokens(tuple(first_grid))
    rows, cols = first_grid[1] // 2, first_grid[2] // 2
    block = positions[:, 0, start:start + count]
    assert torch.equal(block[1], start + torch.arange(rows).repeat_interleave(cols))
    assert torch.equal(block[2], start + torch.arange(cols).repeat(rows))
    assert int(positions[0, 0, start + count]) == start + max(rows, cols)  # max + 1
    assert int(deltas[0]) == int(positions.max()) + 1 - ids.numel() < 0


def test_greedy_generate_matches_reference(reference, loaded):
    hf_model, hf_processor, _ = reference
    model, processor = loaded
    _, expected_batch = _reference_batch(hf_processor, _conversations())
    batch = processor.apply_chat_template(list(_conversations()))
    new = 10
    expected = hf_model.generate(**expected_batch, max_new_tokens=new, do_sample=False)
    ours = model.generate(**batch, max_new_tokens=new)
    assert ours.shape[1] - batch["input_ids"].shape[1] >= 8
    assert torch.equal(ours, expected)


def test_forward_with_cache_continues_positions(loaded):
    """Prompt through forward with a KV cache, then one token at a time: the cache carries the
    rope deltas, and every step's logits equal those of the whole sequence at once."""
    model, processor = loaded
    batch = processor.apply_chat_template(list(_conversations()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = torch.tensor([[40, 41, 42], [43, 44, 45]])
    full_ids = torch.cat([ids, extra], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        whole = model(input_ids=full_ids, attention_mask=full_mask, **images).logits
        cache = model.new_cache(2, full_ids.shape[1])
        steps = [model(input_ids=ids, attention_mask=mask, cache=cache, **images).logits[:, -1]]
        assert cache.rope_deltas is not None and cache.rope_deltas.tolist()[0] < 0
        for i in range(extra.shape[1]):
            length = ids.shape[1] + i + 1
            steps.append(model(input_ids=extra[:, i:i + 1], attention_mask=full_mask[:, :length],
                               cache=cache).logits[:, -1])
    expected = whole[:, ids.shape[1] - 1:]
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, atol=1e-4, rtol=1e-4)


def test_mrope_with_equal_rows_is_plain_rotary():
    """Text alone: three equal position rows rotate exactly as 1-D positions do."""
    from imagefm.models.decoder import DecoderLM
    from imagefm.models.decoder_config import DecoderConfig

    lm = DecoderLM(DecoderConfig(model_type="qwen2", vocab_size=50, width=48, layers=1, heads=4,
                                 kv_heads=2, mlp_dim=64, qkv_bias=True,
                                 mrope_section=(1, 3, 2))).eval()
    ids = torch.randint(0, 50, (2, 7))
    positions = torch.arange(3, 10).expand(2, -1)
    with torch.no_grad():
        plain = lm(ids, position_ids=positions).logits
        three = lm(ids, position_ids=positions.expand(3, -1, -1)).logits
    assert torch.equal(plain, three)


def test_attend_segments_is_block_diagonal_attention():
    from imagefm.models.qwen2_vl_vision import attend_segments

    lengths = [3, 3, 5, 2, 2, 1]
    q, k, v = torch.randn(3, 2, sum(lengths), 8).unbind(0)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = segment[:, None] == segment[None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attend_segments(q, k, v, lengths), expected)


def test_image_token_count_is_checked(loaded):
    model, processor = loaded
    batch = processor.apply_chat_template(_conversations()[0])
    ids = batch["input_ids"].clone()
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    ids[0, first] = 100  # one pad token fewer than the images need
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=ids, pixel_values=batch["pixel_values"],
              image_grid_thw=batch["image_grid_thw"])
    with pytest.raises(ValueError, match="placeholder"):
        processor("<|vision_start|><|image_pad|><|vision_end|>hi",
                  images=[noise_image(40, 40, 0)] * 2)


# --- checkpoints -----------------------------------------------------------------------------


def test_older_key_layout_loads(reference, loaded, tmp_path):
    """transformers 4.52-4.57 saved model.visual.* and model.language_model.*."""
    _, _, directory = reference
    renamed = {}
    for key, value in load_file(str(directory / "model.safetensors")).items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        renamed[key] = value
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "chat_template.jinja"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    save_file(renamed, str(tmp_path / "model.safetensors"))
    model, _ = loaded
    other = load_qwen2_vl(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_strict_loading_fails_on_a_missing_key(reference, tmp_path):
    _, _, directory = reference
    state = load_file(str(directory / "model.safetensors"))
    del state["visual.blocks.1.attn.qkv.bias"]
    for name in ("config.json", "processor_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="vision.blocks.1.attn"):
        load_qwen2_vl(tmp_path)


def test_flat_published_config_reads_the_same(reference):
    """The published config.json is flat (the LM's fields at the top, rope_scaling 'mrope')."""
    from imagefm.convert.qwen2_vl import config_from_qwen2_vl

    _, _, directory = reference
    nested = json.loads((directory / "config.json").read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**{k: v for k, v in text.items() if k != "model_type"}, **nested,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    flat["vision_config"] = {k: v for k, v in flat["vision_config"].items()
                             if k != "rope_parameters"}
    processor = json.loads((directory / "processor_config.json").read_text())["image_processor"]
    size = processor.pop("size")
    published = {**processor, "min_pixels": size["shortest_edge"],
                 "max_pixels": size["longest_edge"]}
    ours = config_from_qwen2_vl(flat, published)
    assert ours == config_from_qwen2_vl(json.loads((directory / "config.json").read_text()),
                                        {**processor, "size": size})
    reread = transformers.Qwen2VLConfig(**flat).text_config  # the reference reads it so too
    assert reread.rope_parameters["mrope_section"] == list(ours.lm.mrope_section)
    assert reread.hidden_size == ours.lm.width and reread.vocab_size == ours.lm.vocab_size


def test_imagefm_format_round_trip(loaded, tmp_path):
    from imagefm import loading

    model, processor = loaded
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "imagefm.json").read_text())
    assert meta["architecture"] == "qwen2_vl"
    assert meta["config"]["lm"]["mrope_section"] == [2, 2, 2]
    again = loading.load(tmp_path)
    assert isinstance(again, QwenVL) and again.config == model.config
    again_processor = load_qwen2_vl_processor(tmp_path)
    conversation = _conversations()[0]
    batch = processor.apply_chat_template(conversation)
    batch_again = again_processor.apply_chat_template(conversation)
    for key in batch:
        assert torch.equal(batch[key], batch_again[key]), key
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=0, rtol=0)
