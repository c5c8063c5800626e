"""Model cards: the README.md a saved model carries, with the Hugging Face Hub's metadata header.

    text = model_card(model, license="apache-2.0", languages=["en", "ko"],
                      training_data=["tuxpaint-stamps (train split)"],
                      eval_results={"tuxpaint ko zero-shot top-1": 0.61})
    write_model_card(model, "runs/clip", license="apache-2.0")   # runs/clip/README.md

The header is YAML between ``---`` lines, the fields the Hub reads: ``library_name``,
``license``, ``language``, ``tags``, ``pipeline_tag``, ``base_model`` and ``datasets``. The body
says what the model is (architecture, parameter count, preprocessing), how to load it, what it
was trained on and the evaluation numbers given.

Facts about the model come from the model itself (its config, image card and tokenizer); facts
it cannot know (licence, languages, data, scores, what it was fine-tuned from) are arguments,
and what is not given is said to be unknown, never guessed. The model is described by its
config's shape (a ``vision`` + ``text`` pair, a ``vision`` + ``lm`` pair, or a decoder), so this
module imports no model class and can be called from wherever models are saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

CARD_FILE = "README.md"

# What a model of each kind does, in the Hub's pipeline vocabulary.
PIPELINE_TAGS = {"dual_encoder": "zero-shot-image-classification",
                 "vlm": "image-text-to-text",
                 "decoder_lm": "text-generation", "audio_encoder": "feature-extraction",
                 "clap": "zero-shot-audio-classification", "point_clip": "feature-extraction",
                 "speech_ctc": "automatic-speech-recognition"}
KIND_NAMES = {"dual_encoder": "dual encoder", "vlm": "vision-language model",
              "decoder_lm": "decoder language model", "audio_encoder": "audio encoder",
              "clap": "speech–text dual encoder (CLAP)",
              "speech_ctc": "speech recogniser (CTC, to pre-train an audio tower)",
              "point_clip": "point cloud–text dual encoder (ULIP style)"}
# A Hub dataset id: "org/name". Anything else in training_data is a description.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_RESIZE = {"shortest": "resize the shortest side to {s} px, centre crop {s}×{s}",
           "squash": "resize to {s}×{s} px (aspect ratio not kept)",
           "pad": "resize the longest side to {s} px, centre on a white {s}×{s} canvas",
           "naflex": "keep the aspect ratio; at most {n} patches of {p} px (NaFlex)"}


def model_kind(model: Any) -> str:
    """``dual_encoder``, ``vlm`` or ``decoder_lm``, read off the shape of ``model.config``."""
    config = getattr(model, "config", None)
    if hasattr(config, "vision") and hasattr(config, "lm"):
        return "vlm"
    if hasattr(config, "vision") and hasattr(config, "text"):
        return "dual_encoder"
    if hasattr(config, "audio") and hasattr(config, "text"):
        return "clap"  # a speech–text dual encoder (models/clap.py)
    if hasattr(config, "point") and hasattr(config, "text"):
        return "point_clip"  # a point cloud–text dual encoder (models/point_encoder.py)
    if all(hasattr(config, name) for name in ("vocab_size", "layers", "heads", "width")):
        return "decoder_lm"
    if hasattr(config, "encoder") and hasattr(config, "alphabet"):
        return "speech_ctc"  # an audio tower + CTC head (models/speech_ctc.py)
    if all(hasattr(config, name) for name in ("num_mel_bins", "d_model", "encoder_layers")):
        return "audio_encoder"  # a Whisper-style audio tower (models/whisper_encoder.py)
    raise ValueError(f"cannot write a model card for a {type(model).__name__}: not an imagefm "
                     f"dual encoder, VLM or decoder")


# --- facts read off the model --------------------------------------------------------------------

def parameter_count(model: Any) -> tuple[int, str]:
    """Parameters, counting each weight of a quantised layer once (its blocks are buffers),
    and a note on quantisation ("" for a float model)."""
    total = sum(p.numel() for p in model.parameters())
    bits: dict[int, int] = {}
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "in_features"):
            total += module.in_features * module.out_features
            bias = getattr(module, "bias", None)
            total += bias.numel() if bias is not None else 0
            bits[module.bits] = bits.get(module.bits, 0) + 1
    note = ", ".join(f"{n} linear layers in {b}-bit blocks" for b, n in sorted(bits.items()))
    return total, note


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _vision(v: Any) -> str:
    """A vision tower config in words: whichever of the usual fields it has."""
    name = "ViT" if v.model_type == "vit" else v.model_type
    parts = [name]
    if all(hasattr(v, f) for f in ("layers", "width", "heads")):
        parts.append(f"{v.layers} layers × {v.width} wide, {v.heads} heads")
    parts += [f"{label} {getattr(v, f)}{unit}" for f, label, unit in
              (("patch_size", "patch", ""), ("image_size", "", " px"), ("pool", "", " pooling"))
              if hasattr(v, f)]
    return ", ".join(p.strip() for p in parts)


def _text(t: Any) -> str:
    kind = "causal" if getattr(t, "causal", False) else "bidirectional"
    name = "transformer" if t.model_type == "transformer" else t.model_type
    return (f"{name} ({kind}), {t.layers} layers × {t.width} wide, {t.heads} heads, vocabulary "
            f"{t.vocab_size}, context {t.context_length}, {t.pool} pooling")


def _decoder(c: Any) -> str:
    heads = f"{c.heads} heads" + (f" ({c.kv_heads} key/value)" if c.kv_heads != c.heads else "")
    return (f"{c.model_type} decoder, {c.layers} layers × {c.width} wide, {heads}, vocabulary "
            f"{c.vocab_size}, context {c.context_length}")


def architecture(model: Any) -> list[tuple[str, str]]:
    """(field, value) rows describing the architecture."""
    kind, c = model_kind(model), model.config
    if kind == "dual_encoder":
        loss = "sigmoid (SigLIP)" if c.model_type == "siglip" else "softmax (CLIP)"
        return [("architecture", f"{c.model_type} dual encoder"),
                ("image tower", _vision(c.vision)), ("text tower", _text(c.text)),
                ("embedding", f"{c.embed_dim}-d, {loss} loss")]
    if kind == "vlm":
        rows = [("architecture", f"vision-language model ({type(model).__name__}: vision tower "
                                 f"→ projector → decoder)"),
                ("vision tower", _vision(c.vision))]
        if hasattr(c, "projector"):
            shuffle = getattr(c, "pixel_shuffle", 1)
            rows.append(("projector", c.projector + (f" ×{shuffle}" if shuffle > 1 else "")))
        return [*rows, ("language model", _decoder(c.lm))]
    if kind == "clap":
        a = c.audio
        return [("architecture", f"CLAP speech–text dual encoder ({c.model_type} loss)"),
                ("audio tower", f"Whisper-style, {a.encoder_layers} layers × {a.d_model} wide, "
                                f"mean over real frames"),
                ("text tower", _text(c.text)), ("embedding", f"{c.embed_dim}-d")]
    if kind == "point_clip":
        p = c.point
        return [("architecture", f"point cloud–text dual encoder ({c.model_type} loss)"),
                ("point tower", f"Point-BERT-style, {p.num_groups} patches × {p.group_size} "
                                f"points, {p.layers} layers × {p.width} wide"),
                ("text tower", _text(c.text) + (" (locked)" if c.lock_text else "")),
                ("embedding", f"{c.embed_dim}-d")]
    if kind == "audio_encoder":
        return [("architecture", f"Whisper-style audio encoder, {c.encoder_layers} layers × "
                                 f"{c.d_model} wide, {c.encoder_attention_heads} heads"),
                ("input", f"{c.num_mel_bins} log-mel bins, up to {2 * c.max_source_positions} "
                          f"frames")]
    if kind == "speech_ctc":
        e = c.encoder
        return [("architecture", f"Whisper-style audio encoder, {e.encoder_layers} layers × "
                                 f"{e.d_model} wide, + a linear CTC head over "
                                 f"{len(c.alphabet)} characters"),
                ("input", f"{e.num_mel_bins} log-mel bins, clips padded to {c.seconds:g} s")]
    return [("architecture", _decoder(c))]


def _tags(model: Any, kind: str) -> list[str]:
    c = model.config
    if kind == "dual_encoder":
        tags = [c.model_type, "dual-encoder"]
    elif kind == "vlm":  # the VLM's own type where it has one (qwen2_vl), then its LM's
        tags = ["vision-language", *([c.model_type] if hasattr(c, "model_type") else []),
                c.lm.model_type]
    elif kind == "audio_encoder":
        tags = ["whisper", "audio-encoder"]
    elif kind == "clap":
        tags = ["clap", "speech", "dual-encoder"]
    elif kind == "speech_ctc":
        tags = ["speech-recognition", "ctc", "audio-encoder"]
    elif kind == "point_clip":
        tags = ["point-cloud", "ulip", "dual-encoder"]
    else:
        tags = [c.model_type, "decoder"]
    if parameter_count(model)[1]:
        tags.append("quantized")
    return ["imagefm", *tags]


def preprocessing(model: Any) -> list[str]:
    """Lines saying how images and text become model inputs."""
    lines = []
    card = getattr(model, "card", None)
    if card is not None:
        how = _RESIZE.get(card.resize_mode, f"resize mode {card.resize_mode!r}").format(
            s=card.image_size, n=getattr(card, "max_num_patches", None),
            p=getattr(card, "patch_size", None))
        mean = ", ".join(f"{m:.4g}" for m in card.mean)
        std = ", ".join(f"{s:.4g}" for s in card.std)
        lines.append(f"Images: {how}, {card.interpolation} interpolation; RGB scaled to [0, 1], "
                     f"then normalised with mean ({mean}) and std ({std}).")
    elif dataclasses.is_dataclass(image := getattr(getattr(model, "config", None), "image", None)):
        # Models that size images themselves (Qwen2-VL's pixel budget): their settings as given.
        settings = ", ".join(f"{k} {_number(v)}" for k, v in dataclasses.asdict(image).items())
        lines.append(f"Images: {settings}.")
    mel = getattr(getattr(model, "config", None), "mel", None)
    if dataclasses.is_dataclass(mel):  # an audio tower's log-mel features
        chunk = (f"padded to {mel.chunk_seconds:g} s" if mel.chunk_seconds is not None
                 else "not padded (a frame mask marks real frames)")
        lines.append(f"Audio: mono {mel.sampling_rate} Hz, {mel.n_mels} log-mel bins (Whisper's "
                     f"recipe), window {mel.n_fft}, hop {mel.hop_length}, {chunk}.")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        settings = tokenizer.settings() if hasattr(tokenizer, "settings") else {}
        parts = [f"vocabulary {getattr(tokenizer, 'vocab_size', '?')}"]
        if "context_length" in settings:
            parts.append(f"context {settings['context_length']} tokens, padding "
                         f"{settings.get('padding')}")
        lines.append("Text: the saved tokenizer (" + ", ".join(parts) + ").")
    if getattr(model, "chat_template", None):
        lines.append("Chat: the saved chat template (chat_template.jinja) formats conversations.")
    return lines or ["No preprocessing is stored with this model."]


# --- the card ------------------------------------------------------------------------------------

def _as_list(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) and item.strip() for item in items):
        raise ValueError(f"{what} must be a string or a list of non-empty strings, got {value!r}")
    return [item.strip() for item in items]


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(value: Any) -> str:
    return _number(value).replace("|", "\\|").replace("\n", " ")


def _flat(result: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar entries of one result, nested mappings one level deep as ``outer.inner``; lists
    (per-class tables, confusion matrices) are left out of the card."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()
                        if not isinstance(v, (Mapping, list, tuple))})
        elif not isinstance(value, (list, tuple)):
            out[key] = value
    return out


def eval_table(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: ``{metric: value}`` as two columns, or a list of result dicts (as
    ``imagefm eval`` writes them) as one row each, with the union of their scalar fields."""
    if isinstance(results, Mapping):
        rows = [[str(k), _cell(v)] for k, v in results.items()]
        header = ["metric", "value"]
    else:
        flat = [_flat(r) for r in results]
        header = list(dict.fromkeys(k for r in flat for k in r))
        rows = [[_cell(r.get(k, "")) for k in header] for r in flat]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(model: Any, *, training_data: str | Sequence[str] | None = None,
               eval_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
               license: str | None = None, languages: str | Sequence[str] | None = None,
               base_model: str | Sequence[str] | None = None, name: str | None = None) -> str:
    """The README.md for ``model``: the Hub's YAML header, then a description.

    ``training_data``: dataset names or descriptions; entries shaped like a Hub dataset id
    (``org/name``) also go to the header's ``datasets``. ``eval_results``: ``{metric: value}``
    or a list of result dicts. ``license``: a Hub licence id (``apache-2.0``, ``mit``…).
    ``languages``: ISO 639-1 codes. ``base_model``: the Hub id(s) this model was trained from.
    ``name``: the title and the id in the loading example (default: ``path/to/model``).
    """
    kind = model_kind(model)
    data = _as_list(training_data, "training_data")
    langs = _as_list(languages, "languages")
    bases = _as_list(base_model, "base_model")
    meta: dict[str, Any] = {"library_name": "imagefm"}
    if license is not None:
        meta["license"] = _as_list(license, "license")[0]
    if langs:
        meta["language"] = langs
    meta["tags"] = _tags(model, kind)
    meta["pipeline_tag"] = PIPELINE_TAGS[kind]
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
    datasets = [d for d in data if _HUB_ID.match(d)]
    if datasets:
        meta["datasets"] = datasets
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)

    title = name or "path/to/model"
    count, quantized = parameter_count(model)
    facts = [*architecture(model),
             ("parameters", f"{count:,} ({_human(count)})" + (f"; {quantized}" if quantized
                                                              else ""))]
    if langs:
        facts.append(("languages", ", ".join(langs)))
    if bases:
        facts.append(("fine-tuned from", ", ".join(bases)))
    facts.append(("licence", license or "not stated"))
    body = [f"# {title}", f"An imagefm {KIND_NAMES[kind]} ({_human(count)} parameters).",
            "## Model", "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_cell(v)} |"
                                                          for k, v in facts),
            "## Preprocessing", "\n".join(f"- {line}" for line in preprocessing(model)),
            "## How to load",
            "```python\nimport imagefm\n\n"
            f"model = imagefm.load({json.dumps(title, ensure_ascii=False)})\n"
            + (f"processor = imagefm.load_processor({json.dumps(title, ensure_ascii=False)})\n"
               if kind != "decoder_lm" else "tokenizer = model.tokenizer\n")
            + "```",
            "## Training data",
            "\n".join(f"- {d}" for d in data) if data else "Not recorded.",
            "## Evaluation",
            eval_table(eval_results) if eval_results else "No evaluation results recorded."]
    return f"---\n{header}---\n\n" + "\n\n".join(body) + "\n"
