"""Peak memory and time to load a big decoder in bf16: imagefm.load against transformers.

    python benchmarks/bench_load.py                      # 1.5B-parameter Qwen2-shaped decoder
    python benchmarks/bench_load.py --repeats 3 --dir /tmp/bench-load
    python benchmarks/bench_load.py --preset small       # a 0.1B model, for a quick look

The benchmark writes a synthetic Hugging Face checkpoint (config.json + model.safetensors, random
bf16 weights; written once and reused), then loads it in bf16 with each tool in a fresh Python
process, interleaved (ours, theirs, ours, theirs ...), and reports medians:

* load seconds: the ``load`` call alone (imports excluded);
* peak RSS over the process's RSS before the call (``ru_maxrss`` minus the baseline), as a
  multiple of the checkpoint's bf16 weight bytes. Goal (issue 14): <= 1.3x, and no slower than
  transformers.

transformers is the reference (dev extra); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Qwen2-1.5B's shape (28 layers, 1536 wide, 12 heads / 2 KV heads, 8960 MLP, 151,936 tokens,
# tied embeddings): 1.54 B parameters. ``small``: the same family at ~0.1 B.
PRESETS = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=32000),
}


def write_checkpoint(directory: Path, preset: str) -> int:
    """A Qwen2 causal-LM directory with random bf16 weights; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file

    shape = PRESETS[preset]
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": True, "hidden_act": "silu", "dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, **shape}
    stamp = directory / "bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == config:
        return sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    directory.mkdir(parents=True, exist_ok=True)
    h, m, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * 0.02).to(torch.bfloat16)

    state = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h).bfloat16()}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.q_proj.bias": rand(h),
            p + "self_attn.k_proj.weight": rand(kv, h), p + "self_attn.k_proj.bias": rand(kv),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.v_proj.bias": rand(kv),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h),
            p + "mlp.down_proj.weight": rand(h, m),
            p + "input_layernorm.weight": torch.ones(h).bfloat16(),
            p + "post_attention_layernorm.weight": torch.ones(h).bfloat16()})
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    stamp.write_text(json.dumps(config))
    return sum(t.numel() * t.element_size() for t in state.values())


# One measurement, run in a fresh interpreter: imports first, then RSS baseline, then the load.
_CHILD = r"""
import json, resource, sys, time
tool, path = sys.argv[1], sys.argv[2]
import torch
if tool == "imagefm":
    import imagefm
    import imagefm.loading, imagefm.convert.llama  # imports outside the timed call
    load = lambda: imagefm.load(path, dtype="bfloat16")
else:
    import transformers
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
base = rss_kib()
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
params = sum(p.numel() for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"seconds": seconds, "peak_over_base_bytes": (peak - base) * 1024,
                  "peak_bytes": peak * 1024, "params": params, "dtypes": dtypes}))
"""


def measure(tool: str, directory: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, tool, str(directory)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.5b")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/imagefm-bench-load"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    directory = args.dir / args.preset
    started = time.perf_counter()
    weight_bytes = write_checkpoint(directory, args.preset)
    print(f"checkpoint: {directory} ({weight_bytes / 1e9:.2f} GB of bf16 weights, written or "
          f"reused in {time.perf_counter() - started:.0f} s)")
    runs: dict[str, list[dict]] = {"imagefm": [], "transformers": []}
    for repeat in range(args.repeats):
        for tool in ("imagefm", "transformers") if repeat % 2 == 0 else ("transformers",
                                                                         "imagefm"):
            result = measure(tool, directory)
            runs[tool].append(result)
            print(f"  run {repeat + 1} {tool:<12} {result['seconds']:6.2f} s  peak +"
                  f"{result['peak_over_base_bytes'] / 1e9:5.2f} GB "
                  f"({result['peak_over_base_bytes'] / weight_bytes:.2f}x weights)  "
                  f"{result['params'] / 1e9:.2f} B params {result['dtypes']}", flush=True)
    print(f"\nmedians over {args.repeats} runs (weights {weight_bytes / 1e9:.2f} GB bf16):")
    med = {}
    for tool, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak_over_base_bytes"] for r in results)
        med[tool] = (seconds, peak)
        print(f"  {tool:<12} load {seconds:6.2f} s   peak RSS over baseline "
              f"{peak / 1e9:5.2f} GB = {peak / weight_bytes:.2f}x the bf16 weights")
    ours, theirs = med["imagefm"], med["transformers"]
    print(f"  imagefm / transformers: time {ours[0] / theirs[0]:.2f}x, "
          f"peak memory {ours[1] / theirs[1]:.2f}x")


if __name__ == "__main__":
    main()
