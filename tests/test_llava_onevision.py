"""LLaVA-OneVision against transformers' LlavaOnevisionForConditionalGeneration /
LlavaOnevisionProcessor.

A tiny random reference with odd shapes (SigLIP width 32, 2 layers, patch 4, 22 px tiles;
Qwen2 LM width 48, 4 heads, 2 KV heads; pinpoints up to 2 x 2 tiles; ``anyres_max_2`` so that
both the plain and the shrunk feature maps occur) and a tiny byte-level BPE tokenizer with the
special tokens are built here and saved the way transformers saves them; imagefm loads the
directory and must give the same processor outputs, logits and greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LlavaOnevisionImageProcessorPil"):
    pytest.skip("the reference is built with transformers 5 (LlavaOnevisionImageProcessorPil)",
                allow_module_level=True)

from safetensors.torch import load_file, save_file  # noqa: E402
from vlm_fixtures import chatml_tokenizer, noise_image, photos, synthetic_images  # noqa: E402

from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.llava_onevision import (  # noqa: E402
    load_llava_onevision,
    load_llava_onevision_processor,
)
from imagefm.models.llava_onevision import (  # noqa: E402
    LlavaOneVision,
    OneVisionConfig,
    anyres_layout,
    image_token_count,
)
from imagefm.onevision_processor import OneVisionImageProcessor  # noqa: E402

# llava-hf/llava-onevision-qwen2-*-ov-hf's chat template (its chat_template.json), as test data.
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
PINPOINTS = [[22, 22], [22, 44], [44, 22], [44, 44]]
TILE, GRID = 22, 5  # 22 / 4: a remainder the patch convolution drops, as 384 / 14
ASPECT = "anyres_max_2"


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    return chatml_tokenizer(SPECIALS)


def _reference_processor(tokenizer, backend: str = "pil"):
    kind = (transformers.LlavaOnevisionImageProcessorPil if backend == "pil"
            else transformers.LlavaOnevisionImageProcessor)
    image_processor = kind(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    return transformers.LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=transformers.LlavaOnevisionVideoProcessor(), num_image_tokens=GRID**2,
        vision_feature_select_strategy="full", vision_aspect_ratio=ASPECT,
        chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model, HF processor, saved directory)."""
    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    config = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=40,
                           num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                           image_size=TILE, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=300, hidden_size=48, intermediate_size=72,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-6, max_position_embeddings=1024, bos_token_id=None,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=ASPECT, vision_feature_layer=-1,
        vision_feature_select_strategy="full")
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger than HF's init, so logits (and greedy tokens) differ by input
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            else:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3 if "newline" in name else 0.1)
    processor = _reference_processor(tokenizer)
    directory = tmp_path_factory.mktemp("llava_onevision")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor, directory


def _conversations():
    """A big, slightly wide image alone (its feature map is shrunk); two images of different
    odd sizes in one conversation (not tiled); a tall image alone after an assistant turn and
    Korean text."""
    first = [{"role": "user", "content": [
        {"type": "image", "image": noise_image(50, 63, 1)},
        {"type": "text", "text": "What is in the picture?"}]}]
    second = [{"role": "user", "content": [
        {"type": "image", "image": noise_image(45, 29, 2)},
        {"type": "image", "image": noise_image(17, 52, 3)},
        {"type": "text", "text": "Describe both images."}]}]
    third = [{"role": "user", "content": [{"type": "text", "text": "고양이?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "사진입니다"}]},
             {"role": "user", "content": [{"type": "image", "image": noise_image(61, 23, 4)},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    return first, second, third


def _reference_batch(processor, conversations):
    return processor.apply_chat_template(list(conversations), add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt",
                                         padding=True, padding_side="left")


# --- processor -------------------------------------------------------------------------------


def test_processor_matches_reference(reference):
    _, hf_processor, directory = reference
    processor = load_llava_onevision_processor(directory)
    conversations = _conversations()
    texts = [hf_processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
             for c in conversations]
    assert [processor.render(c) for c in conversations] == texts  # the chat template
    assert "\n사진입니다<|im_end|>" in texts[2]  # {% generation %} renders its body
    expected = _reference_batch(hf_processor, conversations)
    ours = processor.apply_chat_template(list(conversations))
    assert set(ours) == set(expected)
    for key in expected:
        assert torch.equal(ours[key], expected[key].to(ours[key].dtype)), key
    assert ours["batch_num_images"].tolist() == [1, 2, 1]
    assert ours["pixel_values"].shape == (4, 5, 3, TILE, TILE)  # 2 x 2 tiles + base at most


def test_token_counts_equal_reference_formula(reference):
    """Our count (from the model's own layout) equals the reference processor's for many sizes
    and aspect ratios, both sides of the shrink rule included."""
    _, hf_processor, directory = reference
    config = load_llava_onevision_processor(directory).config
    shrunk = 0
    for height in (1, 7, 19, 20, 23, 40, 41, 64, 97, 250):
        for width in (3, 13, 20, 33, 40, 59, 80, 141, 600):
            expected = hf_processor._get_number_of_features(height, width, TILE, TILE)
            assert image_token_count(height, width, config) == expected, (height, width)
            shrunk += anyres_layout(height, width, config).shrunk is not None
    assert 0 < shrunk < 90
    assert image_token_count(50, 30, config, tiled=False) == GRID**2 + 1


def _check_image_processor(reference, images):
    """Pixel values and sizes equal to the reference's PIL processor bit for bit, tiled (flat
    list) and not (grouped); its default torchvision processor resamples a little differently."""
    _, hf_processor, directory = reference
    ours_processor = OneVisionImageProcessor(load_llava_onevision_processor(directory).config)
    pil = transformers.LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                                       image_grid_pinpoints=PINPOINTS)
    fast = transformers.LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE},
                                                     image_grid_pinpoints=PINPOINTS)
    for given in (images, [images[:2], images[2:3], images[3:]]):
        ours = ours_processor(given)
        expected = pil(images=given, return_tensors="pt")
        assert set(ours) == set(expected)
        for key in expected:
            assert torch.equal(ours[key], expected[key]), key
        other = fast(images=given, return_tensors="pt")
        assert torch.equal(ours["image_sizes"], other["image_sizes"])
        assert (ours["pixel_values"] - other["pixel_values"]).abs().mean() < 0.02


def test_image_processor_synthetic_images(reference):
    _check_image_processor(reference, synthetic_images(wide=700))


def test_image_processor_real_photos(reference, shared_data):
    _check_image_processor(reference, photos(shared_data))


# --- model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(reference):
    _, _, directory = reference
    return load_llava_onevision(directory), load_llava_onevision_processor(directory)


def test_logits_match_reference(reference, loaded):
    hf_model, hf_processor, _ = reference
    model, processor = loaded
    expected_batch = _reference_batch(hf_processor, _conversations())
    batch = processor.apply_chat_template(list(_conversations()))
    config = model.config
    layouts = [anyres_layout(h, w, config) for h, w in batch["image_sizes"].tolist()]
    assert layouts[0].shrunk is not None and layouts[3].shrunk is None  # both branches
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


def test_logits_match_reference_images_tiled_without_counts(reference, loaded):
    """A flat image list tiles every image, even two in one text; pixel_values and image_sizes
    alone (no batch_num_images) mean the same to both models."""
    hf_model, hf_processor, _ = reference
    model, processor = loaded
    text = processor.render(_conversations()[1])
    images = [p["image"] for p in _conversations()[1][0]["content"] if p["type"] == "image"]
    expected_batch = hf_processor(text=[text], images=images, return_tensors="pt")
    batch = processor(text, images)
    assert torch.equal(batch["input_ids"], expected_batch["input_ids"])
    del batch["batch_num_images"], expected_batch["batch_num_images"]
    with torch.no_grad():
        expected = hf_model(**expected_batch).logits
        ours = model(**batch).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_reference(reference, loaded):
    hf_model, hf_processor, _ = reference
    model, processor = loaded
    expected_batch = _reference_batch(hf_processor, _conversations())
    batch = processor.apply_chat_template(list(_conversations()))
    new = 10
    expected = hf_model.generate(**expected_batch, max_new_tokens=new, do_sample=False)
    ours = model.generate(**batch, max_new_tokens=new)
    assert ours.shape[1] - batch["input_ids"].shape[1] >= 8
    assert torch.equal(ours, expected)


def test_image_token_count_is_checked(loaded):
    model, processor = loaded
    batch = processor.apply_chat_template(_conversations()[0])
    ids = batch["input_ids"].clone()
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    ids[0, first] = 100  # one <image> token fewer than the image needs
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=ids, pixel_values=batch["pixel_values"],
              image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="placeholder"):
        processor("<image>hi", images=[noise_image(40, 40, 0)] * 2)


def test_bf16_load_through_imagefm_load(reference, loaded):
    """imagefm.load(dtype="bfloat16"): weights straight into bfloat16 (meta-device build, no
    parameter left empty), logits near the float32 ones, generation runs."""
    from imagefm import loading

    _, _, directory = reference
    model, processor = loaded
    half, half_processor = loading.load(directory, dtype="bfloat16", processor=True)
    assert isinstance(half, LlavaOneVision)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    batch = processor.apply_chat_template(list(_conversations()))
    assert torch.equal(half_processor.apply_chat_template(list(_conversations()))["input_ids"],
                       batch["input_ids"])
    with torch.no_grad():
        full = model(**batch).logits
        logits = half(**batch).logits
    real = batch["attention_mask"].bool()
    assert logits.dtype == torch.bfloat16
    error = (logits.float()[real] - full[real]).abs().mean() / full[real].abs().mean()
    assert error < 0.05
    out = half.generate(**batch, max_new_tokens=3)
    assert out.shape == (3, batch["input_ids"].shape[1] + 3)


# --- checkpoints -----------------------------------------------------------------------------


def _copy_small_files(source: Path, target: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())


def test_transformers4_layout_without_post_norm_loads(reference, loaded, tmp_path):
    """The published checkpoints (transformers 4): vision_tower.vision_model.*, and a tower
    whose unused final norm may be absent."""
    _, _, directory = reference
    renamed = {}
    for key, value in load_file(str(directory / "model.safetensors")).items():
        if key.startswith("vision_tower."):
            if "post_layernorm" in key:
                continue
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        renamed[key] = value
    _copy_small_files(directory, tmp_path)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    model, processor = loaded
    other = load_llava_onevision(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(),
                                 strict=True):
        if "norm_post" not in name:
            assert torch.equal(a, b), name
    batch = processor.apply_chat_template(_conversations()[0])
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).logits, model(**batch).logits)


def test_strict_loading_fails_on_a_missing_key(reference, tmp_path):
    _, _, directory = reference
    state = load_file(str(directory / "model.safetensors"))
    del state["image_newline"]
    _copy_small_files(directory, tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="image_newline"):
        load_llava_onevision(tmp_path)


def test_processor_settings_that_disagree_are_refused(reference, tmp_path):
    _, _, directory = reference
    _copy_small_files(directory, tmp_path)
    settings = json.loads((directory / "processor_config.json").read_text())
    settings["num_image_tokens"] = 36
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="num_image_tokens"):
        load_llava_onevision_processor(tmp_path)


def test_imagefm_format_round_trip(loaded, tmp_path):
    from imagefm import loading

    model, processor = loaded
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "imagefm.json").read_text())
    assert meta["architecture"] == "llava_onevision"
    assert meta["config"]["image_grid_pinpoints"] == PINPOINTS
    assert OneVisionConfig.from_dict(meta["config"]) == model.config
    again = loading.load_imagefm(tmp_path)
    reread = load_llava_onevision_processor(tmp_path)
    batch = processor.apply_chat_template(list(_conversations()))
    assert all(torch.equal(batch[k], v) for k, v in
               reread.apply_chat_template(list(_conversations())).items())
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
