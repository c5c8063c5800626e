"""Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration: the Qwen2-VL model with
an RMSNorm / gated-MLP vision tower and window attention (windows of 2x2 merged groups here, so
every image below is cut into several windows, some of them partial; block 1 of 3 attends the
whole image). The tokenizer, chat template and conversations are those of test_qwen2_vl.py.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2VLImageProcessorPil"):
    pytest.skip("the reference is built with transformers 5 (Qwen2VLImageProcessorPil)",
                allow_module_level=True)

from test_qwen2_vl import (  # noqa: E402
    MAX_PIXELS,
    MIN_PIXELS,
    TEMPLATE,
    _conversations,
    _images,
    _tokenizer,
    perturb,
    token_settings,
)

from imagefm.convert.qwen2_vl import load_qwen2_vl, load_qwen2_vl_processor  # noqa: E402
from imagefm.models.qwen2_vl_vision import window_order  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tokenizer = _tokenizer()
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=40,
                           out_hidden_size=48, window_size=56, fullatt_block_indexes=[1]),
        **token_settings(tokenizer))
    torch.manual_seed(0)
    model = perturb(transformers.Qwen2_5_VLForConditionalGeneration(config))
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS,
                                                              max_pixels=MAX_PIXELS),
        tokenizer=tokenizer, video_processor=transformers.Qwen2VLVideoProcessor(),
        chat_template=TEMPLATE)
    directory = tmp_path_factory.mktemp("qwen2_5_vl")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
             for c in _conversations()]
    images = [image for c in _conversations() for image in _images(c)]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True,
                      padding_side="left")
    return model, batch, directory


@pytest.fixture(scope="module")
def loaded(reference):
    _, _, directory = reference
    return load_qwen2_vl(directory), load_qwen2_vl_processor(directory)


def test_config_and_windows(reference, loaded):
    _, batch, _ = reference
    model, _ = loaded
    vision = model.config.vision
    assert (model.config.model_type, vision.norm, vision.gated_mlp) == ("qwen2_5_vl", "rmsnorm",
                                                                          True)
    assert (vision.window_size, vision.full_attention_layers) == (56, (1,))
    grid = batch["image_grid_thw"]
    order, lengths = window_order(grid, 2, 2)
    assert sorted(order.tolist()) == list(range(int(grid.prod(-1).sum()) // 4))
    assert len(lengths) > len(grid) and min(lengths) < 16  # several windows, some partial


def test_processor_and_logits_match_reference(reference, loaded):
    hf_model, expected_batch, _ = reference
    model, processor = loaded
    batch = processor.apply_chat_template(list(_conversations()))
    for key in expected_batch:
        assert torch.equal(batch[key], expected_batch[key].to(batch[key].dtype)), key
    with torch.no_grad():
        expected = hf_model(**expected_batch).logits
        ours = model(**batch).logits
        hf_tokens = hf_model.model.get_image_features(
            expected_batch["pixel_values"], expected_batch["image_grid_thw"]).pooler_output
        tokens = model.image_features(batch["pixel_values"], batch["image_grid_thw"])
    torch.testing.assert_close(tokens, torch.cat(hf_tokens), atol=1e-5, rtol=1e-5)
    real = batch["attention_mask"].bool()
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_reference(reference, loaded):
    hf_model, expected_batch, _ = reference
    model, processor = loaded
    batch = processor.apply_chat_template(list(_conversations()))
    expected = hf_model.generate(**expected_batch, max_new_tokens=9, do_sample=False)
    ours = model.generate(**batch, max_new_tokens=9)
    assert ours.shape[1] - batch["input_ids"].shape[1] >= 8
    assert torch.equal(ours, expected)


def test_imagefm_format_round_trip(loaded, tmp_path):
    from imagefm import loading

    model, processor = loaded
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "imagefm.json").read_text())["config"]
    assert saved["model_type"] == "qwen2_5_vl" and saved["vision"]["window_size"] == 56
    again = loading.load(tmp_path)
    assert again.config == model.config
    batch = processor.apply_chat_template(_conversations()[1])
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
