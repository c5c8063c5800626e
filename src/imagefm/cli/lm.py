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
        quantize: str = typer.Option(
            "auto", help="auto: keep a GGUF file's Q4_0/Q4_1/Q8_0 blocks (the same weights, "
                         "read ~5x faster on the CPU); none: float weights; q4_0, q4_1, q8_0: "
                         "quantise every linear layer (lossy for float checkpoints)."),
    ) -> None:
        """Generate text from a language model, streaming it as it is produced."""
        import torch

        from imagefm.chat import chat_stops, encode_chat
        from imagefm.models.decoder import DecoderLM
        from imagefm.models.generation import TextStream

        model = load_language_model(model_path, quantize)
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
        stream = TextStream(model, model.tokenizer, torch.tensor([ids]),
                            max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                            temperature=temperature or 1.0, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop_strings=stops,
                            eos_token_id=eos_ids, generator=generator)
        for piece in stream:
            first = first or time.perf_counter()
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if stats and first is not None:
            total = time.perf_counter() - started
            typer.echo(f"[{len(ids)} prompt tokens; first text after {first - started:.2f} s; "
                       f"{stream.tokens} tokens in {total:.2f} s, "
                       f"{stream.tokens / total:.1f} tokens/s]", err=True)

    @app.command("extend-vocab")
    def extend_vocab(
        model_path: Path = typer.Argument(..., metavar="MODEL",
                                          help="A language model imagefm loads (.gguf, HF dir, "
                                               "imagefm dir)."),
        out: Path = typer.Argument(..., help="Where to write the extended model (imagefm)."),
        corpus: list[Path] = typer.Option(None, "--corpus",
                                          help="Korean text file(s), one text per line: the "
                                               "syllables to add are counted here."),
        synthetic: int = typer.Option(0, min=0, help="Also count syllables in this many "
                                                     "synthetic Korean captions and questions."),
        top: int = typer.Option(2000, min=1, help="Add at most this many syllables."),
        eval_file: Path = typer.Option(None, "--eval",
                                       help="Texts to measure tokens per syllable on (default: "
                                            "the corpus)."),
    ) -> None:
        """Add frequent Hangul syllables as whole tokens (new embeddings start as the mean of
        their old pieces) and report tokens per syllable before and after."""
        import imagefm
        from imagefm.models.decoder import DecoderLM
        from imagefm.models.vocab import extend_vocabulary, hangul_syllables, tokens_per_syllable

        texts = [line for path in corpus or [] for line in _read_lines(path)]
        if synthetic:
            texts += _synthetic_korean(synthetic)
        if not texts:
            raise typer.BadParameter("give Korean text with --corpus FILE or --synthetic N")
        measure = _read_lines(eval_file) if eval_file else texts
        model = imagefm.load(model_path)
        if not isinstance(model, DecoderLM) or model.tokenizer is None:
            raise typer.BadParameter(f"{model_path} is not a language model with a tokenizer",
                                     param_hint="MODEL")
        before = tokens_per_syllable(model.tokenizer, measure)
        added = extend_vocabulary(model, hangul_syllables(texts, top=top))
        after = tokens_per_syllable(model.tokenizer, measure)
        model.save_pretrained(out)
        typer.echo(f"added {len(added)} Hangul tokens (vocabulary {model.config.vocab_size:,}); "
                   f"tokens per syllable {before:.2f} -> {after:.2f} on "
                   f"{'the --eval texts' if eval_file else 'the corpus'}; wrote {out}")


    @app.command()
    def quantize(
        model_path: Path = typer.Argument(..., metavar="MODEL",
                                          help="An imagefm language model or VLM checkpoint, an "
                                               "HF Llama/Qwen2/LLaVA directory or a .gguf file."),
        out: Path = typer.Option(..., "--out", "-o", help="Where to write the checkpoint."),
        kind: str = typer.Option("auto", "--format",
                                 help="q4_0, q4_1 or q8_0 for the LM's linear layers; auto: a "
                                      "GGUF file's own blocks, q8_0 otherwise."),
        head: str = typer.Option("q8_0", help="The output projection: q4_0, q4_1, q8_0 or none "
                                              "(float)."),
        force: bool = typer.Option(False, help="Write into a non-empty --out."),
    ) -> None:
        """Quantise a language model (or a VLM's LM) to 4- or 8-bit blocks and save it: decoding
        on the CPU reads 3.5-7x fewer bytes per token. The blocks are the saved model's weights:
        generate, ask, chat and serve load them as they are."""
        import imagefm
        from imagefm.checkpoint import save_model
        from imagefm.convert.gguf import is_gguf, load_gguf
        from imagefm.models.quantized import (
            FORMATS,
            decode_weight_bytes,
            dequantize_decoder,
            is_quantized,
            kernel_status,
            quantize_model,
        )

        if kind not in ("auto", *FORMATS):
            raise typer.BadParameter(f"{kind!r} is not one of auto, {', '.join(FORMATS)}",
                                     param_hint="--format")
        if head not in ("none", *FORMATS):
            raise typer.BadParameter(f"{head!r} is not one of none, {', '.join(FORMATS)}",
                                     param_hint="--head")
        if out.exists() and any(out.iterdir()) and not force:
            raise typer.BadParameter(f"{out} is not empty (--force to write into it)",
                                     param_hint="--out")
        available, why = kernel_status()
        if not available:
            raise typer.BadParameter(f"the quantised kernel cannot be built here: {why}",
                                     param_hint="MODEL")
        keep_file = kind == "auto" and is_gguf(model_path)
        model = load_gguf(model_path, keep_quantized=True) if keep_file \
            else imagefm.load(model_path)
        lm = getattr(model, "lm", model)
        if not hasattr(lm, "blocks"):
            raise typer.BadParameter(f"{model_path} is a {type(model).__name__}: only language "
                                     f"models and VLMs are quantised", param_hint="MODEL")
        if not keep_file:
            if is_quantized(lm):  # re-quantising: from its float values
                dequantize_decoder(lm)
            quantize_model(model, "q8_0" if kind == "auto" else kind,
                           None if head == "none" else head)
        save_model(model, out)
        typer.echo(f"wrote {out}: {decode_weight_bytes(lm) / 1e6:.1f} MB of weights read per "
                   f"decoded token (float32: {decode_weight_bytes(lm, 4) / 1e6:.1f} MB)")


def load_language_model(path: Path, quantize: str = "auto") -> object:
    """Load ``path`` for inference; ``quantize`` as ``imagefm generate --quantize``."""
    import imagefm
    from imagefm.convert.gguf import is_gguf, load_gguf
    from imagefm.models.decoder import DecoderLM
    from imagefm.models.quantized import (
        FORMATS,
        dequantize_decoder,
        is_quantized,
        quantize_decoder,
    )

    choices = ("auto", "none", *FORMATS)
    if quantize not in choices:
        raise typer.BadParameter(f"{quantize!r} is not one of {', '.join(choices)}",
                                 param_hint="--quantize")
    if quantize == "auto" and is_gguf(path):
        return load_gguf(path, keep_quantized=True)
    model = imagefm.load(path)
    if isinstance(model, DecoderLM):
        if quantize == "none" and is_quantized(model):
            dequantize_decoder(model)  # a quantised checkpoint, asked for float layers
        elif quantize in FORMATS and not is_quantized(model):
            quantize_decoder(model, quantize)
    return model


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise typer.BadParameter(f"cannot read {path}: {err}") from None


def _synthetic_korean(n: int) -> list[str]:
    from imagefm.data.synthetic import generate

    texts: list[str] = []
    for record in generate("vqa", n, seed=0, langs=("ko",)):
        texts += [turn.content.replace("<image>", "").strip() for turn in record.conversation]
    for record in generate("scenes", n, seed=0):
        texts += record.captions_in("ko")
    return texts
