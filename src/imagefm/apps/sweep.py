"""Hyper-parameter search over a training config with Optuna: one training run per trial.

    study = run_sweep("clip.yaml", ["optim.lr=loguniform:1e-4:3e-3",
                                    "data.batch_size=choice:64,128"],
                      trials=20, metric="eval/zeroshot_top1")

Each trial samples the parameters (TPE, seeded), trains ``<out>/trial-<n>/`` with the Trainer and
reports every evaluation (``eval.every`` steps) to the trial, so the median pruner can stop a run
that is worse than the median of the finished ones at the same step. The trial's value is the
LAST evaluation of the metric (the one at the end of training): it scores the model the run
exports (``final/``), which is what retraining ``best.yaml`` reproduces; the best evaluation of a
run is a maximum over noisy measurements, biased upwards the more often a run is evaluated
(``value="best"`` takes it anyway, for runs that keep their best checkpoint with early stopping).

The study lives in Optuna's RDB storage (default ``sqlite:///<out>/study.db``), so a sweep
resumes where it stopped and several machines can share one study: trials COMPLETE, PRUNED or
failed by divergence count towards ``trials``; a trial left RUNNING by a process that died (on
this machine: its process is gone; elsewhere: its heartbeat is stale) is marked FAIL and run
again once with the same parameters.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from imagefm.apps.sweep_report import write_report
from imagefm.config import ConfigError, check_choice
from imagefm.train import launch
from imagefm.train.config import TrainConfig, load_config, parse_override, set_dotted
from imagefm.train.errors import TrainingError
from imagefm.train.evaluation import resolve_mode
from imagefm.train.launch import EvaluatorFactory

KINDS = ("loguniform", "uniform", "int", "choice")
DIRECTIONS = ("auto", "minimize", "maximize")
PRUNERS = ("median", "none")
VALUES = ("last", "best")
# Set by the sweep for every trial: a parameter may not sweep them.
SWEEP_KEYS = ("run.name", "run.output_dir", "run.resume", "eval.metric", "eval.mode")
# A live trial records a heartbeat this often; one silent for GRACE_S seconds is stale.
HEARTBEAT_S, GRACE_S = 60, 300
PARAM_EXAMPLE = ("write key=loguniform:LOW:HIGH, uniform:LOW:HIGH, int:LOW:HIGH[:log] or "
                 "choice:A,B,C (e.g. optim.lr=loguniform:1e-4:3e-3)")


class TrialFailed(RuntimeError):
    """A trial's training diverged (non-finite loss or metric): recorded as FAIL, counted
    towards the sweep's trials, never retried (the same parameters would diverge again)."""


# --- the search space ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One swept config key and its distribution."""

    key: str
    kind: str  # loguniform | uniform | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def corners(self) -> list[Any]:
        """The values checked against the config before the first trial."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"{self.key}=choice:{','.join(str(c) for c in self.choices)}"
        tail = ":log" if self.kind == "int" and self.log else ""
        return f"{self.key}={self.kind}:{self.low:g}:{self.high:g}{tail}"


def parse_param(text: str) -> Param:
    """``"optim.lr=loguniform:1e-4:3e-3"`` -> ``Param``; ConfigError naming the fix otherwise."""
    key, _ = parse_override(text)  # the same key=value split as config overrides
    spec = text.partition("=")[2].strip()
    kind, _, rest = spec.partition(":")
    where = f"--param {text!r}"
    if kind not in KINDS or not rest:
        raise ConfigError(f"{where}: {PARAM_EXAMPLE}")
    if kind == "choice":
        choices = tuple(parse_override(f"{key}={item}")[1] for item in rest.split(","))
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad or len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choices must be distinct scalars (numbers, words, true/"
                              f"false), e.g. data.batch_size=choice:64,128")
        return Param(key, kind, choices=choices)
    parts = rest.split(":")
    log = kind == "loguniform"
    if kind == "int" and len(parts) == 3 and parts[2] == "log":
        parts, log = parts[:2], True
    if len(parts) != 2:
        raise ConfigError(f"{where}: {PARAM_EXAMPLE}")
    number = int if kind == "int" else float
    try:
        low, high = (number(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{where}: LOW and HIGH must be {number.__name__}s; "
                          f"{PARAM_EXAMPLE}") from None
    if not low < high:
        raise ConfigError(f"{where}: LOW must be below HIGH, got {low} and {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs LOW > 0, got {low}")
    return Param(key, kind, low, high, log)


def direction_for(metric: str, direction: str = "auto") -> str:
    """``minimize``/``maximize``; ``auto`` follows eval.mode's rule (minimise losses)."""
    check_choice("--direction", direction, DIRECTIONS)
    if direction != "auto":
        return direction
    return "minimize" if resolve_mode(metric, "auto") == "min" else "maximize"


# --- configs -------------------------------------------------------------------------------------

def base_config(config: str | Path | TrainConfig | None, overrides: Sequence[str] = ()
                ) -> TrainConfig:
    """The config every trial starts from: a file (+ overrides, ``run.local`` shrink) as
    ``imagefm train`` reads it, or a ``TrainConfig`` (+ overrides)."""
    if not isinstance(config, TrainConfig):
        return load_config(config, list(overrides))
    if not overrides:
        return config
    data = config.to_dict()
    for key, value in map(parse_override, overrides):
        set_dotted(data, key, value)
    return TrainConfig.from_dict(data)


def trial_config(base: TrainConfig, values: dict[str, Any], out: Path, name: str, metric: str,
                 direction: str) -> TrainConfig:
    """``base`` with the sampled ``values``, training into ``out/name``. The Trainer's own
    "best" (eval.keep_best, eval.patience) follows the sweep's metric and direction."""
    data = base.to_dict()
    for key, value in values.items():
        set_dotted(data, key, value)
    settings: list[tuple[str, Any]] = [("run.output_dir", str(out)), ("run.name", name),
                                       ("run.resume", False)]
    if metric.startswith("eval/"):  # eval.metric names evaluation metrics only
        settings += [("eval.metric", metric),
                     ("eval.mode", "min" if direction == "minimize" else "max")]
    for key, value in settings:
        set_dotted(data, key, value)
    config = TrainConfig.from_dict(data)
    if config.eval.every <= 0:
        raise ConfigError("a sweep prunes on evaluations during training: set eval.every to the "
                          "steps between them (e.g. eval.every=100; train.steps / 10 is a fair "
                          "start)")
    return config


def check_params(base: TrainConfig, params: Sequence[Param], metric: str, direction: str) -> None:
    """Refuse a bad search space before any trial: every key a real config key, every end of
    every range (and every choice) a valid value for it."""
    seen: set[str] = set()
    for param in params:
        if param.key in seen:
            raise ConfigError(f"--param {param.key} is given twice")
        seen.add(param.key)
        if param.key in SWEEP_KEYS:
            raise ConfigError(f"--param {param.key}: the sweep sets {param.key} itself for "
                              f"every trial")
        for value in param.corners():
            try:
                trial_config(base, {param.key: value}, Path("."), "check", metric, direction)
            except ConfigError as err:
                raise ConfigError(f"--param {param}: {err}") from None
    trial_config(base, {}, Path("."), "check", metric, direction)  # eval.every etc.


# --- one trial -----------------------------------------------------------------------------------

class ReportToTrial:
    """A Trainer callback: each evaluation's metric goes to the Optuna trial, which may prune."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.history: list[tuple[int, float]] = []

    def on_evaluate(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.metric not in metrics:
            found = sorted(k for k in metrics if k.startswith("eval/")) or sorted(metrics)
            raise ConfigError(f"--metric {self.metric} is not among the evaluation results "
                              f"({', '.join(found) or 'none'}); choose one of them")
        value = float(metrics[self.metric])
        self.history.append((step, value))
        if not math.isfinite(value):
            raise TrialFailed(f"{self.metric} = {value} at step {step}")
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({self.metric} {value:.4g})")


def _describe(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in values.items())


def _objective(base: TrainConfig, params: Sequence[Param], out: Path, metric: str,
               direction: str, value: str, evaluators: EvaluatorFactory | None,
               echo: Callable[[str], None]) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        values = {p.key: p.suggest(trial) for p in params}
        line = f"trial {trial.number:>3}  {_describe(values)}"
        callback = ReportToTrial(trial, metric)
        start = time.perf_counter()
        try:
            config = trial_config(base, values, out, f"trial-{trial.number}", metric, direction)
            if config.run_dir.exists() and any(config.run_dir.iterdir()):
                raise ConfigError(f"{config.run_dir} is left from a sweep whose study is not in "
                                  f"this storage: choose another --out (or --study/--storage), "
                                  f"or remove it")
            trial.set_user_attr("config", config.to_dict())
            launch.run(config, evaluators=evaluators, callbacks=[callback])
            if not callback.history:
                raise ConfigError("the run finished without an evaluation: the Trainer must "
                                  "evaluate at the end of training (eval.every > 0)")
        except optuna.TrialPruned as err:
            echo(f"{line}  {err}  ({time.perf_counter() - start:.1f} s)")
            raise
        except (TrainingError, TrialFailed) as err:
            trial.set_user_attr("failure", str(err))
            echo(f"{line}  failed: {err}  ({time.perf_counter() - start:.1f} s)")
            raise TrialFailed(str(err)) from err
        except ConfigError as err:
            trial.set_user_attr("config_error", str(err))  # not counted, not retried
            raise
        finally:
            _free_memory()
        values_seen = [v for _, v in callback.history]
        better = min if direction == "minimize" else max
        result = values_seen[-1] if value == "last" else better(values_seen)
        echo(f"{line}  {metric} {result:.4g}  ({time.perf_counter() - start:.1f} s)")
        return result

    return objective


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the study -----------------------------------------------------------------------------------

def open_study(name: str, storage: str, direction: str, metric: str, *,
               pruner: str = "median", prune_after: int = 5, seed: int = 0) -> optuna.Study:
    """Create or load study ``name`` in ``storage`` (an SQLAlchemy URL), checking that a loaded
    study follows the same metric in the same direction."""
    check_choice("--pruner", pruner, PRUNERS)
    if "://" not in storage:
        raise ConfigError(f"--storage {storage!r} must be a database URL, e.g. "
                          f"sqlite:///runs/sweep/study.db or postgresql://host/db")
    kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs=kwargs,
                                         heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    chosen = (optuna.pruners.MedianPruner(n_startup_trials=prune_after) if pruner == "median"
              else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=rdb, direction=direction,
                                pruner=chosen, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} in {storage} was created to "
                          f"{study.direction.name.lower()}; use another --study to {direction}")
    before = study.user_attrs.get("metric")
    if before is None:
        study.set_user_attr("metric", metric)
    elif before != metric:
        raise ConfigError(f"study {name!r} in {storage} follows {before}, not {metric}: use "
                          f"--metric {before}, or another --study")
    # Seeded, yet a resumed sweep does not replay the samples it drew before it stopped.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    return study


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial used up one of the sweep's trials."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "failure" in trial.user_attrs)


def recover(study: optuna.Study, echo: Callable[[str], None] = print) -> None:
    """Mark trials whose process died FAIL, and queue each once more with its parameters.

    A RUNNING trial started on this machine by a process that is gone failed at once; one
    elsewhere when its heartbeat is stale (Optuna's ``fail_stale_trials``). Failures by
    divergence or a bad config are final; so is the failure of a retry.
    """
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") == host and worker.get("pid") != os.getpid() \
                and not _alive(worker.get("pid")):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        final = {"failure", "config_error", "retry_of"} & set(trial.user_attrs)
        if trial.state == TrialState.FAIL and not final and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            echo(f"trial {trial.number:>3}  failed without finishing (process gone); "
                 f"queued again with the same parameters")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def run_sweep(config: str | Path | TrainConfig | None, params: Sequence[str | Param], *,
              trials: int, metric: str, direction: str = "auto", overrides: Sequence[str] = (),
              study: str = "sweep", storage: str | None = None, out: str | Path | None = None,
              pruner: str = "median", prune_after: int = 5, seed: int = 0, value: str = "last",
              evaluators: EvaluatorFactory | None = None, report: bool = True,
              echo: Callable[[str], None] = print) -> optuna.Study:
    """Search ``params`` over ``config`` until ``trials`` trials of the study have finished.

    ``config``: a config file (or None for the defaults) plus ``overrides``, or a TrainConfig.
    ``params``: ``key=kind:...`` strings (see ``parse_param``) or ``Param``s. ``metric``: a name
    the evaluation during training reports (``eval/loss``, an evaluator's ``eval/...``).
    ``out`` (default ``<run.output_dir>/<run.name>-sweep``) holds ``trial-<n>/`` run folders,
    ``study.db`` (unless ``storage`` names another database), ``report.md``, plots and
    ``best.yaml``. ``evaluators``: the factory ``launch.run`` passes to the Trainer.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a sweep runs its trials one after another in one process: start it "
                          "with python, not torchrun (share --storage to use several machines)")
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    check_choice("--value", value, VALUES)
    if prune_after < 0:
        raise ConfigError(f"--prune-after must be >= 0, got {prune_after}")
    direction = direction_for(metric, direction)
    space = [p if isinstance(p, Param) else parse_param(p) for p in params]
    if not space:
        raise ConfigError("a sweep needs at least one --param, e.g. "
                          "--param optim.lr=loguniform:1e-4:3e-3")
    base = base_config(config, overrides)
    check_params(base, space, metric, direction)
    out, storage = locations(base, out, storage)
    out.mkdir(parents=True, exist_ok=True)
    objective = _objective(base, space, out.resolve(), metric, direction, value, evaluators,
                           echo)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours to print
    try:
        sweep = open_study(study, storage, direction, metric, pruner=pruner,
                           prune_after=prune_after, seed=seed)
        while True:
            recover(sweep, echo)
            known = sweep.get_trials(deepcopy=False)
            running = sum(t.state == TrialState.RUNNING for t in known)
            if sum(map(counted, known)) + running >= trials:
                break
            sweep.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if report:

        echo(f"report: {write_report(sweep, out)}")
    return sweep


def locations(base: TrainConfig, out: str | Path | None, storage: str | None
              ) -> tuple[Path, str]:
    """The sweep folder (default ``<run.output_dir>/<run.name>-sweep``) and the study's
    database URL (default ``sqlite:///<out>/study.db``)."""
    out = Path(out) if out is not None else Path(base.run.output_dir) / f"{base.run.name}-sweep"
    return out, storage or f"sqlite:///{(out / 'study.db').resolve()}"


def rewrite_report(config: str | Path | TrainConfig | None, overrides: Sequence[str] = (), *,
                   study: str = "sweep", storage: str | None = None,
                   out: str | Path | None = None) -> Path:
    """Write the report of an existing study again (e.g. while other machines still run it)."""

    out, storage = locations(base_config(config, overrides), out, storage)
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        raise ConfigError(f"no study database at {storage}: give the sweep's --out or --storage")
    try:
        loaded = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        raise ConfigError(f"no study {study!r} in {storage}: check --study") from None
    return write_report(loaded, out)
