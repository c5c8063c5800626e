"""``imagefm speech-ctc-eval``: the character error rate of a CTC-pretrained audio tower on the
spoken questions of ``vlm-speech-eval`` (held-out voice by default).

    imagefm train configs/speech-ctc.yaml
    imagefm speech-ctc-eval runs/speech-ctc/final --questions 50 --out runs/speech-ctc-eval
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("speech-ctc-eval")
    def speech_ctc_eval(
        model: Path = typer.Argument(..., help="A speech recogniser (task.name=asr_ctc)."),
        questions: int = typer.Option(50, min=1, help="Questions per language."),
        out: Path = typer.Option(None, help="Folder for results.json (every transcript)."),
        split: str = typer.Option("all", help="all, or eval (held-out compositions)."),
        langs: str = typer.Option("en,ko", help="Comma-separated: en, ko."),
        voice: str = typer.Option("held-out", help="held-out (a speaker training never used) "
                                                   "or train."),
        seed: int = typer.Option(12345, help="Scene seed (vlm-speech-eval's default)."),
        show: int = typer.Option(3, min=0, help="Transcripts to print per language."),
    ) -> None:
        """Greedy CTC transcripts of spoken questions: character error rate per language."""
        import imagefm
        from imagefm.checkpoint import atomic_write_text
        from imagefm.eval.speech_ctc import evaluate_ctc
        from imagefm.models.speech_ctc import SpeechCTC

        recogniser = imagefm.load(model)
        if not isinstance(recogniser, SpeechCTC):
            typer.echo(f"error: {model} holds a {type(recogniser).__name__}, not a speech "
                       f"recogniser (train one with configs/speech-ctc.yaml)", err=True)
            raise typer.Exit(2)
        chosen = [lang.strip() for lang in langs.split(",") if lang.strip()]
        try:
            results = evaluate_ctc(recogniser, n=questions, langs=chosen, split=split,
                                   seed=seed, voice=voice)
        except ValueError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        typer.echo("| lang | voice | n | CER | exact transcripts |\n|---|---|---:|---:|---:|")
        for lang, r in results.items():
            typer.echo(f"| {lang} | {r['voice']} | {r['n']} | {100 * r['cer']:.1f}% | "
                       f"{100 * r['exact']:.0f}% |")
        for lang, r in results.items():
            for reference, heard in r["examples"][:show]:
                typer.echo(f"{lang}: {reference!r} -> {heard!r}")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "results.json",
                              json.dumps(results, ensure_ascii=False, indent=1))
