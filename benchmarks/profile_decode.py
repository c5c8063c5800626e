"""Where each microsecond of a quantised decoding step goes: SmolLM2-135M's Q4_1 GGUF file (or
``--model``), greedy, through ``generate_tokens`` and through its parts, interleaved over
``--repeats`` runs (medians).

    python benchmarks/profile_decode.py --threads 1

Rows: the C step's parts as the fused kernel times them (``fused_decode.kernel_profile``: norms,
products by layer type, attention, head; the C call alone, its arguments prepared once), the
Python around the C call (``FusedDecoder.step`` with a C call that returns at once: rotary
table, cache pointers), token picking (``TokenPicker``: argmax, end-token checks) and the rest of
``generate_tokens``' loop (run with steps that return fixed logits). Each part is timed on its
own, so their sum is set against the measured ``generate_tokens`` time per token.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch
from bench_generate import smollm2_path  # (benchmarks/ is the script's directory)

from imagefm.convert.gguf import load_gguf
from imagefm.models import fused_decode
from imagefm.models.generation import TokenPicker, generate_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_gguf(args.model or smollm2_path(), keep_quantized=True)
    decoder = fused_decode.fused_decoder(model)
    if decoder is None:
        raise SystemExit(f"no fused step: {fused_decode.why_not_fused(model)}")
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0))
    steps = args.new_tokens - 1

    def prefilled() -> object:
        cache = model.new_cache(1, args.prompt_tokens + args.new_tokens)
        model(ids, cache=cache, logits_to_keep=1)
        return cache

    def through_generate() -> float:
        first = None
        for _ in generate_tokens(model, ids, max_new_tokens=args.new_tokens, eos_token_id=[]):
            first = first or time.perf_counter()
        return (time.perf_counter() - first) / steps

    @torch.inference_mode()
    def c_alone() -> float:  # the same call step() makes, its arguments prepared once
        cache, library = prefilled(), fused_decode.fused_kernel()
        rows = (fused_decode.Cache * 1)()
        decoder._row(rows[0], cache, 0, 0)
        cos, sin = (t.contiguous() for t in decoder.rotary(
            torch.tensor([[args.prompt_tokens]]), torch.float32, args.prompt_tokens + 1))
        token, logits = torch.tensor([5]), torch.empty(1, model.config.vocab_size)
        start = time.perf_counter()
        for i in range(steps):
            rows[0].length = args.prompt_tokens + i
            library.fused_decode_step(ctypes.byref(decoder.spec), 1, token.data_ptr(), rows,
                                      cos.data_ptr(), sin.data_ptr(), logits.data_ptr(),
                                      args.threads)
        return (time.perf_counter() - start) / steps

    class _NoKernel:  # the Python of a step without its C (the call returns at once)
        @staticmethod
        def fused_decode_step(*args: object) -> None:
            return None

    @torch.inference_mode()
    def python_of_step() -> float:
        cache, token = prefilled(), torch.tensor([5])
        real = fused_decode.fused_kernel
        fused_decode.fused_kernel = _NoKernel
        try:
            start = time.perf_counter()
            for _ in range(steps):
                decoder.step(token, [cache])
                cache.length -= 1
            return (time.perf_counter() - start) / steps
        finally:
            fused_decode.fused_kernel = real

    def loop_of_generate() -> float:  # generate_tokens with steps that return fixed logits
        logits = torch.randn(1, model.config.vocab_size)
        real = fused_decode.FusedDecoder.step_batch
        fused_decode.FusedDecoder.step_batch = lambda *args: logits
        try:
            return through_generate()
        finally:
            fused_decode.FusedDecoder.step_batch = real

    @torch.inference_mode()
    def picking() -> float:
        picker = TokenPicker(model, ids, eos_token_id=[])
        logits = torch.randn(1, model.config.vocab_size)
        start = time.perf_counter()
        for _ in range(steps):
            picker.update(picker.pick(logits))
        return (time.perf_counter() - start) / steps

    runs: dict[str, list[float]] = {"generate": [], "c": [], "python": [], "loop": [],
                                    "pick": []}
    parts: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        runs["generate"].append(through_generate())
        runs["python"].append(python_of_step())
        runs["loop"].append(loop_of_generate())
        fused_decode.kernel_profile(True)
        runs["c"].append(c_alone())
        for name, seconds in fused_decode.kernel_profile(False).items():
            parts.setdefault(name, []).append(seconds / steps)
        runs["pick"].append(picking())
    median = {name: statistics.median(values) for name, values in runs.items()}
    timed = {name: statistics.median(values) for name, values in parts.items()}
    rows = [(f"C: {name}", seconds) for name, seconds in timed.items()]
    rows += [("C: untimed (calls, allocation, embedding row)", median["c"] - sum(timed.values())),
             ("Python around the C call (FusedDecoder.step)", median["python"]),
             ("picking the token (TokenPicker.pick + update)", median["pick"]),
             ("generate_tokens' loop, the rest", median["loop"] - median["pick"])]
    print(f"{model.config.layers} layers, {args.threads} threads, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats (medians)")
    print(f"{'part':50}{'us/token':>10}{'share':>8}")
    for name, seconds in rows:
        print(f"{name:50}{seconds * 1e6:10.0f}{seconds / median['generate']:8.1%}")
    print(f"{'sum of the parts':50}{sum(s for _, s in rows) * 1e6:10.0f}"
          f"{sum(s for _, s in rows) / median['generate']:8.1%}")
    print(f"{'generate_tokens, per token (measured)':50}{median['generate'] * 1e6:10.0f}"
          f"{1:8.1%}   ({1 / median['generate']:.1f} tok/s)")


if __name__ == "__main__":
    main()
