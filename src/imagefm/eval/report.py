"""Evaluation reports: ``results.json``, ``report.md`` with tables, and PNG plots.

    paths = write_report(results, "runs/eval")   # results: list of result dicts
    print(format_table(results))                 # a short table for the terminal

Results are the dicts returned by ``run_suite``, ``evaluate_zeroshot`` (``task ==
"classification"``) and ``evaluate_retrieval`` (``task == "retrieval"``). Plots are drawn with
matplotlib's Agg canvas directly (no pyplot, no global backend switch). Korean class names need a
font with Hangul: a Nanum / Noto CJK font is looked up through matplotlib's font manager (and the
fonts the synthetic text renderer finds); without one a warning is given and Hangul shows as
boxes.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Families tried in order for Hangul labels.
HANGUL_FAMILIES = ("NanumGothic", "NanumBarunGothic", "NanumSquare", "Noto Sans CJK KR",
                   "Noto Sans KR", "Noto Serif CJK KR", "Malgun Gothic", "AppleGothic",
                   "UnDotum", "Baekmuk Gulim")
MAX_CONFUSION_CLASSES = 40  # beyond this a confusion matrix plot is unreadable; JSON keeps it
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")


@functools.lru_cache(maxsize=1)
def hangul_font() -> str | None:
    """A font family that has Hangul, registering Nanum fonts matplotlib has not seen; or None."""
    from matplotlib import font_manager

    def installed() -> set[str]:
        return {f.name for f in font_manager.fontManager.ttflist}

    names = installed()
    for family in HANGUL_FAMILIES:
        if family in names:
            return family
    try:  # fonts installed after matplotlib built its cache are not in ttflist yet
        from imagefm.data.synthetic.text_render import find_hangul_fonts

        for path in find_hangul_fonts():
            font_manager.fontManager.addfont(str(path))
    except (ImportError, OSError, RuntimeError):
        pass
    names = installed()
    return next((family for family in HANGUL_FAMILIES if family in names), None)


def _fonts_for(labels: Sequence[str]) -> list[str]:
    """Font family list for these labels: a Hangul font first when any label has Hangul."""
    if not any(_HANGUL.search(str(label)) for label in labels):
        return ["DejaVu Sans"]
    family = hangul_font()
    if family is None:
        warnings.warn("no font with Hangul glyphs found for plots (install fonts-nanum); Korean "
                      "labels will show as boxes", RuntimeWarning, stacklevel=3)
        return ["DejaVu Sans"]
    return [family, "DejaVu Sans"]  # DejaVu catches glyphs the Hangul font lacks


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "result"


def _label(result: dict[str, Any]) -> str:
    return f"{result.get('name', '?')} [{result.get('lang', '?')}]"


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


# ---------------------------------------------------------------- plots
def plot_accuracy(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars: top-1 accuracy per suite/dataset, one bar per language, chance marked."""
    import matplotlib

    names = list(dict.fromkeys(r["name"] for r in results))
    langs = list(dict.fromkeys(r["lang"] for r in results))
    width = 0.8 / len(langs)
    figure = _new_figure(max(6.0, 1.1 * len(names) + 2), 4.0)
    ax = figure.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    for j, lang in enumerate(langs):
        xs, ys = [], []
        for i, name in enumerate(names):
            match = [r for r in results if r["name"] == name and r["lang"] == lang]
            if match:
                xs.append(i + (j - (len(langs) - 1) / 2) * width)
                ys.append(match[0]["top1"])
        bars = ax.bar(xs, ys, width, label=lang, color=colours(j))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    for i, name in enumerate(names):
        chance = next(r["chance"] for r in results if r["name"] == name)
        ax.hlines(chance, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 1.3)  # headroom: the legend sits above full-height bars
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Zero-shot accuracy (dashed: chance)")
    ax.legend(title="language", loc="upper center", ncols=len(langs), frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_confusion(result: dict[str, Any], path: str | Path) -> Path:
    """A confusion matrix, rows normalised to the true class (counts in the JSON)."""
    import numpy as np

    classes = result["classes"]
    counts = np.asarray(result["confusion"], dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.32 * len(classes) + 2.5)
    import matplotlib

    with matplotlib.rc_context({"font.family": _fonts_for(classes)}):
        figure = _new_figure(side + 1, side)
        ax = figure.add_subplot()
        image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{_label(result)}: top-1 {result['top1']:.3f}")
        if len(classes) <= 15:
            for (i, j), value in np.ndenumerate(counts):
                if value:
                    ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        figure.tight_layout()
        figure.savefig(path)
    return Path(path)


def plot_retrieval(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Bars of recall@K per result, image→text and text→image side by side."""
    figure = _new_figure(max(6.0, 3.0 * len(results)), 4.0)
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, result in zip(axes, results, strict=True):
        keys = list(result["image_to_text"])
        for offset, direction in ((-0.2, "image_to_text"), (0.2, "text_to_image")):
            values = [result[direction][k] for k in keys]
            bars = ax.bar([i + offset for i in range(len(keys))], values, 0.4,
                          label=direction.replace("_to_", "→").replace("image", "img")
                          .replace("text", "txt"))
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylim(0, 1.05)
        ax.set_title(_label(result))
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


# ---------------------------------------------------------------- tables
def _pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * value:.1f}"


def _classification_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        extras = ", ".join(f"{k[:-9]} {_pct(v)}" for k, v in r.items()
                           if k.endswith("_accuracy"))
        rows.append([str(r["name"]), str(r["lang"]), str(r["n"]), str(r["num_classes"]),
                     _pct(r["top1"]), _pct(r.get("top5")), _pct(r["mean_per_class"]),
                     _pct(r["chance"]), extras])
    return rows


CLASSIFICATION_HEADER = ["suite / data", "lang", "n", "classes", "top-1", "top-5", "mean/class",
                         "chance", "parts right"]
RETRIEVAL_HEADER = ["data", "lang", "images", "texts", "i→t R@1", "i→t R@5", "i→t R@10",
                    "t→i R@1", "t→i R@5", "t→i R@10"]


def _retrieval_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        recalls = [_pct(r[d].get(f"R@{k}")) for d in ("image_to_text", "text_to_image")
                   for k in (1, 5, 10)]
        rows.append([str(r["name"]), str(r["lang"]), str(r["n_images"]), str(r["n_texts"]),
                     *recalls])
    return rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _split(results: Sequence[dict[str, Any]]) -> tuple[list, list, list]:
    classification = [r for r in results if r.get("task") == "classification"
                      and "skipped_reason" not in r]
    retrieval = [r for r in results if r.get("task") == "retrieval"
                 and "skipped_reason" not in r]
    skipped = [r for r in results if "skipped_reason" in r]
    return classification, retrieval, skipped


def _skip_notes(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per result that skipped inputs: counts by reason and the first example."""
    notes = []
    for r in results:
        counts = r.get("skipped", {}).get("skipped") if isinstance(r.get("skipped"), dict) else None
        if not counts:
            continue
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items())
        examples = [m for ms in r["skipped"].get("examples", {}).values() for m in ms]
        first = f" (e.g. {examples[0]})" if examples else ""
        notes.append(f"{_label(r)}: skipped {reasons}{first}")
    return notes


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text summary table (or two) for the terminal, percentages."""
    classification, retrieval, skipped = _split(results)
    parts = []
    if classification:
        parts.append(_text_table(CLASSIFICATION_HEADER, _classification_rows(classification)))
    if retrieval:
        parts.append(_text_table(RETRIEVAL_HEADER, _retrieval_rows(retrieval)))
    parts += [f"skipped {_label(r)}: {r['skipped_reason']}" for r in skipped]
    parts += _skip_notes(results)
    return "\n\n".join(parts) if parts else "(no results)"


# ---------------------------------------------------------------- the report
def write_report(results: dict[str, Any] | Sequence[dict[str, Any]], out_dir: str | Path,
                 title: str = "Evaluation report", meta: dict[str, Any] | None = None
                 ) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and PNG plots to ``out_dir``; returns their paths.

    Plots: ``accuracy.png`` (top-1 per suite and language), ``confusion_<name>_<lang>.png``
    (classification results with at most 40 classes) and ``retrieval.png``.
    """
    results = [results] if isinstance(results, dict) else list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classification, retrieval, skipped = _split(results)
    paths: dict[str, Path] = {}

    paths["json"] = out / "results.json"
    payload = {"meta": meta or {}, "results": results}
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")

    lines = [f"# {title}", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- **{key}**: {value}")
    if meta:
        lines.append("")
    if classification:
        paths["accuracy"] = plot_accuracy(classification, out / "accuracy.png")
        lines += ["## Zero-shot classification", "",
                  "Percentages; *parts right* = how often the prediction had the right value of "
                  "each attribute.", "",
                  _markdown_table(CLASSIFICATION_HEADER, _classification_rows(classification)),
                  "", "![top-1 accuracy](accuracy.png)", ""]
        for r in classification:
            if len(r["classes"]) > MAX_CONFUSION_CLASSES:
                continue
            name = f"confusion_{_slug(str(r['name']))}_{_slug(str(r['lang']))}.png"
            paths[name[:-4]] = plot_confusion(r, out / name)
            lines += [f"### {_label(r)}", "", f"![confusion matrix]({name})", ""]
    if retrieval:
        paths["retrieval"] = plot_retrieval(retrieval, out / "retrieval.png")
        lines += ["## Retrieval", "", "Recall@K in percent (image→text: any caption of the "
                  "image in the top K; text→image: its image in the top K).", "",
                  _markdown_table(RETRIEVAL_HEADER, _retrieval_rows(retrieval)), "",
                  "![recall](retrieval.png)", ""]
    if skipped:
        lines += ["## Skipped", ""] + [f"- {_label(r)}: {r['skipped_reason']}" for r in skipped]
        lines.append("")
    notes = _skip_notes(results)
    if notes:
        lines += ["## Inputs skipped", "", *[f"- {note}" for note in notes], ""]
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(lines), encoding="utf-8")
    return paths
