"""Language-model commands: ``imagefm generate MODEL "prompt"`` streams a continuation."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model_path: Path = typer.Argument(..., metavar="MODEL",
                                          help="A .gguf file, an HF Llama/Qwen2 directory or an "
                                               "imagefm decoder checkpoint."),
        prompt: str = typer.Argument(..., help="The prompt (a user message with --chat)."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1),
        chat: bool = typer.Option(True, "--chat/--raw",
                                  help="Wrap the prompt in the model's chat template (default), "
                                       "or continue the raw text."),
        system: str = typer.Option(None, help="System message (with --chat)."),
        temperature: float = typer.Option(0.0, min=0.0,
                                          help="0 = greedy; above 0 samples."),
        top_k: int = typer.Option(0, min=0, help="Sample from the k most likely (0 = all)."),
        top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass."),
        repetition_penalty: float = typer.Option(1.0, min=0.0),
        seed: int = typer.Option(None, help="Seed for sampling."),
        stats: bool = typer.Option(False, help="Print time to first token and tokens/s."),
    ) -> None:
        """Generate text from a language model, streaming it as it is produced."""
        import torch

        import imagefm
        from imagefm.chat import chat_stops, encode_chat
        from imagefm.models.decoder import DecoderLM
        from imagefm.models.generation import stream_text

        model = imagefm.load(model_path)
        if not isinstance(model, DecoderLM):
            raise typer.BadParameter(f"{model_path} is a {type(model).__name__}, not a "
                                     f"language model", param_hint="MODEL")
        if model.tokenizer is None:
            raise typer.BadParameter(f"{model_path} has no tokenizer", param_hint="MODEL")
        eos_ids, stops = list(model.config.eos_token_ids), ()
        if chat:
            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": prompt})
            ids = encode_chat(model, messages)
            eos_ids, stops = chat_stops(model)
        else:
            ids = model.tokenizer.encode(prompt)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        started = time.perf_counter()
        first = None
        pieces = 0
        for piece in stream_text(model, model.tokenizer, torch.tensor([ids]),
                                 max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature or 1.0, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty, stop_strings=stops,
                                 eos_token_id=eos_ids, generator=generator):
            first = first or time.perf_counter()
            pieces += 1
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if stats and first is not None:
            total = time.perf_counter() - started
            typer.echo(f"[{len(ids)} prompt tokens; first text after {first - started:.2f} s; "
                       f"{pieces} pieces in {total:.2f} s]", err=True)
