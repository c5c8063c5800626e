"""The metrics logger: JSON lines, a CSV that stays a valid table as eval columns appear,
TensorBoard events, W&B offline runs in the run folder, and the curve's eval panel."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import pytest

from imagefm.config import ConfigError
from imagefm.train.metrics import (
    CSV_FILE,
    WANDB_ID_FILE,
    MetricsLogger,
    read_metrics,
    training_curve_figure,
)


def train_record(step: int) -> dict:
    return {"step": step, "loss": 3.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5 + step}


def eval_record(step: int) -> dict:
    return {"step": step, "eval/loss": 2.0 / step, "eval/retrieval_r1": 0.1 * step,
            "eval/en/i2t_r1": 0.05 * step, "eval/zeroshot_top1": 0.2}


def expected_table(records: list[dict]) -> tuple[list[str], dict]:
    """What the CSV must hold: records merged by step, columns in first-seen order."""
    columns: list[str] = []
    rows: dict = {}
    for record in records:
        rows.setdefault(record["step"], {}).update(record)
        columns += [key for key in record if key not in columns]
    return columns, rows


def check_csv(path: Path, records: list[dict]) -> None:
    columns, rows = expected_table(records)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == columns
        got = list(reader)
    assert [int(row["step"]) for row in got] == list(rows)
    for row in got:
        want = rows[int(row["step"])]
        for column in columns:
            value = want.get(column)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                assert row[column] == "", (column, row)
            else:
                assert float(row[column]) == pytest.approx(value, rel=1e-12), (column, row)


def test_the_csv_is_a_valid_table_after_every_line(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logged: list[dict] = []
    nan_step = {**train_record(5), "loss": math.nan}
    # Train lines, an evaluation at the same step as a line (merged into its row) and at a
    # step of its own, a new training metric later on, a non-finite value.
    for record in [train_record(1), train_record(2), eval_record(2), train_record(3),
                   eval_record(4), train_record(4), nan_step, {**train_record(6), "extra": 7}]:
        logger.log(record)
        logged.append(record)
        check_csv(tmp_path / CSV_FILE, logged)  # readable at every moment, not only at close
    logger.close()
    check_csv(tmp_path / CSV_FILE, logged)
    assert [r["step"] for r in read_metrics(tmp_path)] == [r["step"] for r in logged]
    assert read_metrics(tmp_path)[6]["loss"] is None  # JSON has no NaN
    header = (tmp_path / CSV_FILE).read_text().splitlines()[0]
    assert header == ("step,loss,lr,grad_norm,eval/loss,eval/retrieval_r1,eval/en/i2t_r1,"
                      "eval/zeroshot_top1,extra")


def test_a_resumed_run_continues_the_csv_from_what_was_kept(tmp_path):
    first = MetricsLogger(tmp_path, tensorboard=False)
    records = [train_record(1), train_record(2), eval_record(2), train_record(3),
               eval_record(3)]
    for record in records:
        first.log(record)
    first.close()  # a crash at step 3, the last checkpoint at step 2
    second = MetricsLogger(tmp_path, tensorboard=False)
    second.keep_until(2)
    check_csv(tmp_path / CSV_FILE, records[:3])
    again = [{**train_record(3), "loss": 9.0}, train_record(4)]
    for record in again:
        second.log(record)
    second.close()
    check_csv(tmp_path / CSV_FILE, records[:3] + again)


def test_csv_can_be_turned_off(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, csv=False)
    logger.log(train_record(1))
    logger.close()
    assert not (tmp_path / CSV_FILE).exists() and read_metrics(tmp_path)


def test_tensorboard_events_hold_train_and_eval_scalars(tmp_path):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    logger = MetricsLogger(tmp_path, tensorboard=True, csv=False)
    for record in (train_record(1), train_record(2), eval_record(2)):
        logger.log(record)
    logger.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    reader = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    reader.Reload()
    tags = reader.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/loss", "eval/retrieval_r1"} <= set(tags)
    assert [(e.step, e.value) for e in reader.Scalars("train/loss")] == [
        (1, pytest.approx(3.0)), (2, pytest.approx(1.5))]
    assert [(e.step, e.value) for e in reader.Scalars("eval/retrieval_r1")] == [
        (2, pytest.approx(0.2))]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False, wandb="offline")
    logger.log(train_record(1))
    assert logger.plot() is None
    logger.close()
    assert not (tmp_path / "run").exists()


def test_wandb_is_not_imported_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of it would now fail
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(train_record(1))
    logger.close()
    with pytest.raises(ConfigError, match=r"run.wandb = offline needs the wandb package.*"
                                          r"imagefm\[track\]"):
        MetricsLogger(tmp_path, wandb="offline")


def test_an_unknown_wandb_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="run.wandb = 'yes' is not one of off, offline, online"):
        MetricsLogger(tmp_path, wandb="yes")


def test_wandb_offline_writes_its_run_under_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # Offline, silent, and anything that still tried the network would hit a closed port.
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_DISABLE_GIT": "true",
                       "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, tensorboard=False, wandb="offline", wandb_project="tests",
                           config={"train": {"steps": 3}, "optim": {"lr": 0.001}})
    assert not (run_dir / "wandb").exists()  # nothing starts before the first line
    for record in (train_record(1), train_record(2), eval_record(2), train_record(3)):
        logger.log(record)
    logger.close()
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    folders = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1, list((run_dir / "wandb").iterdir())
    # The run file is a log of protobuf records, whose strings are stored as they are: the
    # run config (as JSON) and the metric names must be in it. wandb's service process closes
    # it a moment after finish() returns, so give it a few seconds.
    run_file = folders[0] / f"run-{run_id}.wandb"
    deadline = time.monotonic() + 20
    while b"eval/retrieval_r1" not in run_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    data = run_file.read_bytes()
    assert b'{"steps":3}' in data and b'{"lr":0.001}' in data
    for name in (b"train/loss", b"train/lr", b"eval/loss", b"eval/retrieval_r1"):
        assert name in data, name


def test_the_curve_gets_an_eval_panel_when_there_are_eval_metrics(tmp_path):
    train = [train_record(step) for step in range(1, 7)]
    plain = training_curve_figure(train)
    assert len(plain.axes) == 2
    records = train[:3] + [eval_record(3)] + train[3:] + [eval_record(6)]
    figure = training_curve_figure(records)
    loss_axes, eval_axes, lr_axes = figure.axes
    assert "eval/loss" in [line.get_label() for line in loss_axes.get_lines()]
    lines = {line.get_label(): line for line in eval_axes.get_lines()}
    # The summaries are drawn; the per-language metrics stay in the CSV.
    assert set(lines) == {"eval/retrieval_r1", "eval/zeroshot_top1"}
    assert list(lines["eval/retrieval_r1"].get_xdata()) == [3, 6]
    assert list(lines["eval/retrieval_r1"].get_ydata()) == pytest.approx([0.3, 0.6])
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for record in records:
        logger.log(record)
    path = logger.plot()
    logger.close()
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
