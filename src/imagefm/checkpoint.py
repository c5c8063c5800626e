"""Our checkpoint format, and ``load`` for every format we understand.

An imagefm checkpoint is a directory:
    model.safetensors     weights (no pickle, ever)
    imagefm.json          {"format": "imagefm", "architecture", "config", "preprocess", "tokenizer"}
    tokenizer.json, ...   the tokenizer's own files, when the model has one
    chat_template.jinja   a language model's chat template, when it has its own

A quantised language model (``imagefm quantize``) stores each quantised layer as its blocks
(``<layer>.qweight``, ``.scales``): loading puts quantised layers back in their places.

Architectures: ``dual_encoder`` (CLIP/SigLIP), ``decoder_lm`` (Llama/Qwen2 family) and ``vlm``
(vision tower + projector + decoder LM). ``load(path)`` also reads Hugging Face
CLIP/SigLIP/Llama/Qwen2/LLaVA directories, GGUF files and open_clip checkpoints, through the
converters in ``imagefm.convert``.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from imagefm import __version__
from imagefm.config import DualEncoderConfig, ImageCard, from_dict

FORMAT_NAME = "imagefm"
FORMAT_VERSION = 1
CONFIG_FILE = "imagefm.json"
WEIGHTS_FILE = "model.safetensors"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class CheckpointError(ValueError):
    """A checkpoint cannot be read: the message says which file and why."""


# --- atomic writes -------------------------------------------------------------------------------

def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path,
                    metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically (tied weights are stored once per name)."""
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# --- reading weights -----------------------------------------------------------------------------

def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file. Safetensors always; pickles only if ``weights_only`` can read them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that holds more than tensors, and unpickling "
            f"it could run arbitrary code. Convert it to safetensors where you trust it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


def load_sharded(directory: Path, index_name: str) -> dict[str, torch.Tensor]:
    """Read weights listed by a ``*.safetensors.index.json`` (HF sharded checkpoints)."""
    index = json.loads((directory / index_name).read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_state_dict_file(directory / shard))
    return state


# --- our format ----------------------------------------------------------------------------------

def _architectures() -> dict[str, tuple[type, Callable[[dict], Any]]]:
    from imagefm.models.decoder import DecoderLM
    from imagefm.models.decoder_config import DecoderConfig
    from imagefm.models.dual_encoder import DualEncoder
    from imagefm.models.vlm import VLM, VLMConfig

    return {"dual_encoder": (DualEncoder, DualEncoderConfig.from_dict),
            "decoder_lm": (DecoderLM, DecoderConfig.from_dict),
            "vlm": (VLM, VLMConfig.from_dict)}


def architecture_name(model: torch.nn.Module) -> str:
    for name, (cls, _) in _architectures().items():
        if isinstance(model, cls):
            return name
    raise CheckpointError(f"cannot save a {type(model).__name__}: not an imagefm architecture")


def save_model(model: torch.nn.Module, directory: str | Path) -> Path:
    """Save a model in imagefm format (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    card = getattr(model, "card", None)
    chat_template = getattr(model, "chat_template", None)
    if chat_template is not None:
        atomic_write_text(directory / CHAT_TEMPLATE_FILE, chat_template)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "imagefm_version": __version__,
        "architecture": architecture_name(model),
        "config": model.config.to_dict(),
        "preprocess": card.__dict__ if card is not None else None,
        "tokenizer": tokenizer.settings() if tokenizer is not None else None,
    }
    from imagefm.models.quantized import describe_quantization

    quantization = describe_quantization(model)
    if quantization is not None:
        meta["quantization"] = quantization
    save_state_dict(model.state_dict(), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    # The config goes last: a directory with imagefm.json is a complete checkpoint.
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2, ensure_ascii=False))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not an imagefm checkpoint") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: 'format' is {meta.get('format')!r}, expected 'imagefm'")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer imagefm (format "
                              f"{meta['format_version']}); upgrade imagefm to read it")
    return meta


def load_imagefm(directory: str | Path, *, strict: bool = True) -> torch.nn.Module:
    directory = Path(directory)
    meta = read_meta(directory)
    arch = meta.get("architecture")
    archs = _architectures()
    if arch not in archs:
        raise CheckpointError(f"{directory}: unknown architecture {arch!r}; known: {sorted(archs)}")
    cls, parse_config = archs[arch]
    card = None
    if meta.get("preprocess"):
        card = from_dict(ImageCard, meta["preprocess"], "preprocess")
    config = parse_config(meta["config"])
    model = cls(config, card) if card is not None else cls(config)
    state = load_state_dict_file(directory / WEIGHTS_FILE)
    quantized = any(k.endswith(".qweight") for k in state)  # a quantised LM (imagefm quantize)
    if quantized:
        from imagefm.models.quantized import install_quantized

        install_quantized(model, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if strict and (missing or unexpected or misshaped):
        shapes = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in misshaped]
        raise CheckpointError(f"{directory}: weights do not match the config: missing "
                              f"{missing[:10]}, unexpected {unexpected[:10]}, "
                              f"mis-shaped {shapes[:10]}")
    usable = {k: v for k, v in state.items() if k in expected and k not in misshaped}
    model.load_state_dict(usable, strict=False)
    if quantized:
        from imagefm.models.quantized import use_float_without_kernel

        use_float_without_kernel(model)
    if meta.get("tokenizer") is not None:
        from imagefm.tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_pretrained(directory)
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        model.chat_template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return model.eval()


# --- dispatch ------------------------------------------------------------------------------------

def detect_format(path: str | Path) -> str:
    """Name the checkpoint format at ``path``: imagefm, hf, hf_lm (HF Llama/Qwen2), hf_llava,
    gguf, open_clip or open_clip_state_dict."""
    path = Path(path)
    if path.is_file():
        with path.open("rb") as handle:
            if handle.read(4) == b"GGUF":
                return "gguf"
        return "open_clip_state_dict"
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    if (path / CONFIG_FILE).is_file():
        return "imagefm"
    if (path / "open_clip_config.json").is_file():
        return "open_clip"
    if (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get(
                "model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            model_type = None  # load_hf reports the broken file
        if model_type == "llava":
            return "hf_llava"
        return "hf_lm" if model_type in ("llama", "qwen2") else "hf"
    raise CheckpointError(
        f"{path} holds no checkpoint imagefm understands: expected imagefm.json (imagefm), "
        f"config.json (Hugging Face CLIP/SigLIP/Llama/Qwen2/LLaVA) or open_clip_config.json "
        f"(open_clip); a .gguf is a file, not a directory")


def load(path: str | Path, *, arch: str | None = None, strict: bool = True) -> torch.nn.Module:
    """Load a model from an imagefm, Hugging Face or open_clip checkpoint.

    ``arch`` names the open_clip architecture (e.g. ``"ViT-B-32"``) of a bare state-dict file.
    """
    fmt = detect_format(path)
    if fmt == "imagefm":
        return load_imagefm(path, strict=strict)
    if fmt == "gguf":
        from imagefm.convert.gguf import load_gguf

        return load_gguf(path, strict=strict)
    if fmt == "hf_lm":
        from imagefm.convert.llama import load_hf_lm

        return load_hf_lm(path, strict=strict)
    if fmt == "hf_llava":
        from imagefm.convert.llava import load_llava

        return load_llava(path, strict=strict)
    if fmt == "hf":
        from imagefm.convert.hf import load_hf

        return load_hf(path, strict=strict)
    from imagefm.convert.open_clip import load_open_clip

    return load_open_clip(path, arch=arch, strict=strict)
