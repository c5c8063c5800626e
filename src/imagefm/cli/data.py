"""Commands about datasets: ``imagefm data prepare | show | stats | recipes``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

data_app = typer.Typer(help="Prepare real datasets as shards, and look at them.",
                       no_args_is_help=True)


@data_app.command("recipes")
def list_recipes() -> None:
    """List the dataset recipes and where each reads its data."""
    from imagefm.data.recipes import RECIPES

    for name, recipe in sorted(RECIPES.items()):
        where = recipe.default_src or "--src required"
        typer.echo(f"{name:<12} {recipe.summary}\n{'':<12} source: {where}")


@data_app.command("prepare")
def prepare(
    name: str = typer.Argument(..., help="recipe: tuxpaint, emoji, openclipart, "
                                         "openclipart-cifar10, cifar10, coco, folder (see "
                                         "`imagefm data recipes`)"),
    out: Path = typer.Option(..., "--out", help="output folder for shards + manifest.json"),
    src: Path | None = typer.Option(None, "--src", help="where the data is (default: where the "
                                                        "Debian package installs it)"),
    max_per_shard: int = typer.Option(1000, "--max-per-shard", help="records per tar shard"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a dataset already in --out"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Read a real dataset where it is installed and write WebDataset shards by split."""
    from imagefm.data.recipes import MissingSourceError
    from imagefm.data.recipes import prepare as run_recipe

    try:
        manifest = run_recipe(name, out, src, max_per_shard=max_per_shard, overwrite=overwrite,
                              progress=not quiet)
    except (KeyError, MissingSourceError, FileExistsError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None
    counts = manifest["counts"]
    splits = ", ".join(f"{split} {n:,}" for split, n in counts["splits"].items())
    typer.echo(f"wrote {counts['total']:,} records ({splits}) to {out}")
    skipped = manifest["skipped"]
    if skipped:
        total = sum(skipped.values())
        parts = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        typer.echo(f"skipped {total:,} of {counts['total'] + total:,}: {parts}")
    typer.echo(f"licence: {manifest['license']}")


@data_app.command("show")
def show(
    directory: Path = typer.Argument(..., help="dataset folder (shards) or one .tar shard"),
    out: Path = typer.Option(Path("sheet.png"), "--out", help="PNG to write"),
    n: int = typer.Option(24, "-n", help="number of samples"),
    seed: int = typer.Option(0, "--seed", help="which samples (reproducible)"),
) -> None:
    """Draw a contact sheet: sampled images with their captions (Korean too)."""
    from imagefm.data.inspect import FontNotFoundError, contact_sheet

    try:
        path = contact_sheet(directory, out, n=n, seed=seed)
    except (FontNotFoundError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path}")


@data_app.command("stats")
def stats(
    directory: Path = typer.Argument(..., help="dataset folder (shards) or one .tar shard"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Count records per source, split, language and label; caption length histogram."""
    from imagefm.data.inspect import format_stats
    from imagefm.data.inspect import stats as compute

    try:
        result = compute(directory)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2) if as_json
               else format_stats(result))


def register(app: typer.Typer) -> None:
    """Add the ``data`` sub-command group to the ``imagefm`` app."""
    app.add_typer(data_app, name="data")
