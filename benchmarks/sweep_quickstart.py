"""Calibrate the quickstart recipe: run many variants of ``imagefm quickstart`` side by side.

Each variant is the quickstart's own pipeline (``run_quickstart``) with some settings changed,
plus two knobs the quickstart does not expose: ``stem`` (the ViT's patch or conv stem) and
``small_radius`` (the radius of "small" objects as a fraction of the image side). Variants run
in parallel processes (one torch thread and one data worker each), so a GPU machine with many
cores sweeps a grid in minutes; the step counts are what carry over to the CPU, not the times.
Results go to ``OUT/results.jsonl`` and a table on the terminal.

    python benchmarks/sweep_quickstart.py --out /tmp/sweep --device cuda --parallel 16
    python benchmarks/sweep_quickstart.py --out /tmp/sweep --variants base,lr2e-3 --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import time
import traceback
from pathlib import Path
from typing import Any

# The sweep of docs/results.md: the engine's full range of scenes ("varied"), which the quickstart
# stopped using by default because no variant here learned shape in budget.
BASE: dict[str, Any] = {"steps": 700, "batch_size": 128, "lr": 1e-3, "loss": "clip",
                        "group_size": 4, "mixed": 0.2, "samples": 20_000, "scenes": "varied"}
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "lr2e-3": {"lr": 2e-3},
    "lr5e-4": {"lr": 5e-4},
    "steps300": {"steps": 300},
    "steps450": {"steps": 450},
    "steps1000": {"steps": 1000},
    "steps450-lr2e-3": {"steps": 450, "lr": 2e-3},
    "b256x350": {"batch_size": 256, "steps": 350},
    "b256x500": {"batch_size": 256, "steps": 500},
    "b64x1400": {"batch_size": 64, "steps": 1400},
    "group1": {"group_size": 1},
    "group2": {"group_size": 2},
    "group8": {"group_size": 8},
    "mixed0": {"mixed": 0.0},
    "mixed0.5": {"mixed": 0.5},
    "conv": {"stem": "conv"},
    "radius.15": {"small_radius": 0.15},
    "siglip": {"loss": "siglip"},
    "siglip-lr2e-3": {"loss": "siglip", "lr": 2e-3},
    "siglip1000": {"loss": "siglip", "steps": 1000},
    "samples10k": {"samples": 10_000},
    "samples40k": {"samples": 40_000},
    "steps1400": {"steps": 1400},
    "conv1000": {"stem": "conv", "steps": 1000},
}
SUMMARY = [("colour", "en"), ("colour", "ko"), ("shape", "en"), ("shape", "ko"),
           ("heldout", "en"), ("count", "en"), ("relation", "en")]


def apply_knobs(knobs: dict[str, Any]) -> None:
    """Set the knobs the quickstart does not expose (process-wide: one variant per process)."""
    import imagefm.config as config
    from imagefm.data.synthetic import scenes

    if "stem" in knobs:
        tiny = config.PRESETS["tiny"]
        config.PRESETS["tiny"] = dataclasses.replace(
            tiny, vision=dataclasses.replace(tiny.vision, stem=knobs["stem"]))
    if "small_radius" in knobs:
        scenes.SIZE_RADIUS["small"] = knobs["small_radius"]


def run_variant(job: tuple[str, dict[str, Any], str, str, bool]) -> dict[str, Any]:
    name, overrides, out, device, smoke = job
    import torch

    from imagefm.apps.quickstart import QuickstartSettings, run_quickstart

    torch.set_num_threads(1)
    knobs = {k: overrides[k] for k in ("stem", "small_radius") if k in overrides}
    apply_knobs(knobs)
    fields = {**BASE, **{k: v for k, v in overrides.items() if k not in knobs}}
    if smoke:  # check the harness, not the recipe
        fields.update(steps=2, samples=256, batch_size=min(fields["batch_size"], 64))
    settings = QuickstartSettings(out=Path(out) / name, device=device, workers=1, progress=False,
                                  real_data=False, retrieval_images=300,
                                  eval_images=20 if smoke else 300, **fields)
    started = time.perf_counter()
    try:
        result = run_quickstart(settings, log=lambda message: None)
    except Exception:  # one broken variant must not end the sweep
        return {"variant": name, "error": traceback.format_exc(limit=3)}
    row: dict[str, Any] = {"variant": name, **fields, **knobs,
                           "train_s": round(result["timings"]["train_s"], 1),
                           "total_s": round(time.perf_counter() - started, 1)}
    for item in result["results"]:
        key = f"{item.get('suite', item.get('name'))}/{item.get('lang', '')}"
        row[key] = (item["top1"] if "top1" in item
                    else item.get("image_to_text", {}).get("R@1"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="2 steps each: test the harness")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated names of: {', '.join(VARIANTS)}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, VARIANTS[name], str(args.out), args.device, args.smoke)
            for name in args.variants.split(",")]
    results_path = args.out / "results.jsonl"
    with mp.get_context("spawn").Pool(args.parallel) as pool, results_path.open("a") as sink:
        for row in pool.imap_unordered(run_variant, jobs):
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            if "error" in row:
                print(f"{row['variant']}: FAILED\n{row['error']}", flush=True)
                continue
            scores = "  ".join(f"{s}/{lang} {row.get(f'{s}/{lang}', float('nan')):.2f}"
                               for s, lang in SUMMARY)
            print(f"{row['variant']:<16} train {row['train_s']:>6.1f}s  {scores}", flush=True)


if __name__ == "__main__":
    main()
