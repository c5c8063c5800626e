"""The ``imagefm`` command. Each topic registers its commands from its own module."""

from __future__ import annotations

import importlib

import typer

from imagefm.version import __version__

app = typer.Typer(
    name="imagefm",
    help="Train, adapt, evaluate and serve image foundation models (CLIP, SigLIP, VLMs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules under imagefm.cli that contribute commands through `register(app)`.
COMMAND_MODULES = ("model", "synth", "data", "eval", "train", "quickstart", "search", "lm", "vlm",
                   "chat", "adapt", "catalog", "sweep", "medical", "points", "speech",
                   "speech_vlm", "speech_ctc", "vla")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imagefm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """imagefm: image foundation models in plain PyTorch."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"imagefm.cli.{_name}").register(app)


def main() -> None:
    from imagefm.checkpoint import CheckpointError
    from imagefm.config import ConfigError

    try:
        app()
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        # Expected user errors: one clear line, no traceback.
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None
