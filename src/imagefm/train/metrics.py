"""Metrics out of a run: JSON lines, TensorBoard when it is installed, and a training-curve PNG.

    <run_dir>/metrics.jsonl        one JSON object per logged step (the source of truth)
    <run_dir>/tensorboard/         event files, only if the `tensorboard` package is importable
    <run_dir>/training_curve.png   loss (raw and smoothed) and learning rate against step

(The module is not called ``logging`` so that it never shadows the standard library's.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from imagefm.checkpoint import atomic_write, atomic_write_text

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "training_curve.png"


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
    """Writes metric records on the main process; does nothing elsewhere."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True,
                 tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self._writer = _tensorboard_writer(self.run_dir / "tensorboard") if (
            enabled and tensorboard) else None

    def keep_until(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run re-does them)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._file.write(json.dumps(_finite_or_none(record)) + "\n")
        self._file.flush()  # a killed run keeps every line it logged
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value,
                                                                                         bool):
                    self._writer.add_scalar(f"train/{key}", value, record["step"])

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
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def plot_training_curve(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Loss (raw + exponential moving average) and learning rate against step, as a PNG."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    figure = Figure(figsize=(8, 5), tight_layout=True)
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if points:
        steps, losses = zip(*points, strict=True)
        loss_axes.plot(steps, losses, alpha=0.35, label="loss")
        loss_axes.plot(steps, _smooth(losses), label="loss (smoothed)")
        loss_axes.legend()
    loss_axes.set_ylabel("loss")
    loss_axes.grid(alpha=0.3)
    lr_points = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    if lr_points:
        lr_axes.plot(*zip(*lr_points, strict=True), color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


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
