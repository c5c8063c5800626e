"""Commands about checkpoints: ``imagefm info``, ``imagefm convert`` and ``imagefm download``."""

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
