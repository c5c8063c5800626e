"""``imagefm synth``: write synthetic datasets (scenes, VQA, text, defects) as WebDataset shards."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class SynthKind(str, Enum):
    scenes = "scenes"
    vqa = "vqa"
    text = "text"
    defects = "defects"


class SynthSplit(str, Enum):
    train = "train"
    eval = "eval"
    all = "all"


def parse_held_out(text: str | None) -> list[tuple[str, str]] | None:
    """``"red:star,blue:circle"`` → pairs; ``"none"`` → no held-out set; empty → the default."""
    if not text:
        return None
    if text.strip().lower() == "none":
        return []
    pairs = []
    for item in text.split(","):
        colour, sep, shape = item.strip().partition(":")
        if not sep or not colour or not shape:
            raise typer.BadParameter(f"held-out item {item!r} is not COLOUR:SHAPE")
        pairs.append((colour.strip(), shape.strip()))
    return pairs


def register(app: typer.Typer) -> None:
    @app.command()
    def synth(
        kind: SynthKind = typer.Argument(..., help="What to generate."),
        n: int = typer.Option(10_000, "--n", min=1, help="Number of samples."),
        out: Path = typer.Option(..., "--out", help="Output folder for shards + manifest.json."),
        seed: int = typer.Option(0, min=0, help="Seed; same seed, same bytes."),
        image_size: int = typer.Option(64, "--image-size", help="Image side in pixels."),
        workers: int = typer.Option(0, help="Processes; 0 = all cores. Output does not depend "
                                            "on it."),
        split: SynthSplit = typer.Option(SynthSplit.train, help="train: never the held-out "
                                         "(colour, shape) pairs; eval: only them; all: any."),
        shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Samples per shard."),
        held_out: str = typer.Option(None, "--held-out", help="Scenes/VQA: COLOUR:SHAPE,... to "
                                     "hold out instead of the default set, or 'none'."),
        defect_rate: float = typer.Option(0.5, "--defect-rate", min=0.0, max=1.0,
                                          help="Defects: fraction of samples with a defect."),
        label_by: str = typer.Option(None, "--label-by", help="Scenes: single objects labelled "
                                     "by 'colour' or 'shape' (for zero-shot evaluation)."),
        overwrite: bool = typer.Option(False, help="Replace shards already in --out."),
    ) -> None:
        """Generate synthetic data (deterministic by seed) as WebDataset shards."""
        from imagefm.data.synthetic import SynthSpec, write_shards

        options: dict = {}
        if kind in (SynthKind.scenes, SynthKind.vqa):
            held = parse_held_out(held_out)
            if held is not None:
                options["held_out"] = held
        elif held_out:
            raise typer.BadParameter("--held-out applies to scenes and vqa only")
        if label_by:
            if kind != SynthKind.scenes:
                raise typer.BadParameter("--label-by applies to scenes only")
            options["label_by"] = label_by
        if kind == SynthKind.defects:
            options["defect_rate"] = defect_rate
        spec = SynthSpec(kind.value, n, seed=seed, image_size=image_size, split=split.value,
                         options=options)
        try:
            manifest = write_shards(spec, out, shard_size=shard_size, workers=workers or None,
                                    progress=True, overwrite=overwrite)
        except (ValueError, FileExistsError, RuntimeError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=1) from None
        typer.echo(f"wrote {manifest['count']} {kind.value} samples in "
                   f"{len(manifest['shards'])} shards to {out}"
                   + (f" ({manifest['skipped']} skipped, see manifest.json)"
                      if manifest["skipped"] else ""))
