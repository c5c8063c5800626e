"""``bench_generate.py --vlm qwen2-vl`` (or a Qwen2-VL / Qwen2.5-VL checkpoint): ours
(``imagefm.load``) against transformers' ``Qwen2VLForConditionalGeneration`` on the same HF
checkpoint, image and prompt. Kept apart from bench_generate.py, whose helpers it shares, so that
file stays readable; run it through bench_generate.py (see its docstring)."""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_generate import (  # benchmarks/, beside this file
    QWEN2_VL_NAME,
    _Clock,
    _summarise,
    _weight_megabytes,
)

import imagefm
from imagefm.models.generation import generate_tokens
from imagefm.models.quantized import QuantizedLinear, is_quantized

# --- a Qwen2-VL-architecture model (``--vlm qwen2-vl``) -------------------------------------------

# Qwen2-0.5B's language model (Qwen2-VL-2B has a 1.5B one) and a vision tower of Qwen2-VL's design
# (14-px patches, two frames, 2x2 merger, QuickGELU) scaled down from Qwen2-VL-2B's (1280 wide,
# 32 blocks), so the whole model has ~0.5B parameters: 494 M in the LM, 49 M in the tower.
# Head dim 64 (896 / 14), so the M-RoPE sections are Qwen2-VL's [16, 24, 24] halved.
QWEN2_VL_VISION = dict(depth=8, embed_dim=640, num_heads=10, mlp_ratio=4, hidden_size=896)
QWEN2_VL_TEXT = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     rms_norm_eps=1e-6, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                      "mrope_section": [8, 12, 12]})
QWEN2_VL_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 128)  # <= 128 image tokens
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_VL_PROMPT = "Describe the image."


def _qwen_tokenizer() -> object:
    """A small byte-level BPE with Qwen's special tokens (the speed does not depend on it)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN2_VL_SPECIALS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["You are a helpful assistant.", QWEN2_VL_PROMPT,
                                 "system user assistant"] * 5, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN2_VL_SPECIALS[1:])


def qwen2_vl_checkpoint(directory: Path) -> Path:
    """Write (once) a random Qwen2-VL checkpoint in the Hugging Face layout, by transformers.

    The LM's matrices (embedding included: it is also the tied output head) are rounded to Q8_0
    values, so the quantised run reads exactly the weights the float runs read."""
    import transformers

    done = directory / "model.safetensors"
    if done.is_file():
        return directory
    print(f"writing a random Qwen2-VL checkpoint to {directory} (once)")
    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIALS}
    config = transformers.Qwen2VLConfig(
        vision_config=QWEN2_VL_VISION,
        text_config=dict(QWEN2_VL_TEXT, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        tie_word_embeddings=True, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        lm = model.model.language_model
        for module in [lm.embed_tokens, *(m for m in lm.modules()
                                          if isinstance(m, torch.nn.Linear))]:
            module.weight.copy_(QuantizedLinear.from_float(module.weight, "q8_0").dequantize())
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessor", **QWEN2_VL_PIXELS}))
    partial = directory / "partial"
    model.save_pretrained(partial)  # then moved: a stopped run leaves no half checkpoint
    for path in partial.iterdir():
        path.rename(directory / path.name)
    partial.rmdir()
    return directory


def time_qwen_ours(vlm: torch.nn.Module, batch: dict[str, torch.Tensor], new_tokens: int
                   ) -> tuple[float, float, torch.Tensor]:
    """(seconds to the first token, seconds for the rest, the new tokens). The first token's
    time includes the vision tower, the splice and the M-RoPE positions."""
    start = time.perf_counter()
    first, tokens = None, []
    with torch.inference_mode():
        prompt = vlm.generation_inputs(batch["input_ids"], batch["pixel_values"],
                                       batch["image_grid_thw"])
        for token in generate_tokens(vlm.lm, batch["input_ids"], **prompt,
                                     max_new_tokens=new_tokens, eos_token_id=[]):
            tokens.append(token)
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - start, end - first, torch.stack(tokens, dim=1)


def time_qwen_hf(reference: torch.nn.Module, batch: dict[str, torch.Tensor], new_tokens: int
                 ) -> tuple[float, float, torch.Tensor]:
    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = reference.generate(**batch, do_sample=False, max_new_tokens=new_tokens,
                                 streamer=clock)
    end = time.perf_counter()
    return clock.first - start, end - clock.first, out[:, batch["input_ids"].shape[1]:]


def bench_qwen_vl(args: argparse.Namespace) -> None:
    """Ours (imagefm.load) against transformers' Qwen2VLForConditionalGeneration on the same
    HF checkpoint, image and prompt; the quantised run is the LM in Q8_0 blocks."""
    import transformers
    from PIL import Image

    from imagefm.models.quantized import quantize_model

    if str(args.vlm) == QWEN2_VL_NAME:
        path = qwen2_vl_checkpoint(args.cache_dir / "qwen2-vl-0.5b-random")
        source = "random Qwen2-VL-architecture model"
    else:
        path, source = args.vlm, str(args.vlm)
    dtype = getattr(torch, args.dtype)
    vlm, processor = imagefm.load(path, processor=True)  # float32: quantised from these
    image = Image.open(args.image).convert("RGB")
    batch = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": QWEN2_VL_PROMPT}]}])
    # transformers derives M-RoPE positions only with mm_token_type_ids (1-D ones without them)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                   "pixel_values", "image_grid_thw")}
    ours = {}
    exact = None
    if args.quantize != "none":
        quantized = quantize_model(copy.deepcopy(vlm), args.quantize)
        if is_quantized(quantized):
            lm = vlm.lm
            exact = all(torch.equal(layer.dequantize(), lm.get_submodule(name).weight)
                        for name, layer in quantized.lm.named_modules()
                        if isinstance(layer, QuantizedLinear) and name != "quantized_head")
            ours["imagefm quantized"] = quantized.to(args.device, dtype).eval()
        else:
            print("quantised kernel unavailable: no quantised run")
    ours = {"imagefm": vlm.to(args.device, dtype).eval(), **ours}
    reference = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
    reference.generation_config.eos_token_id = None  # exactly max_new_tokens, as ours
    reference.generation_config.pad_token_id = 0
    batch = {k: v.to(args.device) for k, v in batch.items()}

    runners: dict[str, Callable[[], tuple[float, float, torch.Tensor]]] = {
        name: (lambda m=m: time_qwen_ours(m, batch, args.new_tokens)) for name, m in ours.items()}
    runners["transformers"] = lambda: time_qwen_hf(reference, batch, args.new_tokens)
    # the prompt's last logits, which also warms up (and builds the quantised kernel)
    with torch.inference_mode():
        expected = reference(**batch, logits_to_keep=1).logits[0, -1].float()
        logits_error = {name: float((m(**batch, logits_to_keep=1).logits[0, -1].float()
                                      - expected).abs().max())
                        for name, m in ours.items()}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            ttft, rest, new = run()
            assert new.shape[1] == args.new_tokens, (name, new.shape)
            results[name].append((ttft, rest))
            tokens.setdefault(name, new)
    theirs = tokens["transformers"]
    same = {name: int((tokens[name] == theirs).cumprod(1).sum()) for name in ours}

    grid = batch["image_grid_thw"][0].tolist()
    vision = sum(p.numel() for p in vlm.vision.parameters())
    print(f"model: {source} ({vlm.num_parameters / 1e6:.1f} M parameters: vision "
          f"{vision / 1e6:.1f} M, LM {vlm.lm.num_parameters / 1e6:.1f} M; {args.dtype}, "
          f"{args.device}, {torch.get_num_threads()} threads)")
    print(f"image {args.image.name} {image.width}x{image.height} -> patch grid {grid} "
          f"({vlm.config.image_tokens(tuple(grid))} image tokens); prompt "
          f"{batch['input_ids'].shape[1]} tokens, {args.new_tokens} new tokens, greedy, "
          f"{args.repeats} repeats (median)")
    if "imagefm quantized" in ours:
        print(f"quantised: the LM in {args.quantize} blocks "
              f"({_weight_megabytes(ours['imagefm quantized'].lm):.1f} MB read per token against "
              f"{_weight_megabytes(ours['imagefm'].lm):.1f} MB); its blocks hold exactly the "
              f"float32 weights: {exact}")
    print("greedy tokens equal to transformers' (leading tokens that agree, of "
          f"{args.new_tokens}): " + ", ".join(f"{n} {k}" for n, k in same.items()))
    print(f"prompt's last logits (largest |value| {float(expected.abs().max()):.3f}), largest "
          "difference to transformers': "
          + ", ".join(f"{n} {e:.2e}" for n, e in logits_error.items()))
    print(f"ours' first new tokens: {tokens['imagefm'][0, :8].tolist()}")
    summary, ratios = _summarise(results, args.new_tokens, list(ours))
    if args.json:
        record = {"source": source, "path": str(path), "args": {k: str(v) for k, v in
                                                                 vars(args).items()},
                  "image_grid_thw": grid, "prompt_tokens": batch["input_ids"].shape[1],
                  "quantized_exact": exact, "same_leading_tokens": same,
                  "last_logit_max_difference": logits_error, "results": summary,
                  "speedups": ratios}
        args.json.write_text(json.dumps(record, indent=2))
