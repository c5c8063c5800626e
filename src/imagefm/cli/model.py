"""Commands about checkpoints: ``imagefm info``, ``imagefm convert``, ``imagefm export`` and
``imagefm download``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def describe(model: Any, source: str) -> list[tuple[str, str]]:
    """Rows (name, value) that describe a loaded model: architecture, size, preprocessing card."""
    from imagefm.checkpoint import architecture_name
    from imagefm.models.decoder import DecoderLM
    from imagefm.models.dual_encoder import DualEncoder
    from imagefm.models.vlm import VLM

    if isinstance(model, DecoderLM):
        return _describe_lm(model, source)
    if isinstance(model, VLM):
        return _describe_vlm(model, source)
    if not isinstance(model, DualEncoder):  # the other VLM families: the model card's rows
        from imagefm.model_card import architecture, parameter_count

        count, note = parameter_count(model)
        kind = getattr(model.config, "model_type", None)
        return [("source", source),
                ("architecture", architecture_name(model) + (f" ({kind})" if kind else "")),
                ("parameters", f"{count:,}" + (f" ({note})" if note else "")),
                *architecture(model)[1:]]
    c = model.config
    v, t = c.vision, c.text
    rows = [
        ("source", source),
        ("architecture", f"{architecture_name(model)} ({c.model_type})"),
        ("parameters", f"{model.num_parameters:,} (vision {_count(model.vision):,}, "
                       f"text {_count(model.text):,})"),
        ("vision", _vision_text(v)),
        ("text", f"{'BERT, ' if t.model_type == 'bert' else ''}width {t.width}, {t.layers} "
                 f"layers, {t.heads} heads, mlp {t.mlp_dim}, {t.act}, "
                 f"{'causal' if t.causal else 'bidirectional'}, pool {t.pool}, "
                 f"context {t.context_length}, vocab {t.vocab_size:,}"),
        ("embedding", f"{c.embed_dim} (image proj {c.image_projection}, "
                      f"text proj {c.text_projection})"),
        ("logit scale", f"{model.logit_scale.exp().item():.4g}"
                        + (f", bias {model.logit_bias.item():.4g}"
                           if model.logit_bias is not None else "")),
    ]
    card = model.card
    rows.append(("preprocess", f"{card.image_size}px, resize {card.resize_mode}, "
                               f"{card.interpolation}, mean {_fmt(card.mean)}, "
                               f"std {_fmt(card.std)}"))
    tok = getattr(model, "tokenizer", None)
    rows.append(("tokenizer", "none" if tok is None else f"vocab {tok.vocab_size:,}"))
    return rows


def _vision_text(v: Any) -> str:
    if v.model_type == "vit":
        return (f"ViT {v.image_size}px / patch {v.patch_size}, width {v.width}, {v.layers} "
                f"layers, {v.heads} heads, mlp {v.mlp_dim}, {v.act}, pool {v.pool}")
    return (f"EfficientNet-Lite {v.image_size}px, width x{v.width_coefficient:g}, depth "
            f"x{v.depth_coefficient:g}, {v.width} features, {v.act}")


def _lm_rows(lm: Any) -> list[tuple[str, str]]:
    """The decoder, its weights' format (float or quantised blocks), tokenizer, template."""
    from imagefm.models.quantized import decode_weight_bytes, describe_quantization

    c = lm.config
    rows = [("decoder", f"width {c.width}, {c.layers} layers, {c.heads} heads / {c.kv_heads} kv "
                        f"heads, mlp {c.mlp_dim}, context {c.context_length}, rope theta "
                        f"{c.rope_theta:g}" + (f" ({c.rope_scaling} x{c.rope_factor:g})"
                                               if c.rope_scaling != "default" else ""))]
    quantized = describe_quantization(lm)
    if quantized is not None:
        layers = ", ".join(f"{n} {k[:-1] if n == 1 else k}" for k, n in quantized.items() if n)
        rows.append(("quantised", f"{layers} (blocks of 32); {decode_weight_bytes(lm) / 1e6:.1f} "
                                  f"MB read per decoded token, float32 "
                                  f"{decode_weight_bytes(lm, 4) / 1e6:.1f} MB"))
    tok = getattr(lm, "tokenizer", None)
    rows += [("tokenizer", "none" if tok is None else f"vocab {tok.vocab_size:,}"),
             ("chat template", "own" if getattr(lm, "chat_template", None)
              else "ChatML (default)")]
    return rows


def _describe_lm(model: Any, source: str) -> list[tuple[str, str]]:
    c = model.config
    return [("source", source),
            ("architecture", f"decoder_lm ({c.model_type})"),
            ("parameters", f"{model.num_parameters:,}" + _notes(
                "tied embeddings" if c.tie_embeddings else "",
                "float only: quantised layers not counted" if _quantized(model) else "")),
            *_lm_rows(model)]


def _describe_vlm(model: Any, source: str) -> list[tuple[str, str]]:
    c = model.config
    return [("source", source),
            ("architecture", f"vlm (vision {c.vision.model_type}, lm {c.lm.model_type})"),
            ("parameters", f"{model.num_parameters:,} (vision {_count(model.vision):,}, "
                           f"projector {_count(model.projector):,}, lm {_count(model.lm):,}"
                           f"{', float only' if _quantized(model) else ''})"),
            ("vision", _vision_text(c.vision)),
            ("projector", f"{c.projector}" + (f", pixel shuffle {c.pixel_shuffle}"
                                              if c.pixel_shuffle > 1 else "")
             + f"; {c.image_tokens} tokens per image as {c.image_token!r} (id "
               f"{c.image_token_id})"),
            *_lm_rows(model.lm)]


def _notes(*notes: str) -> str:
    kept = [n for n in notes if n]
    return f" ({'; '.join(kept)})" if kept else ""


def _quantized(model: Any) -> bool:
    from imagefm.models.quantized import is_quantized

    return is_quantized(model)


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in values) + ")"


def _calibration_records(path: Path | None, n: int, seed: int, image_size: int) -> Any:
    """Records for static int8 calibration: shards, an image folder, or synthetic scenes."""
    from imagefm.data.files import read_image_folder
    from imagefm.data.formats import SkipCounter, read_shards

    if path is None:
        from imagefm.data.synthetic import generate

        return generate("scenes", n, seed=seed, image_size=image_size, workers=1)
    if path.is_dir() and not any(path.rglob("*.tar")):
        return read_image_folder(path, SkipCounter())
    return read_shards(path, SkipCounter())


def _export_onnx(model: Any, out: Path, *, int8: str | None, calibration: Path | None,
                 calibration_n: int, opset: int, seed: int) -> None:
    from imagefm.config import ConfigError
    from imagefm.convert.onnx_export import check_exportable, export_onnx
    from imagefm.convert.onnx_quantize import INT8_MODES, calibration_from_records

    if int8 is not None and int8 not in INT8_MODES:
        raise typer.BadParameter(f"--int8 must be one of {', '.join(INT8_MODES)}, got {int8!r}")
    if calibration is not None and int8 != "static":
        raise typer.BadParameter("--calibration is for --int8 static")
    check_exportable(model)  # before reading any calibration data
    data = None
    if int8 == "static":
        if getattr(model, "tokenizer", None) is None:
            raise ConfigError("--int8 static calibrates the text graph with texts, but this "
                              "model has no tokenizer; use --int8 dynamic")
        records = _calibration_records(calibration, calibration_n, seed, model.card.image_size)
        data = calibration_from_records(records, calibration_n)
    written = export_onnx(model, out, opset=opset, int8=int8, calibration=data)
    for path in written.values():
        if isinstance(path, Path):
            typer.echo(f"wrote {path}")
    if data is not None and data.skips.total_skipped:
        typer.echo(f"calibration images: {data.skips.report()}")


def _report_int8(out: Path, suites: list[str], eval_data: Path | None, classes: Path | None,
                 n: int, lang: str, seed: int) -> None:
    """Zero-shot top-1 of the float and int8 graphs; printed and written to int8_eval.json."""
    import json

    from imagefm.checkpoint import atomic_write_text
    from imagefm.eval.onnx_int8 import compare_int8, format_int8_table
    from imagefm.eval.suites import SUITES

    langs = [x.strip() for x in lang.split(",") if x.strip()]
    evaluate = None
    if eval_data is not None:
        from imagefm.cli.eval import run_zeroshot_eval

        def evaluate(model: Any, processor: Any) -> list[dict[str, Any]]:
            return run_zeroshot_eval(model, processor, eval_data, langs, classes, None, n, 64)
    else:
        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            raise typer.BadParameter(f"unknown suite {', '.join(unknown)}; choose among "
                                     f"{', '.join(SUITES)} or none")
    result = compare_int8(out, suites=suites, langs=langs, n=n, seed=seed, evaluate=evaluate)
    path = atomic_write_text(out / "int8_eval.json", json.dumps(result, indent=2) + "\n")
    typer.echo(format_int8_table(result))
    typer.echo(f"wrote {path}")


def _gguf_quant(quant: str) -> str:
    from imagefm.convert.gguf_export import QUANTS

    if quant not in QUANTS:
        raise typer.BadParameter(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r} "
                                 f"(other k-quants: export f16 or q8_0, then llama-quantize)")
    return quant


def _export_gguf(model: Any, out: Path, quant: str) -> None:
    """A language model as one GGUF file for llama.cpp (a directory --out gets model-QUANT.gguf)."""
    from imagefm.convert.gguf_export import describe_gguf_export, export_gguf
    from imagefm.models.vlm import VLM

    if isinstance(model, VLM):  # --out is a directory: model-QUANT.gguf + mmproj-f16.gguf (f32)
        from imagefm.convert.mmproj_export import describe_mmproj_export, export_vlm_gguf

        lm_path, mmproj_path = export_vlm_gguf(model, out, quant=quant)
        typer.echo(f"wrote {lm_path}: {describe_gguf_export(lm_path)}")
        typer.echo(f"wrote {mmproj_path}: {describe_mmproj_export(mmproj_path)}")
        return
    path = out / f"model-{quant}.gguf" if out.is_dir() else out
    export_gguf(model, path, quant=quant)
    typer.echo(f"wrote {path}: {describe_gguf_export(path)}")


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        path: Path = typer.Argument(..., help="Checkpoint: imagefm, Hugging Face, open_clip or "
                                              "GGUF; a path or a Hub id (org/name)."),
        arch: str = typer.Option(None, help="open_clip architecture of a bare state-dict file."),
    ) -> None:
        """Print a checkpoint's architecture, parameter count and preprocessing card."""
        import imagefm

        model = imagefm.load(path, arch=arch)
        rows = describe(model, str(path))
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            typer.echo(f"{name:<{width}}  {value}")

    @app.command()
    def convert(
        src: Path = typer.Argument(..., help="Checkpoint to read (any format imagefm loads)."),
        dst: Path = typer.Argument(..., help="Output directory."),
        to: str = typer.Option("imagefm", help="Output format: imagefm or hf."),
        arch: str = typer.Option(None, help="open_clip architecture of a bare state-dict file."),
    ) -> None:
        """Convert a checkpoint to imagefm format, or back to Hugging Face format (--to hf)."""
        import imagefm

        if to not in ("imagefm", "hf"):
            raise typer.BadParameter(f"--to must be 'imagefm' or 'hf', got {to!r}")
        model = imagefm.load(src, arch=arch)
        if to == "hf":  # the transformers class of the model's family (convert.export)
            from imagefm.convert.export import export_to_hf

            export_to_hf(model, dst)
        else:
            model.save_pretrained(dst)
        typer.echo(f"wrote {to} checkpoint to {dst}")

    @app.command("export")
    def export_command(
        src: Path = typer.Argument(..., metavar="MODEL",
                                   help="Checkpoint to read (any format imagefm loads)."),
        out: Path = typer.Option(..., "--out", help="Output directory."),
        fmt: str = typer.Option("onnx", "--format", help="onnx (dual encoders: image and text "
                                                         "graphs + preprocess.json), hf, or gguf "
                                                         "(language models: one llama.cpp "
                                                         "file, --out names it; LLaVA-style "
                                                         "VLMs: model + mmproj files in the "
                                                         "--out directory)."),
        int8: str = typer.Option(None, "--int8", help="Also write int8 graphs: dynamic or "
                                                      "static (calibrated), then report the "
                                                      "zero-shot top-1 they cost."),
        calibration: Path = typer.Option(None, "--calibration",
                                         help="Shards or an image folder whose images and "
                                              "captions calibrate --int8 static (default: "
                                              "synthetic scenes)."),
        calibration_n: int = typer.Option(64, "--calibration-n",
                                          help="Calibration images (and texts) to use."),
        eval_suite: str = typer.Option("colour,shape", "--eval-suite",
                                       help="Synthetic suites measuring the int8 cost, "
                                            "comma-separated, or none."),
        eval_data: Path = typer.Option(None, "--eval-data",
                                       help="Labelled shards to measure the int8 cost on "
                                            "instead (zero-shot, as imagefm eval --suite "
                                            "zeroshot; class names as there or --classes)."),
        classes: Path = typer.Option(None, "--classes", help="JSON class names for --eval-data."),
        eval_n: int = typer.Option(100, "--eval-n", help="Images per suite (or records of "
                                                         "--eval-data) for the int8 cost."),
        lang: str = typer.Option("en", "--lang", help="Language(s) of the int8 evaluation."),
        seed: int = typer.Option(0, "--seed", help="Seed of synthetic images."),
        opset: int = typer.Option(18, "--opset", help="ONNX opset of the graphs."),
        quant: str = typer.Option(None, "--quant", help="--format gguf: f16 (default), f32, "
                                                        "q8_0, q4_0, q4_1 or q4_k (4-bit files "
                                                        "keep the output head q8_0; q4_k: Q5_0 "
                                                        "for rows not in blocks of 256)."),
        arch: str = typer.Option(None, help="open_clip architecture of a bare state-dict file."),
    ) -> None:
        """Export a model: ONNX graphs for runtimes without imagefm (--format onnx, optionally
        int8), the Hugging Face directory of its transformers class (--format hf), or a
        language model as one GGUF file for llama.cpp (--format gguf --quant q8_0; a VLM: its LM
        and an mmproj file for llama.cpp's multimodal tools)."""
        import imagefm

        if fmt not in ("onnx", "hf", "gguf"):
            raise typer.BadParameter(f"--format must be 'onnx', 'hf' or 'gguf', got {fmt!r}")
        if fmt != "onnx" and (int8 or calibration):
            raise typer.BadParameter("--int8 and --calibration apply to --format onnx only")
        if quant is not None and fmt != "gguf":
            raise typer.BadParameter("--quant applies to --format gguf only")
        if fmt == "gguf":
            _gguf_quant(quant or "f16")  # before loading the model
        model = imagefm.load(src, arch=arch)
        if fmt == "gguf":
            _export_gguf(model, out, quant or "f16")
            return
        if fmt == "hf":
            from imagefm.convert.export import export_to_hf

            export_to_hf(model, out)
            typer.echo(f"wrote hf checkpoint to {out}")
            return
        _export_onnx(model, out, int8=int8, calibration=calibration,
                     calibration_n=calibration_n, opset=opset, seed=seed)
        suites = [s.strip() for s in eval_suite.split(",") if s.strip() not in ("", "none")]
        if int8 and (suites or eval_data is not None):
            _report_int8(out, suites, eval_data, classes, eval_n, lang, seed)

    @app.command()
    def download(
        repo: str = typer.Argument(..., metavar="ID",
                                   help="Hub id: org/name or hf-hub:org/name (optionally @rev)."),
        revision: str = typer.Option(None, help="Branch, tag or commit (default: main)."),
        cache_dir: Path = typer.Option(None, help="Hub cache (default: HF_HUB_CACHE / HF_HOME)."),
        filename: str = typer.Option(None, help="The one weight file to take (GGUF repos)."),
        token: str = typer.Option(None, envvar="HF_TOKEN", show_envvar=False,
                                  help="Hub token for gated or private repos (default: HF_TOKEN "
                                       "or `hf auth login`)."),
    ) -> None:
        """Fill the Hub cache with what `imagefm.load(ID)` needs, for machines that go offline."""
        from imagefm.hub import HubError, describe_download, parse_hub_id
        from imagefm.loading import detect_format, locate

        if parse_hub_id(repo) is None:
            raise HubError(f"{repo!r} is not a hub id (org/name or hf-hub:org/name) or is a "
                           f"local path")
        path = locate(repo, revision=revision, cache_dir=cache_dir, token=token,
                      filename=filename)
        summary = describe_download(path)
        typer.echo(f"{repo}: {detect_format(path)} checkpoint, {summary['files']} files, "
                   f"{summary['bytes'] / 1e6:.1f} MB in {path}")
        typer.echo("offline later: HF_HUB_OFFLINE=1 imagefm ... (same HF_HOME / cache)")
