"""``imagefm train CONFIG [overrides...] [--resume]``: run a training config."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

    @app.command("train")
    def train(
        config: str | None = typer.Argument(
            None, help="Config file (.yaml/.yml/.toml); leave it out to start from the "
                       "defaults and give only overrides."),
        overrides: list[str] | None = typer.Argument(
            None, help="section.key=value overrides, e.g. train.steps=300 model.preset=tiny"),
        resume: bool = typer.Option(False, "--resume",
                                    help="Continue from the newest checkpoint in the run folder."),
    ) -> None:
        """Train a model; under torchrun too (torchrun --nproc-per-node 2 -m imagefm train
        CONFIG; several machines: docs/training.md). With eval.every > 0 the run is evaluated
        as it trains (held-out loss on eval.data, zero-shot / retrieval where they suit)."""
        from imagefm.eval.training import training_evaluators
        from imagefm.train.launch import train_from_args

        raise typer.Exit(train_from_args(config, overrides or [], resume=resume,
                                         evaluators=training_evaluators))
