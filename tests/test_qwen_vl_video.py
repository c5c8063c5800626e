"""Video input for Qwen2-VL and Qwen2.5-VL against transformers (5.x): frames → temporal patches
(Qwen2VLVideoProcessor), ``<|video_pad|>`` expansion, M-RoPE positions of videos (Qwen2.5-VL:
absolute time, ``tokens_per_second`` x ``second_per_grid_ts``), logits and greedy generation,
for a video alone and for an image and a video in one conversation.

Tiny random references as in test_qwen2_vl.py / test_qwen2_5_vl.py (same tokenizer and chat
template), with a video processor of small pixel bounds so the videos are a few tokens, frames
of odd sizes (one video of 5 frames: the reference repeats the last frame to make the temporal
patches of two), and for Qwen2.5-VL ``tokens_per_second`` = 3 with a video at 4 fps, so a
temporal patch spans 0.5 s and the temporal positions are int(i * 1.5) = 0, 1, 3.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2VLImageProcessorPil"):
    pytest.skip("the reference is built with transformers 5 (Qwen2VLImageProcessorPil)",
                allow_module_level=True)

from test_qwen2_vl import MAX_PIXELS, MIN_PIXELS, SPECIALS, TEMPLATE, _tokenizer  # noqa: E402

from imagefm.convert.qwen2_vl import (  # noqa: E402
    load_qwen2_vl,
    load_qwen2_vl_processor,
    video_config_from_hf,
)
from imagefm.qwen_vl_video import QwenVLVideoProcessor  # noqa: E402

VIDEO_PIXELS = dict(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 6)
TOKENS_PER_SECOND = 3
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), np.uint8)


def _image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(_frames(1, height, width, seed)[0])


def _video_alone(fps: float | None = 4.0):
    """5 frames of 45x151 as PIL images (-> 28x112: 3 temporal patches of 1x4 merged tokens)."""
    frames = [Image.fromarray(f) for f in _frames(5, 45, 151, 11)]
    video = {"type": "video", "video": frames, **({"fps": fps} if fps else {})}
    return [{"role": "user", "content": [video, {"type": "text", "text": "What is in it?"}]}]


def _image_and_video():
    """An image, then 4 frames of 61x33 as one array (-> 56x28, 2 temporal patches), no fps."""
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [
                {"type": "text", "text": "고양이?"},
                {"type": "image", "image": _image(45, 71, 12)},
                {"type": "video", "video": _frames(4, 61, 33, 13)},
                {"type": "text", "text": "Describe both images."}]}]


def _parts(conversation, kind):
    return [p for m in conversation if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == kind]


def _reference_batch(processor, conversations):
    """The reference processor's batch; a video's fps reaches it as video metadata (none:
    its default of 24)."""
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
             for c in conversations]
    images = [p["image"] for c in conversations for p in _parts(c, "image")]
    videos = [p for c in conversations for p in _parts(c, "video")]
    metadata = [{"fps": p.get("fps"), "total_num_frames": len(p["video"])} for p in videos]
    return processor(text=texts, images=images or None, videos=[p["video"] for p in videos],
                     video_metadata=metadata, return_tensors="pt", padding=True,
                     padding_side="left")


def _build(family: str, directory):
    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(vocab_size=300, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                max_position_embeddings=512, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2],
                                 "rope_theta": 10000.0})
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            vision_config=dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=3),
            text_config=text, **tokens)
        model_class, processor_class = (transformers.Qwen2VLForConditionalGeneration,
                                        transformers.Qwen2VLProcessor)
    else:
        config = transformers.Qwen2_5_VLConfig(
            vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=40,
                               out_hidden_size=48, window_size=56, fullatt_block_indexes=[1],
                               tokens_per_second=TOKENS_PER_SECOND),
            text_config=text, **tokens)
        model_class, processor_class = (transformers.Qwen2_5_VLForConditionalGeneration,
                                        transformers.Qwen2_5_VLProcessor)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # larger than HF's init, so the logits depend on the input
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            else:
                p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.1)
    processor = processor_class(
        image_processor=transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS,
                                                              max_pixels=MAX_PIXELS),
        tokenizer=tokenizer, chat_template=TEMPLATE,
        video_processor=transformers.Qwen2VLVideoProcessor(**VIDEO_PIXELS,
                                                           cap_pixels_per_frame=False))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, HF model, HF processor, our model, our processor)."""
    directory = tmp_path_factory.mktemp(request.param)
    model, processor = _build(request.param, directory)
    return request.param, model, processor, load_qwen2_vl(directory), \
        load_qwen2_vl_processor(directory)


def _conversations():
    return [_video_alone(), _image_and_video()]


# --- processor -----------------------------------------------------------------------------------


def test_processor_matches_reference(family):
    name, _, hf_processor, model, processor = family
    conversations = _conversations()
    expected = _reference_batch(hf_processor, conversations)
    ours = processor.apply_chat_template(conversations)
    assert set(ours) == set(expected)
    assert ("second_per_grid_ts" in ours) == (name == "qwen2_5_vl")
    for key in expected:
        assert torch.equal(ours[key], expected[key].to(ours[key].dtype)), key
    # 5 frames -> 3 temporal patches (the last frame repeated), 4 frames -> 2.
    assert ours["video_grid_thw"].tolist() == [[3, 2, 8], [2, 4, 2]]
    video_id = model.config.video_token_id
    assert int((ours["input_ids"] == video_id).sum()) == (3 * 2 * 8 + 2 * 4 * 2) // 4
    assert int((ours["mm_token_type_ids"] == 2).sum()) == (3 * 2 * 8 + 2 * 4 * 2) // 4
    if name == "qwen2_5_vl":  # 2 frames per temporal patch at 4 fps, and at the default 24
        torch.testing.assert_close(ours["second_per_grid_ts"], torch.tensor([0.5, 2 / 24]))
    assert model.config.tokens_per_second == (TOKENS_PER_SECOND if name == "qwen2_5_vl"
                                              else None)
    assert (model.config.video.min_pixels, model.config.video.max_pixels) == (
        VIDEO_PIXELS["min_pixels"], VIDEO_PIXELS["max_pixels"])


def test_odd_frame_count_repeats_the_last_frame(family):
    _, _, _, _, processor = family
    frames = _frames(5, 45, 151, 11)
    padded = np.concatenate([frames, frames[-1:]])
    odd = processor.video_processor([frames])
    even = processor.video_processor([padded])
    assert torch.equal(odd["pixel_values_videos"], even["pixel_values_videos"])
    assert torch.equal(odd["video_grid_thw"], even["video_grid_thw"])
    pil = processor.video_processor([[Image.fromarray(f) for f in frames]])
    assert torch.equal(pil["pixel_values_videos"], odd["pixel_values_videos"])


def test_capped_pixels_per_frame_match_reference(family):
    """The reference's cap_pixels_per_frame (the whole video's pixel budget shared by its
    frames) read from its settings and applied as it does."""
    _, _, _, model, _ = family
    reference = transformers.Qwen2VLVideoProcessor(**VIDEO_PIXELS, cap_pixels_per_frame=True,
                                                   max_video_tokens=10)
    video = video_config_from_hf(reference.to_dict(), model.config.vision)
    assert video.max_video_tokens == 10
    ours = QwenVLVideoProcessor(model.config.replace(video=video))
    frames = _frames(5, 97, 151, 14)
    expected = reference(videos=[frames], return_tensors="pt")
    got = ours([frames])
    assert torch.equal(got["video_grid_thw"], expected["video_grid_thw"])
    uncapped = QwenVLVideoProcessor(model.config)([frames])["video_grid_thw"]
    assert int(got["video_grid_thw"].prod()) < int(uncapped.prod())  # the cap did something
    assert torch.equal(got["pixel_values_videos"], expected["pixel_values_videos"])


# --- model ---------------------------------------------------------------------------------------


def test_rope_index_matches_reference(family):
    name, hf_model, hf_processor, model, processor = family
    expected_batch = _reference_batch(hf_processor, _conversations())
    batch = processor.apply_chat_template(_conversations())
    keys = ("image_grid_thw", "video_grid_thw", "attention_mask") + (
        ("second_per_grid_ts",) if name == "qwen2_5_vl" else ())
    expected, expected_deltas = hf_model.model.get_rope_index(
        expected_batch["input_ids"], expected_batch["mm_token_type_ids"],
        **{k: expected_batch[k] for k in keys})
    positions, deltas = model.rope_index(
        batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
        video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=batch.get("second_per_grid_ts"))
    assert torch.equal(positions, expected)
    assert torch.equal(deltas, expected_deltas.flatten())
    video = batch["input_ids"][0] == model.config.video_token_id
    times = positions[0, 0, video].unique() - int(positions[0, 0, video].min())
    assert times.tolist() == ([0, 1, 3] if name == "qwen2_5_vl" else [0, 1, 2])


def test_logits_match_reference(family):
    _, hf_model, hf_processor, model, processor = family
    expected_batch = _reference_batch(hf_processor, _conversations())
    batch = processor.apply_chat_template(_conversations())
    with torch.no_grad():
        expected = hf_model(**expected_batch).logits
        ours = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)
    for row, conversation in enumerate(_conversations()):  # alone = its padded row
        with torch.no_grad():
            alone = model(**processor.apply_chat_template(conversation)).logits[0]
        torch.testing.assert_close(alone, ours[row][real[row]], atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_reference(family):
    _, hf_model, hf_processor, model, processor = family
    expected_batch = _reference_batch(hf_processor, _conversations())
    batch = processor.apply_chat_template(_conversations())
    expected = hf_model.generate(**expected_batch, max_new_tokens=8, do_sample=False)
    ours = model.generate(**batch, max_new_tokens=8)
    assert ours.shape[1] - batch["input_ids"].shape[1] == 8
    assert torch.equal(ours, expected)


def test_frame_rate_moves_qwen2_5_vl_positions(family):
    """Qwen2.5-VL's absolute time: the same frames at another frame rate give other logits
    (and the same pixels); Qwen2-VL ignores the rate."""
    name, _, _, model, processor = family
    four, default = (processor.apply_chat_template(_video_alone(fps))
                     for fps in (4.0, None))
    assert torch.equal(four["pixel_values_videos"], default["pixel_values_videos"])
    with torch.no_grad():
        a, b = model(**four).logits, model(**default).logits
    if name == "qwen2_5_vl":
        assert not torch.allclose(a, b, atol=1e-3)
    else:
        assert torch.equal(a, b)


def test_text_after_a_long_video_continues_after_its_last_time(family):
    """Where the video's time axis reaches beyond its rows and columns (1 fps: temporal
    positions 0, 6, 12 in Qwen2.5-VL; 3 temporal patches of a 1-row video in Qwen2-VL), the text
    after it continues at the largest position + 1 (Qwen's rule; transformers 5.3+ continues
    after max(h, w) / 2 instead: see imagefm.models.qwen_vl_rope). The video's own positions
    equal the reference's."""
    name, hf_model, hf_processor, model, processor = family
    frames = _frames(6, 20, 60, 15)  # -> 28x56: 1x2 merged tokens, 3 temporal patches
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 1.0},
                                                 {"type": "text", "text": "Describe it."}]}]
    batch = processor.apply_chat_template(conversation)
    positions, deltas = model.rope_index(batch["input_ids"], attention_mask=None,
                                         video_grid_thw=batch["video_grid_thw"],
                                         second_per_grid_ts=batch.get("second_per_grid_ts"))
    ids = batch["input_ids"][0]
    video = (ids == model.config.video_token_id).nonzero().flatten()
    start, end = int(video[0]), int(video[-1]) + 1
    times = [0, 6, 12] if name == "qwen2_5_vl" else [0, 1, 2]  # 2 s per temporal patch x 3
    expected_video = torch.stack([
        torch.tensor(times).repeat_interleave(2), torch.zeros(6, dtype=torch.long),
        torch.tensor([0, 1]).repeat(3)]) + start
    assert torch.equal(positions[:, 0, start:end], expected_video)
    after = torch.arange(ids.numel() - end) + int(expected_video.max()) + 1
    assert torch.equal(positions[:, 0, end:], after.expand(3, -1))
    assert int(deltas[0]) == int(after[-1]) + 1 - ids.numel()
    reference = _reference_batch(hf_processor, [conversation])
    hf_positions, _ = hf_model.model.get_rope_index(
        reference["input_ids"], reference["mm_token_type_ids"],
        video_grid_thw=reference["video_grid_thw"],
        **({"second_per_grid_ts": reference["second_per_grid_ts"]}
           if name == "qwen2_5_vl" else {}))
    assert torch.equal(hf_positions[:, 0, :end], positions[:, 0, :end])


def test_video_tokens_are_checked(family):
    _, _, _, model, processor = family
    batch = processor.apply_chat_template(_video_alone())
    ids = batch["input_ids"].clone()
    ids[0, int((ids[0] == model.config.video_token_id).nonzero()[0])] = 100
    with pytest.raises(ValueError, match="video tokens"):
        model(input_ids=ids, pixel_values_videos=batch["pixel_values_videos"],
              video_grid_thw=batch["video_grid_thw"])
    with pytest.raises(ValueError, match="no pixel_values_videos"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="placeholder"):
        processor("<|vision_start|><|video_pad|><|vision_end|>hi",
                  videos=[_frames(2, 40, 40, 0)] * 2)
    with pytest.raises(ValueError, match="one size"):
        processor.video_processor([[_image(40, 40, 0), _image(40, 41, 0)]])


def test_imagefm_format_keeps_video_settings(family, tmp_path):
    from imagefm import loading

    _, _, _, model, processor = family
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "imagefm.json").read_text())["config"]
    assert saved["video"]["max_pixels"] == VIDEO_PIXELS["max_pixels"]
    again = loading.load(tmp_path / "model")
    assert again.config == model.config
    again_processor = load_qwen2_vl_processor(tmp_path / "model")
    batch = processor.apply_chat_template(_image_and_video())
    batch_again = again_processor.apply_chat_template(_image_and_video())
    for key in batch:
        assert torch.equal(batch[key], batch_again[key]), key
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
    shutil.rmtree(tmp_path / "model")
