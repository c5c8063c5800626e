"""Speech into a LLaVA-style VLM: ``imagefm vlm-add-audio`` gives a VLM an audio tower,
``imagefm vlm-speech-eval`` measures how well it answers spoken questions.

    imagefm vlm-add-audio runs/vlm-sft/final --out runs/speech-init --seconds 5 --stack 10
    imagefm train configs/vlm-speech.yaml model.init=runs/speech-init
    imagefm vlm-speech-eval runs/vlm-speech/final --questions 100 --out runs/speech-eval
    imagefm ask --audio question.wav --image picture.png --model runs/vlm-speech/final
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("vlm-add-audio")
    def vlm_add_audio(
        model: Path = typer.Argument(..., help="A LLaVA-style imagefm VLM."),
        out: Path = typer.Option(..., help="Where to write the VLM with its new audio tower."),
        preset: str = typer.Option("audio-tiny", help="Audio encoder shape (whisper_encoder's "
                                                      "presets: audio-tiny, whisper-tiny...)."),
        encoder: Path = typer.Option(None, help="A trained audio encoder (imagefm or Whisper "
                                                "checkpoint) to start from instead."),
        seconds: float = typer.Option(4.0, help="Clip length: each clip is padded or cut to it."),
        stack: int = typer.Option(8, min=1, help="Encoder frames (20 ms each) per LM token."),
        seed: int = typer.Option(0, help="Seed of the new weights."),
    ) -> None:
        """Give a VLM an audio tower and projector (new weights; train them with vlm-speech)."""
        import torch

        import imagefm
        from imagefm.checkpoint import CheckpointError
        from imagefm.config import ConfigError
        from imagefm.models.vlm import VLM, add_audio
        from imagefm.models.whisper_encoder import audio_preset

        torch.manual_seed(seed)
        try:
            vlm = imagefm.load(model)
            tower = imagefm.load(encoder) if encoder is not None else audio_preset(preset)
            if not isinstance(vlm, VLM):
                raise ConfigError(f"{model} holds a {type(vlm).__name__}, not a LLaVA-style VLM")
            add_audio(vlm, tower, seconds=seconds, stack=stack)
        except (CheckpointError, ConfigError, OSError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        vlm.save_pretrained(out)
        params = sum(p.numel() for p in vlm.audio.parameters())
        typer.echo(f"wrote {out}: {params / 1e6:.2f} M parameters in the audio tower and "
                   f"projector; {vlm.config.audio.tokens} LM tokens per {seconds:g} s clip")

    @app.command("vlm-speech-eval")
    def vlm_speech_eval(
        model: Path = typer.Argument(..., help="A VLM with an audio tower."),
        questions: int = typer.Option(100, min=1, help="Scenes (one question each) per "
                                                       "language."),
        out: Path = typer.Option(None, help="Folder for results.json and report.md."),
        split: str = typer.Option("all", help="all, or eval (held-out compositions)."),
        langs: str = typer.Option("en,ko", help="Comma-separated: en, ko."),
        voice: str = typer.Option("held-out", help="held-out (a speaker training never used) "
                                                   "or train."),
        seed: int = typer.Option(12345, help="Scene seed (vlm-eval's default: same questions)."),
        style: str = typer.Option("clean", help="Scene style: clean (the quickstart's, as "
                                                "vlm-eval) or varied."),
        modes: str = typer.Option("spoken,text,spoken-blind,text-blind",
                                  help="Ways of asking, comma-separated."),
        batch_size: int = typer.Option(16, min=1),
    ) -> None:
        """Accuracy on spoken questions against the same questions as text and blind controls."""
        import imagefm
        from imagefm.apps.quickstart import SCENE_STYLES
        from imagefm.checkpoint import atomic_write_text
        from imagefm.eval.speech_vqa import evaluate_spoken_vqa, speech_vqa_markdown
        from imagefm.vlm_runtime import chat_processor

        if style not in SCENE_STYLES:
            raise typer.BadParameter(f"choose one of {', '.join(SCENE_STYLES)}",
                                     param_hint="--style")
        vlm = imagefm.load(model).eval()
        processor = chat_processor(vlm)
        chosen = [lang.strip() for lang in langs.split(",") if lang.strip()]
        try:
            results = evaluate_spoken_vqa(vlm, processor, n=questions, langs=chosen,
                                          split=split, seed=seed, voice=voice,
                                          style=SCENE_STYLES[style],
                                          modes=[m.strip() for m in modes.split(',')],
                                          batch_size=batch_size, progress=True)
        except ValueError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        table = speech_vqa_markdown(results, chosen)
        typer.echo(table)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            data = {mode: result.to_dict() for mode, result in results.items()}
            atomic_write_text(out / "results.json",
                              json.dumps(data, ensure_ascii=False, indent=1))
            atomic_write_text(out / "report.md", f"# Spoken questions: {model}\n\n"
                              f"split {split}, voice {voice}, {questions} per language\n\n"
                              + table)

