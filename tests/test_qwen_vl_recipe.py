"""The building blocks of the Qwen2-VL recipe of docs/results.md, on tiny random parts: a Qwen2-VL
composed from a ViT and a Llama (``compose_qwen_vl``), and the synthetic conversations at native
sizes (``data.source = vlm-synthetic`` for a dynamic-resolution model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import imagefm
from imagefm.config import VisionConfig
from imagefm.models.decoder import IGNORE_INDEX
from imagefm.models.qwen2_vl_vision import patch_positions
from imagefm.models.qwen_vl_compose import compose_qwen_vl
from imagefm.models.vit import VisionTransformer
from imagefm.qwen_vl_processor import QwenVLProcessor

PATCH = 4  # tiny tower: 4-px patches, merged 2x2, so image sides are multiples of 8


def _vit() -> VisionTransformer:
    vit = VisionTransformer(VisionConfig(image_size=16, patch_size=PATCH, width=32, layers=2,
                                         heads=2, mlp_dim=64, act="gelu"))
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms and biases away from 1 / 0
    return vit.eval()


@pytest.fixture
def parts(tiny_llama_dir: Path):
    vit, lm = _vit(), imagefm.load(tiny_llama_dir)
    ids = torch.tensor([lm.tokenizer.pieces("the dog runs a small cat")])
    with torch.no_grad():
        text_logits = lm(ids).logits
    model = compose_qwen_vl(vit, lm, min_pixels=8 * 8, max_pixels=32 * 32)
    return vit, model, ids, text_logits


def test_compose_keeps_the_lm_and_the_tower(parts) -> None:
    vit, model, ids, text_logits = parts
    lm = model.lm.config
    assert (lm.model_type, lm.qkv_bias, lm.mrope_section) == ("qwen2", True, (1, 1, 2))
    # On text alone the Qwen2 decoder with zero q/k/v biases and M-RoPE is the Llama it came from.
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    vocab = text_logits.shape[-1]
    torch.testing.assert_close(logits[..., :vocab], text_logits, atol=1e-5, rtol=1e-5)
    for name in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"):
        assert model.tokenizer.token_to_id(name) >= vocab
    # The patch embedding of two identical frames is the ViT's 2-D patch embedding.
    processor = QwenVLProcessor.for_model(model)
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    batch = processor.image_processor([image])
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 24 // PATCH, 40 // PATCH]]
    with torch.no_grad():
        ours = model.vision.patch_embed(batch["pixel_values"])
        pixels = torch.from_numpy(processor.image_processor.patchify(image)[0])
        conv = vit.patch_embed(_unpatchify(pixels, grid, model.config.merge_size))[0]
    rows, cols = patch_positions(grid, model.config.merge_size).T
    torch.testing.assert_close(ours, conv[:, rows, cols].T, atol=1e-5, rtol=1e-5)
    for key, value in vit.transformer.blocks.state_dict().items():
        torch.testing.assert_close(model.vision.blocks.state_dict()[key], value)


def _unpatchify(rows: torch.Tensor, grid: torch.Tensor, merge: int) -> torch.Tensor:
    """The normalised image [1, C, H, W] of one image's patch rows (first frame)."""
    _, gh, gw = grid[0].tolist()
    x = rows.view(gh // merge, gw // merge, merge, merge, 3, 2, PATCH, PATCH)[:, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6)  # C, gh/m, m, P, gw/m, m, P
    return x.reshape(1, 3, gh * PATCH, gw * PATCH)


def test_composed_model_round_trips_and_exports(parts, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from imagefm.convert.qwen2_vl import export_qwen2_vl

    _, model, _, _ = parts
    processor = QwenVLProcessor.for_model(model)
    image = np.random.default_rng(1).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    batch = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "a small cat"}]}])
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 4 * 8 // 4
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        reloaded = imagefm.load(tmp_path / "ours")(**batch).logits
    torch.testing.assert_close(reloaded, expected)
    export_qwen2_vl(model, tmp_path / "hf")
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(**batch).logits
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-4)


def test_native_synthetic_batches(parts) -> None:
    from imagefm.data.synthetic.generator import make_record
    from imagefm.train.conversations import codec_for
    from imagefm.train.vlm_native import NativeSyntheticConversations

    _, model, _, _ = parts
    source = NativeSyntheticConversations(codec_for(model), batch_size=4, kind="mixed",
                                          qa_per_image=1, sizes=(16, 24, 32),
                                          examples_per_epoch=12, seed=3)
    batches = list(source(0))
    assert len(batches) == 3 and source.skipped == 0
    tokenizer, image_id = model.tokenizer, model.config.image_token_id
    seen = set()
    for b, batch in enumerate(batches):
        grids = batch["image_grid_thw"].tolist()
        assert batch["pixel_values"].shape[0] == sum(t * h * w for t, h, w in grids)
        for row, (t, h, w) in enumerate(grids):
            index = 4 * b + row
            height, width = source.size(index)
            seen.add((height, width))
            assert (t, h, w) == (1, height // PATCH, width // PATCH)
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            assert int((ids == image_id).sum()) == h * w // 4
            # The same scene and text as the LLaVA recipe's sample, and labels on the reply only.
            record = make_record("vqa", index, seed=3, image_size=64, split="train",
                                 qa_per_image=1, langs=("en", "ko"))
            reply = (record.conversation[1].content if index % 2 else
                     record.captions_in(("en", "ko")[(index // 2) % 2])[0])
            learned = tokenizer.decode(ids[labels != IGNORE_INDEX].tolist())
            assert learned.replace("<|im_end|>", "") == reply
    assert len(seen) > 2  # sizes vary: each image brings its own number of tokens


def test_non_square_scenes_keep_their_layout() -> None:
    from imagefm.data.synthetic.scenes import SceneObject, SceneSpec, render_scene

    spec = SceneSpec("single", (SceneObject("circle", "red", "large", x=0.27, y=0.73),),
                     region="left")
    square = np.asarray(render_scene(spec, 64))
    assert np.array_equal(square, np.asarray(render_scene(spec, 64, height=64)))
    wide = np.asarray(render_scene(spec, 96, height=48)).astype(int)
    assert wide.shape == (48, 96, 3)
    ys, xs = np.nonzero(np.abs(wide - wide[0, -1]).sum(-1) > 60)
    assert abs(xs.mean() / 96 - 0.27) < 0.02 and abs(ys.mean() / 48 - 0.73) < 0.02
    # Not stretched: as wide as it is high (radius from the shorter side).
    assert abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 1
