"""Metrics out of a run: JSON lines, a CSV, TensorBoard, Weights & Biases, a training-curve PNG.

    <run_dir>/metrics.jsonl        one JSON object per ``log`` call (the source of truth)
    <run_dir>/metrics.csv          the same numbers as a table, one row per step (below)
    <run_dir>/tensorboard/         event files, only if the `tensorboard` package is importable
    <run_dir>/wandb/               W&B run files with ``wandb="offline"`` or ``"online"``
    <run_dir>/training_curve.png   loss (raw, smoothed, held-out), eval metrics, learning rate

The CSV has one row per logged step and one column per metric name seen so far: ``step``, the
training metrics, then the ``eval/...`` metrics in the order they first appeared. Evaluations
arrive at other steps than training lines (and sometimes at the same step, after it), so:

* a record for a new step is appended as a row (the file is flushed: ``tail -f`` works);
* a record for the step of the last row (an evaluation right after that step's training line)
  is merged into that row, which is rewritten in place;
* a record that brings a new column (the first evaluation, say) rewrites the whole file from
  ``metrics.jsonl`` with the wider header, atomically, so the CSV is a valid table at all
  times. That happens once per new metric name, not once per line. Each process also rebuilds
  it once at its first line (a resumed run starts from what ``metrics.jsonl`` kept).

Cells a row does not have, and non-finite values, are empty (JSON has no NaN; ``metrics.jsonl``
writes them as null).

TensorBoard and W&B names: a metric with a ``/`` keeps its name (``eval/retrieval_r1``), the
others get ``train/`` (``train/loss``). W&B is imported only when asked for, runs in the run
folder (``<run_dir>/wandb``), gets the run config as its config, and keeps one run id per run
folder (``<run_dir>/wandb_run_id``) so that a resumed run continues the same W&B run. Offline
mode needs no network; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later.

(The module is not called ``logging`` so that it never shadows the standard library's.)
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagefm.checkpoint import atomic_write, atomic_write_text
from imagefm.config import ConfigError, check_choice

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
CURVE_FILE = "training_curve.png"
WANDB_ID_FILE = "wandb_run_id"
WANDB_MODES = ("off", "offline", "online")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLogger:
    """Writes metric records on the main process; does nothing elsewhere (``enabled=False``).

    ``log(record)`` takes a dict with ``"step"`` and numbers. ``wandb`` is ``off``,
    ``offline`` or ``online``; ``config`` (a plain dict) becomes the W&B run's config.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 csv: bool = True, wandb: str = "off", wandb_project: str = "imagefm",
                 config: dict[str, Any] | None = None) -> None:
        check_choice("run.wandb", wandb, WANDB_MODES)
        if enabled and wandb != "off" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"run.wandb = {wandb} needs the wandb package: pip install "
                              "'imagefm[track]' (or pip install wandb), or set run.wandb=off")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self._csv = CsvTable(self.run_dir / CSV_FILE) if enabled and csv else None
        self._writer = _tensorboard_writer(self.run_dir / "tensorboard") if (
            enabled and tensorboard) else None
        # W&B starts at the first line, not here: a run refused before training creates none.
        self._wandb_mode = wandb if enabled else "off"
        self._wandb_project, self._config = wandb_project, config
        self._wandb: Any = None

    def keep_until(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run re-does them)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if self._csv is not None:
            self._csv.rebuild(kept)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        safe = _finite_or_none(record)
        self._file.write(json.dumps(safe) + "\n")
        self._file.flush()  # a killed run keeps every line it logged
        if self._csv is not None:
            self._csv.add(safe, lambda: read_metrics(self.path))
        scalars = {_tag(key): value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float))
                   and not isinstance(value, bool)}
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, record["step"])
        if self._wandb_mode != "off":
            if self._wandb is None:
                self._wandb = self._start_wandb()
            self._wandb.log(scalars, step=int(record["step"]))

    def plot(self) -> Path | None:
        """(Re)draw ``training_curve.png`` from the records so far."""
        if not self.enabled:
            return None
        records = read_metrics(self.path)
        if not records:
            return None
        return plot_training_curve(records, self.run_dir / CURVE_FILE)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._csv is not None:
            self._csv.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def _start_wandb(self) -> Any:
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 lowercase letters/digits
            atomic_write_text(id_file, run_id + "\n")
        return wandb.init(project=self._wandb_project, name=self.run_dir.name, id=run_id,
                          resume="allow", dir=str(self.run_dir), mode=self._wandb_mode,
                          config=self._config or {})


class CsvTable:
    """``metrics.csv``: one row per step, a column per metric name (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = []
        self._file: Any = None
        self._last: dict[str, Any] | None = None  # the last row written, and where it starts
        self._last_offset = 0

    def add(self, record: dict[str, Any], history: Callable[[], list[dict[str, Any]]]) -> None:
        """Write ``record``; ``history()`` gives every record so far (``record`` included) for
        when the file must be rebuilt."""
        last = self._last
        if (self._file is None or not set(record) <= set(self.columns) or last is None
                or record["step"] < last["step"]):
            self.rebuild(history())
        elif record["step"] == last["step"]:
            self._file.seek(self._last_offset)
            self._file.truncate()
            self._write_row({**last, **record})
        else:
            self._file.seek(0, io.SEEK_END)
            self._last_offset = self._file.tell()
            self._write_row(record)

    def rebuild(self, records: list[dict[str, Any]]) -> None:
        """Rewrite the whole file (atomically) from ``records``, merging rows of one step."""
        self.close()
        rows: dict[Any, dict[str, Any]] = {}
        columns: dict[str, None] = {"step": None}
        for record in records:
            rows.setdefault(record.get("step"), {}).update(record)
            columns.update(dict.fromkeys(record))
        self.columns = list(columns)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(self.columns)
        self._last, self._last_offset = None, 0
        for row in rows.values():
            self._last_offset = len(text.getvalue().encode("utf-8"))
            writer.writerow(self._cells(row))
            self._last = row
        atomic_write_text(self.path, text.getvalue())
        self._file = open(self.path, "r+b")  # noqa: SIM115 - kept open between lines

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_row(self, row: dict[str, Any]) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerow(self._cells(row))
        self._file.write(text.getvalue().encode("utf-8"))
        self._file.flush()
        self._last = row

    def _cells(self, row: dict[str, Any]) -> list[Any]:
        return [_cell(row.get(column)) for column in self.columns]


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _tag(key: str) -> str:
    """TensorBoard / W&B name: ``eval/...`` as is, training metrics under ``train/``."""
    return key if "/" in key else f"train/{key}"


# --- the curve -----------------------------------------------------------------------------------

def plot_training_curve(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Draw :func:`training_curve_figure` into a PNG at ``path`` (atomically)."""
    figure = training_curve_figure(records)
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def training_curve_figure(records: list[dict[str, Any]]) -> Any:
    """A matplotlib Figure: loss (raw, exponential moving average, held-out losses), a panel of
    eval metrics when there are any, and the learning rate, against step."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eval_losses, eval_scores = eval_series(records)
    points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    figure = Figure(figsize=(8, 7 if eval_scores else 5), tight_layout=True)
    FigureCanvasAgg(figure)
    if eval_scores:
        loss_axes, eval_axes, lr_axes = figure.subplots(3, 1, sharex=True,
                                                        height_ratios=[3, 2, 1])
    else:
        loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if points:
        steps, losses = zip(*points, strict=True)
        loss_axes.plot(steps, losses, alpha=0.35, label="loss")
        loss_axes.plot(steps, _smooth(losses), label="loss (smoothed)")
    for name, series in eval_losses.items():
        loss_axes.plot(*zip(*series, strict=True), marker="o", markersize=3, label=name)
    if points or eval_losses:
        loss_axes.legend()
    loss_axes.set_ylabel("loss")
    loss_axes.grid(alpha=0.3)
    if eval_scores:
        for name, series in eval_scores.items():
            eval_axes.plot(*zip(*series, strict=True), marker="o", markersize=3, label=name)
        eval_axes.set_ylabel("held-out")
        eval_axes.legend(fontsize="small")
        eval_axes.grid(alpha=0.3)
    lr_points = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    if lr_points:
        lr_axes.plot(*zip(*lr_points, strict=True), color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    return figure


Series = dict[str, list[tuple[float, float]]]


def eval_series(records: list[dict[str, Any]]) -> tuple[Series, Series]:
    """``(losses, scores)``: the ``eval/...`` metrics as ``name -> [(step, value)]``.

    Losses (names ending in ``loss``) share the training loss's axes. Of the other metrics, the
    summaries (``eval/retrieval_r1``) are drawn and the per-language ones
    (``eval/en/i2t_r1``) left to the CSV, unless there are no summaries.
    """
    series: Series = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("eval/") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                series.setdefault(key, []).append((record["step"], value))
    losses = {k: v for k, v in series.items() if k.endswith("loss")}
    scores = {k: v for k, v in series.items() if not k.endswith("loss")}
    summaries = {k: v for k, v in scores.items() if k.count("/") == 1}
    return losses, summaries or scores


def _smooth(values: tuple[float, ...], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))
