"""``imagefm speech prepare``: make speech–text datasets (imagefm.data.speech_sets).

    imagefm speech prepare synthetic --out data/speech-synth        # espeak-ng, en + ko
    imagefm speech prepare tuxpaint --out data/tuxpaint-narrations  # Tux Paint's recordings

Train a CLAP model on them with ``data.source: speech`` (configs/clap-speech.yaml) and evaluate
with ``imagefm eval MODEL --suite speech --data DIR``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class SpeechKind(str, Enum):
    synthetic = "synthetic"
    tuxpaint = "tuxpaint"


def register(app: typer.Typer) -> None:
    speech = typer.Typer(help="Speech–text datasets (espeak-ng synthesis, Tux Paint narrations).",
                         no_args_is_help=True)

    @speech.command("prepare")
    def prepare(
        kind: SpeechKind = typer.Argument(..., help="synthetic (espeak-ng) | tuxpaint "
                                                    "(recorded narrations)"),
        out: Path = typer.Option(..., "--out", help="Output folder (audio/, *.jsonl, "
                                                    "manifest.json)."),
        src: Path | None = typer.Option(None, "--src", help="Tux Paint stamps folder (default "
                                                            "/usr/share/tuxpaint/stamps)."),
        seed: int = typer.Option(0, min=0, help="synthetic: seed of texts, voices, noise."),
        scene_captions: int = typer.Option(600, "--scene-captions", min=0,
                                           help="synthetic: train scene captions per language "
                                                "(test: a sixth)."),
        keyword_repeats: int = typer.Option(10, "--keyword-repeats", min=0,
                                            help="synthetic: train utterances per keyword and "
                                                 "language (test: 4)."),
        no_tuxpaint_text: bool = typer.Option(False, "--no-tuxpaint-text",
                                              help="synthetic: leave out Tux Paint captions."),
        langs: str | None = typer.Option(None, "--langs",
                                         help="tuxpaint: narration languages, e.g. en,fr "
                                              "(default all)."),
        overwrite: bool = typer.Option(False, help="Replace a dataset already in --out."),
    ) -> None:
        """Write a speech dataset with train/test splits (Tux Paint's reserved stamps: test)."""
        from imagefm.data.formats import SkipCounter
        from imagefm.data.recipes.tuxpaint import DEFAULT_SRC
        from imagefm.data.speech import espeak_available
        from imagefm.data.speech_sets import (
            SynthesisPlan,
            keyword_classes,
            synthetic_speech,
            tuxpaint_narrations,
            write_speech_dataset,
        )

        root = src or Path(DEFAULT_SRC)
        skips = SkipCounter()
        if (out / "manifest.json").exists() and not overwrite:
            raise typer.BadParameter(f"{out} already holds a speech dataset; pass --overwrite "
                                     f"to replace it")
        if kind is SpeechKind.synthetic:
            if not espeak_available():
                raise typer.BadParameter("espeak-ng is not installed: sudo apt-get install -y "
                                         "espeak-ng")
            plan = SynthesisPlan(
                keyword_repeats={"train": keyword_repeats, "test": min(4, keyword_repeats)},
                scene_captions={"train": scene_captions, "test": scene_captions // 6})
            examples = synthetic_speech(plan, skips, seed=seed,
                                        tuxpaint_root=None if no_tuxpaint_text else root)
            manifest = write_speech_dataset(examples, out, name="speech-synthetic", skips=skips,
                                            overwrite=overwrite, classes=keyword_classes(),
                                            provenance={"engine": "espeak-ng", "seed": seed})
        else:
            if not root.is_dir():
                raise typer.BadParameter(f"{root} not found: sudo apt-get install -y "
                                         f"tuxpaint-stamps-default (or pass --src)")
            wanted = [x.strip() for x in langs.split(",")] if langs else None
            manifest = write_speech_dataset(tuxpaint_narrations(skips, root, langs=wanted), out,
                                            name="tuxpaint-narrations", skips=skips,
                                            overwrite=overwrite,
                                            provenance={"source": str(root),
                                                        "debian_package":
                                                            "tuxpaint-stamps-default"})
        typer.echo(f"{out}: {manifest['counts']}; {skips.summary()}")

    app.add_typer(speech, name="speech")
