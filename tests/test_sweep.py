"""``imagefm sweep`` / ``run_sweep``: Optuna trials that are real (tiny) Trainer runs.

The pruning test scores each trial with an evaluator whose value is a known function of the
trial's learning rate (passed through ``run_sweep(..., evaluators=...)``), so which trials the
median pruner must stop is computed here from the sampled values and compared with what the
study recorded. A crash is staged as a RUNNING trial owned by a process that has exited.
"""

from __future__ import annotations

import math
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from imagefm.apps.sweep import Param, parse_param, run_sweep  # noqa: E402
from imagefm.config import ConfigError  # noqa: E402
from imagefm.train.config import load_config  # noqa: E402
from imagefm.train.metrics import read_metrics  # noqa: E402

CONFIG = """
run: {progress: false, tensorboard: false}
model:
  config:
    embed_dim: 32
    vision: {image_size: 16, patch_size: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}
    text: {vocab_size: 64, context_length: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}
data: {batch_size: 4}
optim: {warmup_steps: 0}
train: {steps: 6, precision: fp32}
eval: {every: 2}
"""
LR = "optim.lr=loguniform:1e-5:1e-1"
STEP_BONUS = 0.01  # the fake score rises this much per evaluation, as a training curve would


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def _closeness(lr: float) -> float:
    """The fake score's part that depends on the trial: best (0) at lr = 1e-3."""
    return -abs(math.log10(lr) + 3)


def score_by_lr(config, model):
    """An evaluator factory (as launch.run takes): ``eval/score`` from the trial's lr."""
    evaluations = [0]

    def score(model) -> dict[str, float]:
        evaluations[0] += 1
        return {"eval/score": _closeness(config.optim.lr) + STEP_BONUS * evaluations[0]}

    return [score]


def test_param_grammar() -> None:
    lr = parse_param("optim.lr=loguniform:1e-4:3e-3")
    assert (lr.kind, lr.low, lr.high, lr.log) == ("loguniform", 1e-4, 3e-3, True)
    steps = parse_param("train.steps=int:10:50:log")
    assert (steps.kind, steps.low, steps.high, steps.log) == ("int", 10, 50, True)
    assert parse_param("data.batch_size=choice:64,128").choices == (64, 128)
    assert parse_param("x.y=choice:true,1.5,null,siglip").choices == (True, 1.5, None, "siglip")
    assert parse_param("optim.warmup_steps=uniform:0:10").corners() == [0.0, 10.0]
    for text in ("optim.lr=loguniform:0.0001:0.003", "train.steps=int:10:50:log",
                 "data.batch_size=choice:64,128"):
        assert parse_param(str(parse_param(text))) == parse_param(text)
    for bad, message in [("optim.lr=normal:0:1", "loguniform:LOW:HIGH"),
                         ("optim.lr=loguniform:0:1", "LOW > 0"),
                         ("optim.lr=uniform:3:1", "LOW must be below HIGH"),
                         ("train.steps=int:1.5:4", "LOW and HIGH must be ints"),
                         ("data.batch_size=choice:4,4", "distinct"),
                         ("optim.lr", "section.key=value")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_param(bad)


@pytest.mark.parametrize("param, overrides, message", [
    ("optim.lrr=loguniform:1e-4:1e-2", [], "unknown key(s) in optim: lrr"),
    ("train.steps=uniform:2:6", [], "train.steps must be int, got 2.0"),
    ("optim.lr=uniform:-1:0.01", [], "optim.lr must be > 0, got -1.0"),
    ("data.batch_size=choice:4,6", ["train.accumulate=4"], "data.batch_size (6) must be "
                                                            "divisible by train.accumulate"),
    ("run.name=choice:a,b", [], "the sweep sets run.name itself"),
    (LR, ["eval.every=0"], "set eval.every"),
])
def test_a_bad_search_space_is_one_config_error_before_any_trial(tmp_path, param, overrides,
                                                                   message) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        run_sweep(_config(tmp_path), [param], trials=2, metric="eval/score", overrides=overrides,
                  out=out, evaluators=score_by_lr)
    assert "\n" not in str(caught.value)
    assert not out.exists()  # refused before any study or trial


def _pruned_as_median_pruner_decides(trials) -> list[TrialState]:
    """The states the median pruner (prune_after=1) must give, from the trials' learning rates:
    every trial reports its first evaluation at step 2, and is pruned there when that is worse
    than the median of the trials completed before it."""
    first_scores, states = [], []
    for trial in trials:
        first = _closeness(trial.params["optim.lr"]) + STEP_BONUS
        pruned = bool(first_scores) and first < statistics.median(first_scores)
        states.append(TrialState.PRUNED if pruned else TrialState.COMPLETE)
        if not pruned:
            first_scores.append(first)
    return states


def test_sweep_prunes_resumes_after_a_crash_and_reports(tmp_path) -> None:
    config, out, lines = _config(tmp_path), tmp_path / "sweep", []
    study = run_sweep(config, [LR], trials=3, metric="eval/score", out=out, prune_after=1,
                      seed=0, evaluators=score_by_lr, echo=lines.append, report=False)
    trials = study.get_trials()
    assert study.direction.name == "MAXIMIZE"  # auto: not a loss
    assert [t.state for t in trials] == _pruned_as_median_pruner_decides(trials)
    assert TrialState.PRUNED in [t.state for t in trials]
    for trial in trials:
        lr = trial.params["optim.lr"]
        saved = yaml.safe_load((out / f"trial-{trial.number}" / "config.yaml").read_text())
        assert saved["optim"]["lr"] == lr  # each trial trained with its own sample
        expected = {s: _closeness(lr) + STEP_BONUS * (s // 2) for s in (2, 4, 6)}
        if trial.state == TrialState.COMPLETE:  # reported every eval.every steps; value: last
            assert trial.intermediate_values == pytest.approx(expected)
            assert trial.value == pytest.approx(expected[6])
        else:
            assert trial.intermediate_values == pytest.approx({2: expected[2]})
    assert len(lines) == 3 and all(line.startswith(f"trial {i:>3}  optim.lr=")
                                   for i, line in enumerate(lines))
    assert sum("pruned at step 2" in line for line in lines) == sum(
        t.state == TrialState.PRUNED for t in trials)

    # A crash: trial 3 is left RUNNING (lr = 1e-3, the best) by a process that has exited.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    shared = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    shared.enqueue_trial({"optim.lr": 1e-3})
    crashed = shared.ask()
    crashed.suggest_float("optim.lr", 1e-5, 1e-1, log=True)
    crashed.set_user_attr("worker", {"host": socket.gethostname(), "pid": gone.pid})

    lines.clear()
    study = run_sweep(config, [LR], trials=4, metric="eval/score", out=out, prune_after=1,
                      seed=0, evaluators=score_by_lr, echo=lines.append)
    trials = study.get_trials()
    assert [t.state for t in trials[3:]] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = trials[4]
    assert retry.user_attrs["retry_of"] == 3 and retry.params == {"optim.lr": 1e-3}
    assert retry.value == pytest.approx(3 * STEP_BONUS)
    # Only the retry ran: 3 finished + 1 = --trials 4; the crashed one has no run folder.
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0", "trial-1", "trial-2",
                                                           "trial-4"]
    assert "queued again" in lines[0] and lines[1].startswith("trial   4")

    assert study.best_trial.number == 4
    report = (out / "report.md").read_text()
    assert "## Best: trial 4, eval/score = 0.03" in report
    assert "| 3 | fail: its process ended before it did; retried as trial 4 |" in report
    assert "| 4 | complete (retry of 3) | 0.03 | 6 | 0.001 |" in report
    for name in ("history", "curves", "importances", "parallel"):
        assert f"({name}.png)" in report
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100
    best = load_config(out / "best.yaml")
    assert best.optim.lr == 1e-3 and best.run.name == "best" and best.run.output_dir == str(out)
    assert best.model.config == load_config(config).model.config

    # Nothing is left to do for --trials 4: a third call runs no trial.
    again = run_sweep(config, [LR], trials=4, metric="eval/score", out=out, prune_after=1,
                      evaluators=score_by_lr, echo=lines.append, report=False)
    assert len(again.get_trials()) == 5
    with pytest.raises(ConfigError, match="follows eval/score, not eval/loss"):
        run_sweep(config, [LR], trials=5, metric="eval/loss", direction="maximize", out=out,
                  evaluators=score_by_lr)
    with pytest.raises(ConfigError, match="was created to maximize"):
        run_sweep(config, [LR], trials=5, metric="eval/score", direction="minimize", out=out,
                  evaluators=score_by_lr)


def test_a_metric_the_evaluation_lacks_is_a_clear_error_at_the_first_evaluation(
        tmp_path) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=re.escape(
            "--metric eval/top1 is not among the evaluation results (eval/score)")):
        run_sweep(_config(tmp_path), [LR], trials=3, metric="eval/top1", out=out,
                  evaluators=score_by_lr, report=False)
    [trial] = optuna.load_study(study_name="sweep",
                                storage=f"sqlite:///{out / 'study.db'}").get_trials()
    assert trial.state == TrialState.FAIL and "eval/top1" in trial.user_attrs["config_error"]
    assert [r["step"] for r in read_metrics(out / "trial-0") if "eval/score" in r] == [2]


def _last_eval_loss(run_dir: Path) -> float:
    return [r["eval/loss"] for r in read_metrics(run_dir) if "eval/loss" in r][-1]


def test_held_out_loss_is_minimised(tmp_path) -> None:
    out = tmp_path / "sweep"
    # The toy source ignores data.path: any eval.data gives held-out toy batches.
    study = run_sweep(_config(tmp_path), [LR, Param("optim.warmup_steps", "choice",
                                                    choices=(0, 2))],
                      trials=2, metric="eval/loss", overrides=["eval.data=held-out"], out=out,
                      pruner="none", report=False)
    assert study.direction.name == "MINIMIZE"
    for trial in study.get_trials():
        assert trial.state == TrialState.COMPLETE
        assert trial.value == pytest.approx(_last_eval_loss(out / f"trial-{trial.number}"))


def test_a_vlm_config_sweeps_on_its_held_out_loss(tiny_vlm, tmp_path) -> None:
    tiny_vlm.save_pretrained(tmp_path / "init")
    out = tmp_path / "sweep"
    study = run_sweep(None, ["optim.lr=loguniform:1e-4:1e-2"], trials=1, metric="eval/loss",
                      overrides=[f"model.init={tmp_path / 'init'}", "task.name=vlm",
                                 "data.source=vlm-synthetic", "data.batch_size=2",
                                 "train.steps=2", "eval.every=1", "eval.data=held-out",
                                 "eval.limit=2", "run.progress=false", "run.tensorboard=false"],
                      out=out, report=False)
    [trial] = study.get_trials()
    assert trial.state == TrialState.COMPLETE and sorted(trial.intermediate_values) == [1, 2]
    assert trial.value == pytest.approx(_last_eval_loss(out / "trial-0"))


@pytest.fixture
def app():
    import typer

    from imagefm.cli.sweep import register

    app = typer.Typer()
    register(app)

    @app.command("other")  # a second command, so typer keeps "sweep" as a sub-command name
    def other() -> None:
        pass

    return app


def test_cli_runs_a_sweep_and_rewrites_its_report(app, tmp_path, monkeypatch) -> None:
    # The command trains with `imagefm train`'s evaluators; the fake one stands in for them.
    monkeypatch.setattr("imagefm.eval.training.training_evaluators", score_by_lr)
    config, out = _config(tmp_path), tmp_path / "sweep"
    args = ["sweep", str(config), "eval.data=held-out", "--param", LR, "--trials", "1",
            "--metric", "eval/score", "--pruner", "none", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"trial   0  optim\.lr=\S+  eval/score -?\d", result.output)
    assert f"report: {out / 'report.md'}" in result.output
    (out / "report.md").unlink()
    result = CliRunner().invoke(app, ["sweep", str(config), "--param", LR, "--out", str(out),
                                      "--report-only"])
    assert result.exit_code == 0, result.output
    assert "| 0 | complete |" in (out / "report.md").read_text()

    bad = CliRunner().invoke(app, ["sweep", str(config), "--param", "optim.lr=loguniform:1:0"])
    assert isinstance(bad.exception, ConfigError)
    assert "LOW must be below HIGH" in str(bad.exception)
