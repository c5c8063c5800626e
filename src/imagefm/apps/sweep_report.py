"""The report of a sweep: ``report.md``, ``best.yaml`` and PNG plots, read from the study alone
(so any machine sharing the study can write it, while trials still run elsewhere).

Plots are drawn on matplotlib's Agg canvas as :mod:`imagefm.eval.report` draws (no pyplot, no
global backend); the parameter importances are Optuna's PED-ANOVA numbers (no scikit-learn).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.ticker import MaxNLocator
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from imagefm.checkpoint import atomic_write, atomic_write_text
from imagefm.eval.report import _markdown_table, _new_figure
from imagefm.train.config import TrainConfig, set_dotted


def write_report(study: optuna.Study, out: str | Path) -> Path:
    """Write ``out/report.md`` (+ plots, + ``best.yaml`` once a trial completed); return it."""
    out = Path(out)
    trials = study.get_trials(deepcopy=False)
    metric = study.user_attrs.get("metric", "value")
    direction = study.direction.name.lower()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    states = {s: sum(t.state == s for t in trials) for s in TrialState}
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    varying = [k for k in keys if len({repr(t.params.get(k)) for t in complete}) > 1]
    lines = [f"# Sweep `{study.study_name}`", "",
             f"Metric `{metric}` ({direction}); {len(trials)} trials: "
             f"{states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, "
             f"{states[TrialState.FAIL]} failed, {states[TrialState.RUNNING]} running.", ""]
    if complete:
        best = study.best_trial
        lines += [f"## Best: trial {best.number}, {metric} = {best.value:.6g}", "",
                  _markdown_table(["parameter", "value"],
                                  [[k, _format(v)] for k, v in best.params.items()]), ""]
        if "config" in best.user_attrs:
            write_best_config(best, out / "best.yaml", out)
            lines += ["Its full config: [best.yaml](best.yaml) (trains into `best/` beside this "
                      "report: `imagefm train best.yaml`).", ""]
    else:
        lines += ["No trial has completed yet.", ""]

    plots = [("Optimisation history", "history.png", plot_history(trials, metric, direction,
                                                                  out / "history.png")),
             ("Evaluations during training", "curves.png",
              plot_curves(trials, metric, out / "curves.png"))]
    if len(complete) >= 2 and varying:
        plots.append(("Parameter importances (PED-ANOVA)", "importances.png",
                      plot_importances(study, varying, out / "importances.png")))
        plots.append(("Parallel coordinates (completed trials)", "parallel.png",
                      plot_parallel(complete, varying, metric, direction,
                                    out / "parallel.png")))
    for title, name, made in plots:
        lines += [f"## {title}", "", f"![{title}]({name})" if made else "(not enough data)", ""]

    header = ["trial", "state", metric, "last step", *keys, "seconds"]
    retries = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    rows = [[str(t.number), _state(t, retries.get(t.number)), _value(t), _last_step(t),
             *[_format(t.params.get(k, "")) for k in keys],
             f"{t.duration.total_seconds():.1f}" if t.duration else ""] for t in trials]
    lines += ["## Trials", "", _markdown_table(header, rows), ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def write_best_config(trial: FrozenTrial, path: Path, out: Path) -> Path:
    """The trial's full config, renamed to train into ``out/best`` from scratch."""
    data = dict(trial.user_attrs["config"])
    for key, value in (("run.output_dir", str(out)), ("run.name", "best"),
                       ("run.resume", False)):
        set_dotted(data, key, value)
    return atomic_write_text(path, TrainConfig.from_dict(data).to_yaml())


# --- table cells ---------------------------------------------------------------------------------

def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _state(trial: FrozenTrial, retried_as: int | None) -> str:
    state = trial.state.name.lower()
    reason = trial.user_attrs.get("failure") or trial.user_attrs.get("config_error")
    if retried_as is not None:
        reason = f"its process ended before it did; retried as trial {retried_as}"
    if "retry_of" in trial.user_attrs:
        state += f" (retry of {trial.user_attrs['retry_of']})"
    return f"{state}: {reason}" if reason else state


def _last(trial: FrozenTrial) -> tuple[int, float] | None:
    if not trial.intermediate_values:
        return None
    step = max(trial.intermediate_values)
    return step, trial.intermediate_values[step]


def _value(trial: FrozenTrial) -> str:
    if trial.value is not None:
        return f"{trial.value:.6g}"
    last = _last(trial)
    return f"({last[1]:.6g})" if last else ""


def _last_step(trial: FrozenTrial) -> str:
    last = _last(trial)
    return str(last[0]) if last else ""


# --- plots ---------------------------------------------------------------------------------------

def _save(figure: Any, path: Path) -> bool:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return True


def plot_history(trials: list[FrozenTrial], metric: str, direction: str, path: Path) -> bool:
    """Each trial's value (pruned: its last evaluation, grey) and the best so far."""
    done = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE]
    pruned = [(t.number, _last(t)[1]) for t in trials
              if t.state == TrialState.PRUNED and _last(t) is not None]
    if not done and not pruned:
        return False
    figure = _new_figure(7.0, 4.0)
    ax = figure.add_subplot()
    if pruned:
        ax.scatter(*zip(*pruned, strict=True), marker="x", color="grey",
                   label="pruned (last evaluation)")
    if done:
        ax.scatter(*zip(*done, strict=True), color="tab:blue", label="complete")
        pick = min if direction == "minimize" else max
        best = [pick(v for _, v in done[:i + 1]) for i in range(len(done))]
        ax.step([n for n, _ in done], best, where="post", color="tab:red", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_curves(trials: list[FrozenTrial], metric: str, path: Path) -> bool:
    """The metric at each evaluation of each trial (what the pruner compared)."""
    curves = [t for t in trials if t.intermediate_values]
    if not curves:
        return False
    figure = _new_figure(7.0, 4.0)
    ax = figure.add_subplot()
    for trial in curves:
        steps = sorted(trial.intermediate_values)
        pruned = trial.state == TrialState.PRUNED
        ax.plot(steps, [trial.intermediate_values[s] for s in steps], marker=".",
                linestyle="--" if pruned else "-", alpha=0.6 if pruned else 0.9,
                label=f"{trial.number}{' (pruned)' if pruned else ''}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if len(curves) <= 12:
        ax.legend(title="trial", fontsize=7)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_importances(study: optuna.Study, keys: list[str], path: Path) -> bool:
    """How much of the metric's variation each parameter explains (Optuna's PED-ANOVA)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=keys)
    except (ValueError, RuntimeError, ZeroDivisionError):  # too few distinct trials
        return False
    names = list(importances)[::-1]  # the most important at the top
    figure = _new_figure(7.0, 1.0 + 0.45 * len(names))
    ax = figure.add_subplot()
    bars = ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xlabel("importance")
    ax.set_xlim(0, 1.15)
    return _save(figure, path)


def plot_parallel(trials: list[FrozenTrial], keys: list[str], metric: str, direction: str,
                  path: Path) -> bool:
    """One line per trial through every varying parameter (log scales where sampled on one,
    choices in order) to the metric; brighter is better."""
    import matplotlib

    columns, labels = [], []
    for key in keys:
        dist = next(t.distributions[key] for t in trials if key in t.distributions)
        values = [t.params.get(key) for t in trials]
        if isinstance(dist, CategoricalDistribution):
            raw = [float(dist.choices.index(v)) if v in dist.choices else math.nan
                   for v in values]
            ends = (str(dist.choices[0]), str(dist.choices[-1]))
            low, high = 0.0, float(max(len(dist.choices) - 1, 1))
        else:
            log = getattr(dist, "log", False)
            raw = [math.log10(v) if log else float(v) for v in values]
            low, high = min(raw), max(raw)
            ends = (_format(min(values)), _format(max(values)))
        columns.append(_scaled(raw, low, high))
        labels.append((key, ends))
    scores = [float(t.value) for t in trials]
    columns.append(_scaled(scores, min(scores), max(scores)))
    labels.append((metric, (_format(min(scores)), _format(max(scores)))))
    goodness = _scaled(scores, min(scores), max(scores))
    if direction == "minimize":
        goodness = 1 - goodness
    figure = _new_figure(max(6.0, 2.2 * len(columns)), 4.5)
    ax = figure.add_subplot()
    colours = matplotlib.colormaps["viridis"]
    xs = np.arange(len(columns))
    for i in np.argsort(goodness):  # the best drawn last, on top
        ax.plot(xs, [column[i] for column in columns], color=colours(goodness[i]), alpha=0.8)
    for x, (_, (bottom, top)) in zip(xs, labels, strict=True):
        ax.axvline(x, color="black", linewidth=0.8)
        ax.text(x, -0.06, bottom, ha="center", va="top", fontsize=8)
        ax.text(x, 1.06, top, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [name for name, _ in labels], fontsize=8)
    ax.tick_params(axis="x", pad=18)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return _save(figure, path)


def _scaled(values: list[float], low: float, high: float) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if high <= low:
        return np.full_like(array, 0.5)
    return (array - low) / (high - low)
