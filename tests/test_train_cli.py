"""``imagefm train`` and ``python -m imagefm.train``: config + overrides in, a run folder out."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from imagefm.cli.train import register
from imagefm.config import ConfigError
from imagefm.train.launch import main
from imagefm.train.metrics import read_metrics

CONFIG = """
run: {progress: false, tensorboard: false}
model:
  config:
    embed_dim: 32
    vision: {image_size: 16, patch_size: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}
    text: {vocab_size: 64, context_length: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}
data: {batch_size: 4}
train: {steps: 2, precision: fp32}
"""


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("other")  # a second command, so typer keeps "train" as a sub-command name
    def other() -> None:
        pass

    return app


def test_cli_trains_with_overrides_and_resumes(app, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    runner = CliRunner()
    args = ["train", str(config), f"run.output_dir={tmp_path}", "run.name=cli"]
    result = runner.invoke(app, [*args, "train.steps=3"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "cli")] == [1, 2, 3]
    result = runner.invoke(app, [*args, "train.steps=5", "--resume"])  # extend the run
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "cli")] == [1, 2, 3, 4, 5]
    # Extending re-plans the schedule: the user is told, and the saved config is the new one.
    assert "resuming with changed settings: train.steps: 3 -> 5" in result.output
    assert "re-planned" in result.output
    assert "steps: 5" in (tmp_path / "cli" / "config.yaml").read_text()


def test_cli_rejects_a_bad_override_before_anything_starts(app, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    result = CliRunner().invoke(app, ["train", str(config), f"run.output_dir={tmp_path}",
                                      "train.setps=3"])
    assert isinstance(result.exception, ConfigError)
    assert "unknown key(s) in train: setps" in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_module_entry_point_reports_config_errors(tmp_path, capsys):
    assert main([f"run.output_dir={tmp_path}", "optim.lr=fast"]) == 2
    assert "optim.lr must be float, got 'fast'" in capsys.readouterr().err
