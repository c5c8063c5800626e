"""Reports of adaptation runs: ``results.json``, ``report.md`` and PNG plots.

* ``accuracy_vs_shots.png``: test accuracy against shots per class, one line per method, the
  zero-shot accuracy dashed and full-data results dotted; with a second domain (``also_top1``,
  ``imagefm adapt --also-test``) a second panel shows its accuracy the same way;
* ``wise_ft.png``: WiSE-FT's validation curve (target vs reference accuracy over α);
* tables: accuracy by shots, training time and trained parameters, the forgetting check;
* anomaly runs: image- and pixel-level AUROC per category, and anomaly-map PNGs.

Plots use matplotlib's Agg canvas as :mod:`imagefm.eval.report` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imagefm.checkpoint import atomic_write_text
from imagefm.eval.report import _markdown_table, _new_figure


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _shots_label(shots: int | None) -> str:
    return "all" if shots is None else str(shots)


def _has_second_domain(results: Sequence[dict[str, Any]]) -> bool:
    return any(r.get("also_top1") is not None for r in results)


def _plot_panel(ax: Any, results: Sequence[dict[str, Any]], key: str, title: str) -> None:
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    methods = [m for m in dict.fromkeys(r["method"] for r in results) if m != "zeroshot"]
    shot_values = sorted({r["shots"] for r in results if r["shots"]})
    for i, method in enumerate(methods):
        rows = sorted((r for r in results if r["method"] == method and r["shots"]),
                      key=lambda r: r["shots"])
        if rows:
            ax.plot([r["shots"] for r in rows], [100 * r[key] for r in rows], marker="o",
                    label=method, color=colours(i % 10))
        for r in results:
            if r["method"] == method and r["shots"] is None:
                ax.axhline(100 * r[key], color=colours(i % 10), linestyle=":",
                           label=f"{method} (all data)")
    for r in results:
        if r["method"] == "zeroshot":
            ax.axhline(100 * r[key], color="black", linestyle="--", label="zero-shot")
            break
    if shot_values:
        ax.set_xscale("log", base=2)
        ax.set_xticks(shot_values, [str(s) for s in shot_values])
    ax.set_xlabel("training images per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_shots(results: Sequence[dict[str, Any]], path: str | Path,
               title: str = "Accuracy vs shots",
               domains: tuple[str, str] = ("test", "second domain")) -> Path:
    """Accuracy against shots; a second panel for the second domain when results have one."""
    second = _has_second_domain(results)
    figure = _new_figure(13.0 if second else 9.0, 4.5)
    axes = figure.subplots(1, 2 if second else 1, sharey=True, squeeze=False)[0]
    _plot_panel(axes[0], results, "top1", f"{title}: {domains[0]}" if second else title)
    if second:
        _plot_panel(axes[1], results, "also_top1", f"{title}: {domains[1]}")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_wise(curve: Sequence[dict[str, Any]], path: str | Path, chosen: float) -> Path:
    """Reference vs target validation accuracy along α (α labelled at each point)."""
    figure = _new_figure(5.5, 4.5)
    ax = figure.add_subplot()
    xs = [100 * c["reference"] for c in curve]
    ys = [100 * c["target"] for c in curve]
    ax.plot(xs, ys, marker="o")
    for c, x, y in zip(curve, xs, ys, strict=True):
        weight = "bold" if c["alpha"] == chosen else "normal"
        ax.annotate(f"{c['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=8, fontweight=weight)
    ax.set_xlabel("reference zero-shot accuracy (%, validation)")
    ax.set_ylabel("target accuracy (%, validation)")
    ax.set_title(f"WiSE-FT: α from 0 (zero-shot) to 1 (fine-tuned); chosen {chosen:g}")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def _cell(result: dict[str, Any], second: bool) -> str:
    """``62.1`` or, with a second domain, ``62.1 / 40.3`` (test / second domain)."""
    text = _pct(result["top1"])
    return f"{text} / {_pct(result.get('also_top1'))}" if second else text


def _accuracy_table(results: Sequence[dict[str, Any]]) -> str:
    shots = sorted({r["shots"] for r in results if r["shots"]}) + (
        [None] if any(r["shots"] is None for r in results) else [])
    second = _has_second_domain(results)
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        if method == "zeroshot":
            zs = next(r for r in results if r["method"] == method)
            rows.append(["zeroshot"] + [_cell(zs, second)] * len(shots))
            continue
        cells = {r["shots"]: r for r in results if r["method"] == method}
        rows.append([method] + [_cell(cells[s], second) if s in cells else "" for s in shots])
    return _markdown_table(["method"] + [_shots_label(s) for s in shots], rows)


def _chosen(details: dict[str, Any]) -> str:
    keys = ("features", "l2", "alpha", "beta", "best_step", "towers", "rank", "lock",
            "layer_decay", "n_ctx")
    parts = []
    for key in keys:
        if key in details and details[key] is not None:
            value = details[key]
            value = f"{value:g}" if isinstance(value, float) else value
            parts.append(f"{key}={value}")
    return ", ".join(str(p) for p in parts)


def _cost_table(results: Sequence[dict[str, Any]]) -> str:
    rows = [[r["method"], _shots_label(r["shots"]), f"{r['seconds']:.1f}",
             f"{r['trainable_parameters']:,}", _pct(r["val_top1"]), _pct(r["top1"]),
             _chosen(r.get("details", {}))] for r in results]
    return _markdown_table(["method", "shots", "train s", "trained params", "val %", "test %",
                            "chosen on validation"], rows)


def _forgetting_table(results: Sequence[dict[str, Any]]) -> str | None:
    rows = []
    for r in results:
        ref = r.get("reference")
        if not ref:
            continue
        delta = 100 * (ref["after"] - ref["before"])
        rows.append([r["method"], _shots_label(r["shots"]), _pct(r["top1"]),
                     _pct(ref["before"]), _pct(ref["after"]), f"{delta:+.1f}"])
    if not rows:
        return None
    return _markdown_table(["method", "shots", "target test %", "reference before %",
                            "reference after %", "change (points)"], rows)


def write_adapt_report(results: Sequence[dict[str, Any]], out_dir: str | Path,
                       title: str = "Adaptation report", meta: dict[str, Any] | None = None,
                       domains: tuple[str, str] = ("test", "second domain")
                       ) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and plots for classification results.

    ``domains`` names the test set and, for results with ``also_top1``, the second domain.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    atomic_write_text(paths["json"], json.dumps({"meta": meta or {}, "results": list(results)},
                                                indent=2, ensure_ascii=False) + "\n")
    lines = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in (meta or {}).items()] + [""]
    lines += ["## Test accuracy (%) by training images per class", ""]
    if _has_second_domain(results):
        lines += [f"Each cell: {domains[0]} / {domains[1]} (the second domain's images of the "
                  "experiment's classes; nothing of it is trained on).", ""]
    lines += [_accuracy_table(results), ""]
    if any(r["shots"] for r in results) or any(r["shots"] is None for r in results):
        paths["shots"] = plot_shots(results, out / "accuracy_vs_shots.png", title, domains)
        lines += ["![accuracy vs shots](accuracy_vs_shots.png)", ""]
    lines += ["## Cost and choices", "",
              "Training time is wall-clock on the machine named above, image features cached "
              "beforehand; *trained params* counts the numbers the method learns (Tip-Adapter "
              "learns none: its cache is the training features).", "", _cost_table(results), ""]
    forgetting = _forgetting_table(results)
    lines += ["## Forgetting check", ""]
    if forgetting:
        lines += ["Zero-shot accuracy on the reference set (test part) before and after the "
                  "weights changed. Methods not listed leave the model's weights untouched (a "
                  "separate head or prompt): nothing to forget.", "", forgetting, ""]
    else:
        lines += ["No weight-changing method ran with a reference set (`--reference`).", ""]
    wise = [r for r in results if r["method"] == "wise-ft"]
    for r in wise:
        curve = r["details"].get("wise_curve") or []
        if curve and all(c.get("reference") is not None for c in curve):
            name = f"wise_ft_{_shots_label(r['shots'])}.png"
            paths[name] = plot_wise(curve, out / name, r["details"]["alpha"])
            rows = [[f"{c['alpha']:g}", _pct(c["target"]), _pct(c["reference"])] for c in curve]
            lines += [f"### WiSE-FT at {_shots_label(r['shots'])} shots (validation)", "",
                      _markdown_table(["α", "target %", "reference %"], rows), "",
                      f"![WiSE-FT curve]({name})", ""]
    atomic_write_text(paths["markdown"], "\n".join(lines))
    return paths


# ------------------------------------------------------------------ anomaly detection
def save_anomaly_maps(images: Sequence[Any], masks: Sequence[Any], maps: dict[str, Any],
                      path: str | Path, title: str = "") -> Path:
    """A grid: one row per image — the image, its ground-truth mask, then each method's map."""
    import numpy as np

    n, columns = len(images), 2 + len(maps)
    figure = _new_figure(1.8 * columns, 1.8 * n + (0.4 if title else 0))
    # One colour scale per method across the rows, so a normal image looks calm next to a
    # defective one instead of being stretched to its own range.
    ranges = {name: (float(np.min(values)), float(np.max(values)))
              for name, values in maps.items()}
    for row in range(n):
        panels = [("image", np.asarray(images[row]), None, (None, None)),
                  ("ground truth", masks[row], "gray", (0, 1))]
        panels += [(name, values[row], "jet", ranges[name]) for name, values in maps.items()]
        for col, (label, panel, cmap, (low, high)) in enumerate(panels):
            ax = figure.add_subplot(n, columns, row * columns + col + 1)
            ax.imshow(panel, cmap=cmap, vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def write_anomaly_report(results: Sequence[dict[str, Any]], out_dir: str | Path,
                         meta: dict[str, Any] | None = None, maps: Sequence[str] = ()
                         ) -> dict[str, Path]:
    """``results``: ``{category, method, shots, image_auroc, pixel_auroc}`` rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    atomic_write_text(paths["json"], json.dumps({"meta": meta or {}, "results": list(results)},
                                                indent=2, ensure_ascii=False) + "\n")

    def fmt(value: float | None) -> str:
        return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}"

    lines = ["# Anomaly detection report", ""]
    lines += [f"- **{k}**: {v}" for k, v in (meta or {}).items()] + [""]
    lines += ["AUROC in percent (50 = chance). Image level: is the image defective? Pixel level: "
              "is the pixel part of the defect (every pixel of every test image)?", "",
              _markdown_table(["category", "method", "normal shots", "image AUROC",
                               "pixel AUROC"],
                              [[r["category"], r["method"], str(r["shots"]),
                                fmt(r["image_auroc"]), fmt(r["pixel_auroc"])]
                               for r in results]), ""]
    for name in maps:
        lines += [f"![anomaly maps]({name})", ""]
    atomic_write_text(paths["markdown"], "\n".join(lines))
    return paths
