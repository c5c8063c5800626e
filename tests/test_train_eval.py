"""Evaluation during training: held-out loss at the right steps, the best model, early
stopping, callbacks, the launch wiring and the eval config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import imagefm
from imagefm.config import ConfigError
from imagefm.train import ContrastiveTask, StopTraining, ToyPairs, Trainer, load_config
from imagefm.train.launch import build_model, eval_data_config, run
from imagefm.train.metrics import read_metrics
from imagefm.train.state import list_checkpoints

TINY = ("model.config={embed_dim: 32, "
        "vision: {image_size: 16, patch_size: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}, "
        "text: {vocab_size: 64, context_length: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}}")


def config_for(tmp_path, *overrides: str):
    return load_config(None, [TINY, f"run.output_dir={tmp_path}", "run.progress=false",
                              "run.tensorboard=false", "train.precision=fp32",
                              "data.batch_size=8", "optim.warmup_steps=1", "optim.lr=3e-3",
                              *overrides])


def toy(seed: int = 0, batches: int = 4) -> ToyPairs:
    return ToyPairs(batch_size=8, image_size=16, vocab_size=64, classes=4, seed=seed,
                    batches_per_epoch=batches)


def trainer_for(config, **kwargs) -> Trainer:
    torch.manual_seed(0)
    return Trainer(build_model(config), ContrastiveTask("clip"), config, toy(), **kwargs)


def eval_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]


def held_out_loss(model, batches) -> float:
    """The reference: the clip loss of each held-out batch, averaged by rows."""
    task, model = ContrastiveTask("clip"), model.eval()
    with torch.no_grad():
        losses = [float(task.loss(model, b)[0]) * len(b["input_ids"]) for b in batches]
    return sum(losses) / sum(len(b["input_ids"]) for b in batches)


def test_held_out_loss_every_n_steps_and_at_the_end_with_the_best_model(tmp_path):
    config = config_for(tmp_path, "train.steps=5", "eval.every=2", "eval.limit=16")
    held_out = toy(seed=7, batches=3)
    run_dir = trainer_for(config, eval_loader=held_out).fit()

    records = eval_records(run_dir)
    assert [r["step"] for r in records] == [2, 4, 5]  # every 2 steps, and the end
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5]
    # eval.limit = 16 samples: the first two batches of 8, with the weights of that step.
    first_two = list(held_out(0))[:2]
    final = imagefm.load(run_dir / "final")
    assert records[-1]["eval/loss"] == pytest.approx(held_out_loss(final, first_two), rel=1e-5)
    assert held_out_loss(final, list(held_out(0))) != pytest.approx(records[-1]["eval/loss"])

    best = json.loads((run_dir / "best" / "best.json").read_text())
    losses = {r["step"]: r["eval/loss"] for r in records}
    assert best["step"] == min(losses, key=losses.get) and best["mode"] == "min"
    assert best["metric"] == "eval/loss" and best["value"] == pytest.approx(losses[best["step"]])
    assert held_out_loss(imagefm.load(run_dir / "best"), first_two) == pytest.approx(
        best["value"], rel=1e-5)
    card = (run_dir / "best" / "README.md").read_text()
    assert f"toy: {best['step']} of 5 steps of 8" in card
    assert not list(run_dir.glob(".best*"))  # staged folders renamed away


class Scripted:
    """An evaluator reporting the given accuracies in turn; keeps a copy of the weights it saw."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.seen = list(values), []

    def __call__(self, model) -> dict[str, float]:
        assert not model.training and not torch.is_grad_enabled()
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"acc": self.values[len(self.seen) - 1]}  # named without eval/: prefixed


def broken(model) -> dict[str, float]:
    raise RuntimeError("no labels")


def test_best_model_and_early_stopping(tmp_path, capsys):
    config = config_for(tmp_path, "train.steps=20", "eval.every=1", "eval.metric=eval/acc",
                        "eval.patience=2", "run.checkpoint_every=100")
    scripted = Scripted([0.5, 0.7, 0.6, 0.65, 0.9])
    trainer = trainer_for(config, evaluators=[scripted, broken])
    run_dir = trainer.fit()

    # Best at step 2; steps 3 and 4 did not beat it: patience 2 stops the run at step 4.
    assert trainer.progress.step == 4
    assert [(r["step"], r["eval/acc"]) for r in eval_records(run_dir)] == [
        (1, 0.5), (2, 0.7), (3, 0.6), (4, 0.65)]  # no second evaluation at the end
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004.pt"]
    assert (run_dir / "final" / "model.safetensors").is_file()
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert (best["step"], best["value"], best["mode"]) == (2, 0.7, "max")
    exported = load_file(run_dir / "best" / "model.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, scripted.seen[1][key], rtol=0, atol=0, msg=key)
    state = torch.load(list_checkpoints(run_dir)[-1], weights_only=True)["progress"]
    assert (state["best_value"], state["best_step"], state["evals_since_best"]) == (0.7, 2, 2)
    out = capsys.readouterr().out
    assert "evaluator broken failed at step 1 (RuntimeError: no labels)" in out
    assert "early stopping at step 4: eval/acc has not improved on 0.7 (step 2)" in out


class Watcher:
    def __init__(self, stop_at: int | None = None, error_at: int | None = None) -> None:
        self.calls, self.stop_at, self.error_at = [], stop_at, error_at

    def on_evaluate(self, trainer, step, metrics) -> None:
        self.calls.append((trainer.progress.step, step, dict(metrics)))
        if step == self.stop_at:
            raise StopTraining("enough")
        if step == self.error_at:
            raise ValueError("pruned")


def test_callbacks_see_each_evaluation_and_can_stop_the_run(tmp_path, capsys):
    config = config_for(tmp_path, "train.steps=10", "eval.every=2")
    watcher = Watcher(stop_at=4)
    run_dir = trainer_for(config, eval_loader=toy(seed=3, batches=1),
                          callbacks=[watcher, object()]).fit()
    assert [(at, step) for at, step, _ in watcher.calls] == [(2, 2), (4, 4)]
    assert all(set(m) == {"eval/loss"} for _, _, m in watcher.calls)
    assert [r["eval/loss"] for r in eval_records(run_dir)] == [m["eval/loss"]
                                                               for _, _, m in watcher.calls]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004.pt"]
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert "stopping at step 4: enough" in capsys.readouterr().out

    # Any other exception ends the run as it is, the logger closed first.
    config = config_for(tmp_path, "train.steps=10", "eval.every=2", "run.name=pruned")
    trainer = trainer_for(config, eval_loader=toy(seed=3, batches=1),
                          callbacks=[Watcher(error_at=2)])
    closed = []
    close = trainer.logger.close
    trainer.logger.close = lambda: (closed.append(True), close())
    with pytest.raises(ValueError, match="pruned"):
        trainer.fit()
    assert closed == [True] and not (config.run_dir / "final").exists()


def test_progress_bar_shows_speed_eta_and_the_eval_metric(tmp_path, capsys):
    config = config_for(tmp_path, "train.steps=4", "eval.every=2", "run.progress=true")
    trainer_for(config, eval_loader=toy(seed=3, batches=1)).fit()
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "4/4" in bar and "samples_s=" in bar and "eval_loss=" in bar
    assert "<00:00" in bar  # tqdm's remaining time, over train.steps


def test_nothing_to_evaluate_and_impossible_eval_settings(tmp_path):
    with pytest.raises(ConfigError, match="eval.every = 2 but there is nothing to evaluate"):
        trainer_for(config_for(tmp_path, "eval.every=2"))
    for overrides, message in [
        (["eval.patience=3"], "eval.patience .* eval.every = 0"),
        (["eval.metric=acc"], "eval.metric must name an evaluation metric"),
        (["eval.mode=bigger"], "eval.mode = 'bigger' is not one of auto, min, max"),
        (["eval.limit=0"], "eval.limit must be >= 1"),
        (["eval.every=-1"], "eval.every must be >= 0"),
        (["eval.batch_size=0"], "eval.batch_size must be >= 1"),
        (["run.wandb=maybe"], "run.wandb = 'maybe' is not one of off, offline, online"),
        (["run.wandb=yes"], "run.wandb must be off, offline or online, got true"),
        (["eval.kept_best=true"], "unknown key\\(s\\) in eval: kept_best"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_for(tmp_path, *overrides)
    big = tmp_path / "big.yaml"
    big.write_text("eval: {every: 500, limit: 5000, batch_size: 256}\n")
    local = load_config(big, ["run.local=true"]).eval
    assert (local.every, local.limit, local.batch_size) == (10, 32, 8)
    assert load_config(None, ["run.wandb=off"]).run.wandb == "off"  # YAML: a bare off is false


def test_launch_builds_the_held_out_loader_and_the_evaluators(tmp_path):
    config = config_for(tmp_path, "train.steps=4", "train.accumulate=2", "eval.every=2",
                        "eval.data=held-out", "eval.batch_size=4", "eval.limit=8",
                        "data.options={batches_per_epoch: 3}")
    held_out = eval_data_config(config)
    assert (held_out.data.path, held_out.data.source, held_out.data.batch_size) == (
        "held-out", "toy", 4)
    assert held_out.train.accumulate == 1 and held_out.data.options == {"batches_per_epoch": 3}
    made = []

    def evaluators(cfg, model):
        made.append((cfg, type(model).__name__))
        return [lambda m: {"eval/const": 1.0}]

    run_dir = run(config, evaluators=evaluators)
    assert made == [(config, "DualEncoder")]
    assert [(r["step"], sorted(r)) for r in eval_records(run_dir)] == [
        (2, ["eval/const", "eval/loss", "step"]), (4, ["eval/const", "eval/loss", "step"])]
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    # 3 micro-batches an epoch, 2 a step: steps 2 and 4 begin in one epoch and end in the next.
    assert [r["epoch"] for r in steps] == [0, 1, 1, 2]


def test_launch_refuses_an_evaluation_with_nothing_to_evaluate(tmp_path):
    config = config_for(tmp_path, "eval.every=2")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run(config, evaluators=lambda cfg, model: [])
    assert not config.run_dir.exists()  # refused before the run folder was made
