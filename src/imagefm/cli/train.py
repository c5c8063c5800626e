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
        """Train a model. Works under torchrun too (e.g. torchrun --nproc-per-node 2 -m
        imagefm.train CONFIG)."""
        from imagefm.train.launch import train_from_args

        raise typer.Exit(train_from_args(config, overrides or [], resume=resume))
