"""A CLIP / SigLIP dual encoder → two ONNX graphs and a preprocessing card (``imagefm export``).

    out/image_encoder.onnx   pixel_values float32 [batch, 3, S, S]        → image_embeds [batch, D]
    out/text_encoder.onnx    input_ids, attention_mask int64 [batch, seq] → text_embeds [batch, D]
    out/preprocess.json      how to make those inputs from an image file and a string, without
                             imagefm (PIL + numpy + tokenizers), and how to turn embeddings
                             into logits (logit_scale, logit_bias)
    out/tokenizer.json       the vocabulary (spiece.model for a sentencepiece one), plus
                             imagefm_tokenizer.json, the same settings as our Tokenizer reads
    out/*.int8.onnx          with ``int8=`` (imagefm.convert.onnx_quantize)

The embeddings are exactly what ``encode_image`` / ``encode_text`` return: projected and NOT
L2-normalised (the card says so); normalise them before a cosine or the logits.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the default since
torch 2.9 and the one still developed; the TorchScript exporter is deprecated. It keeps the
dynamic axes as symbols checked by torch.export (a guard that would specialise a dynamic axis
is an error at export time, not a silently wrong graph) and keeps an input the graph does not
read (CLIP's causal text tower never needs ``attention_mask``, yet every text graph takes it,
so clients treat CLIP and SigLIP alike). Attention is exported through
``F.scaled_dot_product_attention`` with its explicit boolean masks for every length (see
``sdpa_attention``), which onnxscript lowers to plain MatMul/Softmax ops at opset 18.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from imagefm.checkpoint import CheckpointError, atomic_write, atomic_write_text
from imagefm.config import ConfigError
from imagefm.convert.onnx_quantize import INT8_MODES, Calibration, int8_path, quantize_int8
from imagefm.models import layers
from imagefm.models.dual_encoder import DualEncoder
from imagefm.tokenizer import SENTENCEPIECE_FILE, TOKENIZER_JSON

IMAGE_GRAPH = "image_encoder.onnx"
TEXT_GRAPH = "text_encoder.onnx"
CARD_FILE = "preprocess.json"
CARD_FORMAT = "imagefm-onnx"
CARD_VERSION = 1
DEFAULT_OPSET = 18  # onnxruntime >= 1.14 runs it; LayerNormalization is a single op from 17
# Above this size a graph keeps its weights in a side file (<graph>.data): protobuf stops at 2 GB.
EXTERNAL_DATA_BYTES = 1_800_000_000

_RESIZE_RULES = {
    "shortest": "scale the shorter side to size and the longer one to int(size * long / short) "
                "(truncated), then crop size x size at left = (new_width - size) // 2, "
                "top = (new_height - size) // 2",
    "squash": "resize straight to size x size (the aspect ratio is not kept); no crop",
    "pad": "scale the longer side to size and the shorter one to round(size * short / long), "
           "then paste at left = round((size - new_width) / 2), "
           "top = round((size - new_height) / 2) (half to even, as Pillow's ImageOps.pad) on a "
           "white (255, 255, 255) canvas",
}


class ImageEncoderGraph(nn.Module):
    """What the image graph computes: ``model.encode_image(pixel_values)``."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextEncoderGraph(nn.Module):
    """What the text graph computes: ``model.encode_text(input_ids, attention_mask)``."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


@contextlib.contextmanager
def sdpa_attention() -> Iterator[None]:
    """Route every attention through SDPA while the graph is traced.

    ``layers.attend`` computes short CPU sequences with explicit matmuls instead: a speed
    heuristic on the number of keys. Traced, it would pick the graph's attention from the
    example's length (and hang a guard on the dynamic sequence symbol). With the threshold below
    any length every model and length gets the same graph: SDPA's math with the model's boolean
    masks (both paths agree within 2e-6 on the tests' models). Process-wide for the duration; it
    only picks a kernel, so what other threads compute meanwhile is the same within rounding."""
    with mock.patch.object(layers, "CPU_MATH_ATTENTION_MAX_KEYS", -1):
        yield


def check_exportable(model: Any) -> None:
    """Refuse, in one line, a model whose graphs this exporter cannot write."""
    if not isinstance(model, DualEncoder):
        raise CheckpointError(f"ONNX export takes a CLIP / SigLIP dual encoder, got a "
                              f"{type(model).__name__} (imagefm export --format hf writes the "
                              f"other families)")
    if getattr(model.config.vision, "naflex", False):
        raise ConfigError("vision.naflex = true: a SigLIP 2 NaFlex tower takes variable patch "
                          "grids, which this ONNX export does not cover; export a "
                          "fixed-resolution model")
    if model.card.resize_mode == "naflex":
        raise ConfigError("preprocess.resize_mode = 'naflex' has no fixed image size; the ONNX "
                          "image graph needs one (use 'shortest' or 'squash')")


def require_onnx(*, runtime: bool = False) -> None:
    """Refuse, before any work, when the export's optional packages are missing."""
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if runtime else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install "
                          f"'imagefm[onnx]'")


def export_onnx(model: DualEncoder, out_dir: str | Path, *, opset: int = DEFAULT_OPSET,
                int8: str | None = None,
                calibration: Calibration | None = None) -> dict[str, Any]:
    """Write ``model`` as ONNX graphs + ``preprocess.json`` (+ tokenizer) into ``out_dir``.

    ``int8``: ``None``, ``"dynamic"`` (weights int8, activations quantised per batch at run
    time; needs no data) or ``"static"`` (activation ranges from ``calibration``: images and
    texts, see :class:`~imagefm.convert.onnx_quantize.Calibration`); the int8 graphs
    are written beside the float ones as ``*.int8.onnx``. Returns the paths written (keys
    ``image_encoder``, ``text_encoder``, ``preprocess``, ``tokenizer`` (None without one),
    and with int8 ``image_encoder_int8``, ``text_encoder_int8``) and the ``card``.
    """
    check_exportable(model)
    require_onnx(runtime=int8 is not None)
    if int8 is not None and int8 not in INT8_MODES:
        raise ConfigError(f"int8 = {int8!r}: choose one of {', '.join(INT8_MODES)} (or None)")
    if int8 == "static" and (calibration is None or model.tokenizer is None):
        raise ConfigError("int8 = 'static' needs calibration= (images and texts whose "
                          "activation ranges set the int8 scales) and a model with a "
                          "tokenizer for the texts; or use int8 = 'dynamic'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _float32_eval(model) as float_model:
        paths: dict[str, Any] = {**_export_graphs(float_model, out, opset), "tokenizer": None}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        paths["tokenizer"] = out / _tokenizer_file(tokenizer)
    if int8 is not None:
        graphs = {name: paths[name] for name in ("image_encoder", "text_encoder")}
        paths.update(quantize_int8(graphs, int8, calibration=calibration, card=model.card,
                                   tokenizer=tokenizer))
    card = preprocess_card(model, opset=opset, int8=int8)
    paths["preprocess"] = atomic_write_text(out / CARD_FILE,
                                            json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    paths["card"] = card
    return paths


def _export_graphs(model: DualEncoder, out: Path, opset: int) -> dict[str, Path]:
    size, context = model.card.image_size, model.config.text.context_length
    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1, max=context)
    # Examples of batch 2 (torch.export specialises sizes 0 and 1 of example inputs).
    pixels = torch.zeros(2, 3, size, size)
    ids = torch.zeros(2, context, dtype=torch.long)
    return {
        "image_encoder": _export_graph(ImageEncoderGraph(model), (pixels,), out / IMAGE_GRAPH,
                                       ["pixel_values"], ["image_embeds"],
                                       {"pixel_values": {0: batch}}, opset),
        "text_encoder": _export_graph(TextEncoderGraph(model), (ids, torch.ones_like(ids)),
                                      out / TEXT_GRAPH, ["input_ids", "attention_mask"],
                                      ["text_embeds"],
                                      {"input_ids": {0: batch, 1: sequence},
                                       "attention_mask": {0: batch, 1: sequence}}, opset),
    }


@contextlib.contextmanager
def _float32_eval(model: DualEncoder) -> Iterator[DualEncoder]:
    """The model in eval mode (its mode restored afterwards) when it is float32 on the CPU,
    else a float32 CPU copy of it (a bf16 or GPU model exports the same float32 graphs)."""
    if all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()):
        was_training = model.training
        try:
            yield model.eval()
        finally:
            model.train(was_training)
        return
    tokenizer = model.tokenizer
    model.tokenizer = None  # the copy only traces: no need to copy the vocabulary
    try:
        clone = copy.deepcopy(model)
    finally:
        model.tokenizer = tokenizer
    yield clone.float().cpu().eval()


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                  input_names: list[str], output_names: list[str],
                  dynamic_shapes: dict[str, Any], opset: int) -> Path:
    with sdpa_attention(), warnings.catch_warnings(), torch.no_grad():
        # The exporter warns about its own internals (axis renaming, deprecations): not ours.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    return save_onnx(program.model_proto, path)


def save_onnx(proto: Any, path: Path) -> Path:
    """Write an ONNX model atomically; a big one keeps its weights in ``<name>.data`` beside."""
    import onnx

    external = proto.ByteSize() > EXTERNAL_DATA_BYTES

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=path.name + ".data")

    return atomic_write(path, write)


def _tokenizer_file(tokenizer: Any) -> str:

    return SENTENCEPIECE_FILE if tokenizer.settings()["backend"] == "sentencepiece" \
        else TOKENIZER_JSON


def preprocess_card(model: DualEncoder, *, opset: int = DEFAULT_OPSET,
                    int8: str | None = None) -> dict[str, Any]:
    """``preprocess.json``: everything a client needs to feed the graphs and read their outputs,
    written so that PIL + numpy + tokenizers reproduce imagefm's processor from it alone."""
    config, card = model.config, model.card
    size, context = card.image_size, config.text.context_length
    scale = float(model.logit_scale.detach().float())
    bias = model.logit_bias
    graphs: dict[str, Any] = {
        "image": {"file": IMAGE_GRAPH,
                  "inputs": {"pixel_values": {"dtype": "float32",
                                              "shape": ["batch", 3, size, size]}},
                  "outputs": {"image_embeds": {"dtype": "float32",
                                               "shape": ["batch", config.embed_dim]}}},
        "text": {"file": TEXT_GRAPH,
                 "inputs": {name: {"dtype": "int64", "shape": ["batch", "sequence"]}
                            for name in ("input_ids", "attention_mask")},
                 "outputs": {"text_embeds": {"dtype": "float32",
                                             "shape": ["batch", config.embed_dim]}},
                 "max_sequence": context},
    }
    if int8 is not None:
        for kind in graphs.values():
            kind["int8_file"] = int8_path(kind["file"]).name
    return {
        "format": CARD_FORMAT, "version": CARD_VERSION, "opset": opset,
        "model_type": config.model_type,
        "int8": int8,
        "graphs": graphs,
        "embeddings": {
            "dim": config.embed_dim, "normalized": False,
            "note": "projected embeddings as encode_image / encode_text return them; divide "
                    "each by its L2 norm before cosine similarity or logits"},
        "logits": {
            "logit_scale": float(torch.tensor(scale).exp()), "log_logit_scale": scale,
            "logit_bias": float(bias.detach().float()) if bias is not None else None,
            "formula": "logit_scale * dot(image / |image|, text / |text|) + (logit_bias or 0)",
            "probabilities": ("sigmoid of each logit" if config.model_type == "siglip"
                              else "softmax over the texts")},
        "image": _image_card(card),
        "text": _text_card(model, context),
    }


def _image_card(card: Any) -> dict[str, Any]:
    size = card.image_size
    return {
        "size": size,
        "decode": "RGB, EXIF orientation applied, transparency composited over white",
        "channel_order": "RGB", "layout": "NCHW", "dtype": "float32",
        "resize": {"mode": card.resize_mode, "interpolation": card.interpolation,
                   "library": "PIL (Image.resize with Image.Resampling."
                              f"{card.interpolation.upper()}: antialiased when shrinking)",
                   "rule": _RESIZE_RULES[card.resize_mode]},
        "crop": ({"mode": "center", "size": [size, size]} if card.resize_mode == "shortest"
                 else None),
        "value_range": [0, 255],
        "rescale": 1 / 255,
        "mean": list(card.mean), "std": list(card.std),
        "formula": "(float32(uint8_pixel * rescale, computed in float64) - mean) / std, "
                   "per channel, in float32",
    }


def _text_card(model: DualEncoder, context: int) -> dict[str, Any]:
    text = model.config.text
    card: dict[str, Any] = {"context_length": context, "pooling": text.pool,
                            "causal": text.causal}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        card["tokenizer"] = None
        card["note"] = ("this model was exported without a tokenizer: input_ids are ids of the "
                        "vocabulary it was trained with")
        return card
    s = tokenizer.settings()
    steps = ["NFC"]
    if s["canonicalize"]:
        steps.append("canonicalize: delete ASCII punctuation (Python string.punctuation), "
                     "collapse whitespace runs to one space, strip both ends")
    if s["lowercase"]:
        steps.append("lowercase (Python str.lower)")
    card.update({
        "tokenizer": {"file": _tokenizer_file(tokenizer), "backend": s["backend"],
                      "add_special_tokens": False},
        "normalize": steps,
        # What the tokenizer pads and truncates to (at most the graph's max_sequence).
        "context_length": s["context_length"],
        "bos_id": s["bos_id"], "eos_id": s["eos_id"], "pad_id": s["pad_id"],
        "padding": s["padding"],
        "truncation": s["truncation"],
        "rule": "ids = [bos_id] + pieces + [eos_id] (each only when not null); when too long, "
                "pieces are cut so that the whole fits context_length (EOS stays last); "
                "padding 'max_length' pads every row with pad_id to context_length, 'longest' "
                "to the longest row of the batch; attention_mask is 1 on the ids, 0 on padding",
    })
    return card

