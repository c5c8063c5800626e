"""What int8 costs: zero-shot top-1 of an ONNX export's float and int8 graphs, side by side.

    result = compare_int8("export/", suites=["colour", "shape"], n=200)
    result["rows"][0]  # {"name": "colour", "lang": "en", "fp32_top1": .., "int8_top1": ..,
                       #  "delta_top1": int8 - fp32, "n": images}

Both sides run the exported files through onnxruntime
(:class:`imagefm.convert.onnx_runtime.OnnxDualEncoder`) on the same images and prompts, so the
difference is the quantisation alone (the float graph equals the PyTorch model within 1e-5).
By default the synthetic suites of :mod:`imagefm.eval.suites` are the benchmark; ``evaluate``
takes any other ``(model, processor) -> [result with "top1", "name", "lang"]`` (e.g. zero-shot
on labelled shards, as ``imagefm eval --suite zeroshot``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imagefm.convert.onnx_runtime import OnnxDualEncoder
from imagefm.eval.suites import run_suite

Evaluate = Callable[[Any, Any], list[dict[str, Any]]]


def compare_int8(directory: str | Path, *, suites: Sequence[str] = ("colour", "shape"),
                 langs: Sequence[str] = ("en",), n: int = 100, seed: int = 0,
                 batch_size: int = 64, evaluate: Evaluate | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """Zero-shot top-1 of the fp32 and int8 graphs in ``directory`` and their difference.

    Returns ``{"directory", "int8" (the mode), "rows", "mean_delta_top1"}``; each row has the
    suite's ``name`` and ``lang``, ``fp32_top1``, ``int8_top1``, ``delta_top1`` (int8 minus
    fp32) and ``n`` (images scored), or the suite's ``skipped_reason``.
    """
    fp32 = OnnxDualEncoder(directory, threads=threads)
    int8 = OnnxDualEncoder(directory, int8=True, threads=threads)
    processor = fp32.processor()
    if evaluate is None:
        def evaluate(model: Any, processor: Any) -> list[dict[str, Any]]:
            return [run_suite(model, processor, name, lang, n, seed, batch_size=batch_size)
                    for name in suites for lang in langs]

    rows = []
    for a, b in zip(evaluate(fp32, processor), evaluate(int8, processor), strict=True):
        if "skipped_reason" in a or "skipped_reason" in b:
            rows.append({"name": a["name"], "lang": a["lang"],
                         "skipped_reason": a.get("skipped_reason") or b["skipped_reason"]})
            continue
        rows.append({"name": a["name"], "lang": a["lang"], "n": a.get("n"),
                     "fp32_top1": a["top1"], "int8_top1": b["top1"],
                     "delta_top1": b["top1"] - a["top1"]})
    scored = [r["delta_top1"] for r in rows if "delta_top1" in r]
    return {"directory": str(directory), "int8": fp32.meta.get("int8"), "rows": rows,
            "mean_delta_top1": sum(scored) / len(scored) if scored else None}


def format_int8_table(result: dict[str, Any]) -> str:
    """The comparison as a plain-text table, one line per suite and language."""
    lines = [f"{'suite':<24} {'lang':<4} {'fp32':>7} {'int8':>7} {'delta':>7}"]
    for row in result["rows"]:
        name = f"{row['name']:<24} {row['lang']:<4}"
        if "skipped_reason" in row:
            lines.append(f"{name} skipped: {row['skipped_reason']}")
        else:
            lines.append(f"{name} {row['fp32_top1']:>7.3f} {row['int8_top1']:>7.3f} "
                         f"{row['delta_top1']:>+7.3f}")
    if result["mean_delta_top1"] is not None:
        lines.append(f"mean top-1 change with int8 ({result['int8']}): "
                     f"{result['mean_delta_top1']:+.4f}")
    return "\n".join(lines)
