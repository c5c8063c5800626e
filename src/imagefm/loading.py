"""One loading layer: a path or a Hub id → the format, found once → model and processor.

    model = imagefm.load("google/siglip-base-patch16-224")            # Hub id (cached)
    model, proc = imagefm.load("runs/quickstart/model", processor=True)
    lm = imagefm.load("Qwen/Qwen3-0.6B", dtype="bfloat16", device="cuda")

Layers: this module sits above ``imagefm.convert`` (key maps and file readers of every foreign
format) and ``imagefm.checkpoint`` (our format, errors, weight files); it is the only place that
knows which formats exist and which reader each one takes. ``imagefm.hub`` turns hub ids into
local folders.

Big models load in bounded memory: parameters are created on the meta device and the
checkpoint's tensors, read one by one in their final dtype, become the parameters (no float32
copy, no random initialisation). ``strict=False`` builds the model normally instead, since
the parameters the checkpoint lacks need values.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagefm.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    empty_parameters,
    has_meta_parameters,
    load_into,
    load_options,
    load_state_dict_file,
    read_meta,
    safetensors_header,
)
from imagefm.config import DualEncoderConfig, ImageCard, from_dict
from imagefm.hub import fetch_text_model_files, parse_hub_id, resolve_hub

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# --- our own format ------------------------------------------------------------------------------

def _architectures() -> dict[str, tuple[type, Callable[[dict], Any]]]:
    """imagefm.json's ``architecture`` → (model class, config parser)."""
    from imagefm.models.clap import ClapConfig, ClapModel
    from imagefm.models.decoder import DecoderLM
    from imagefm.models.decoder_config import DecoderConfig
    from imagefm.models.dual_encoder import DualEncoder
    from imagefm.models.idefics3 import Idefics3, Idefics3Config
    from imagefm.models.llava_onevision import LlavaOneVision, OneVisionConfig
    from imagefm.models.point_encoder import PointTextConfig, PointTextModel
    from imagefm.models.qwen_vl import QwenVL, QwenVLConfig
    from imagefm.models.speech_ctc import SpeechCTC, SpeechCTCConfig
    from imagefm.models.vla import VLA, VLAConfig
    from imagefm.models.vlm import VLM, VLMConfig
    from imagefm.models.whisper_encoder import AudioEncoder, AudioEncoderConfig

    classes = [(DualEncoder, DualEncoderConfig.from_dict), (DecoderLM, DecoderConfig.from_dict),
               (VLM, VLMConfig.from_dict), (QwenVL, QwenVLConfig.from_dict),
               (LlavaOneVision, OneVisionConfig.from_dict), (Idefics3, Idefics3Config.from_dict),
               (AudioEncoder, AudioEncoderConfig.from_dict), (ClapModel, ClapConfig.from_dict),
               (PointTextModel, PointTextConfig.from_dict), (VLA, VLAConfig.from_dict),
               (SpeechCTC, SpeechCTCConfig.from_dict)]
    return {cls.architecture: (cls, parse) for cls, parse in classes}


def load_imagefm(directory: str | Path, *, strict: bool = True) -> torch.nn.Module:
    """An imagefm checkpoint directory (weights, config, card, tokenizer, chat template)."""
    directory = Path(directory)
    meta = read_meta(directory)
    arch = meta.get("architecture")
    archs = _architectures()
    if arch not in archs:
        raise CheckpointError(f"{directory}: unknown architecture {arch!r}; known: {sorted(archs)}")
    cls, parse_config = archs[arch]
    card = (from_dict(ImageCard, meta["preprocess"], "preprocess") if meta.get("preprocess")
            else None)
    config = parse_config(meta["config"])
    with empty_parameters():
        model = cls(config, card) if card is not None else cls(config)
    state = load_state_dict_file(directory / WEIGHTS_FILE)
    quantized = any(k.endswith(".qweight") for k in state)  # a quantised LM (imagefm quantize)
    if quantized:
        from imagefm.models.quantized import install_quantized

        install_quantized(model, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = _stored_shapes(directory / WEIGHTS_FILE, state)
    misshaped = sorted(k for k, v in expected.items() if k in shapes and shapes[k] != v.shape)
    if strict and (missing or unexpected or misshaped):
        lines = [f"{k} {tuple(shapes[k])} != {tuple(expected[k].shape)}" for k in misshaped]
        raise CheckpointError(f"{directory}: weights do not match the config: missing "
                              f"{missing[:10]}, unexpected {unexpected[:10]}, "
                              f"mis-shaped {lines[:10]}")
    load_into(model, {k: state[k] for k in state if k in expected and k not in misshaped})
    if quantized:
        from imagefm.models.quantized import use_float_without_kernel

        use_float_without_kernel(model)
    if meta.get("tokenizer") is not None:
        from imagefm.tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_pretrained(directory)
    from imagefm.checkpoint import CHAT_TEMPLATE_FILE

    if (directory / CHAT_TEMPLATE_FILE).is_file():
        model.chat_template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return model.eval()


def _stored_shapes(path: Path, state: Any) -> dict[str, torch.Size]:
    """Tensor shapes from the safetensors header, without reading the tensors."""
    header, _ = safetensors_header(path)
    shapes = {k: torch.Size(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return {k: shapes[k] if k in shapes else state[k].shape for k in state}


def _imagefm_processor(directory: Path) -> Any:
    meta = read_meta(directory)
    if meta.get("architecture") == "vlm":
        from imagefm.vlm_processor import VLMProcessor

        return VLMProcessor.from_pretrained(directory)
    if meta.get("architecture") == "qwen2_vl":
        from imagefm.convert.qwen2_vl import load_qwen2_vl_processor

        return load_qwen2_vl_processor(directory)
    if meta.get("architecture") == "idefics3":
        from imagefm.convert.idefics3 import load_idefics3_processor

        return load_idefics3_processor(directory)
    if meta.get("architecture") == "audio_encoder":  # its "processor": the log-mel settings
        from imagefm.models.whisper_encoder import AudioEncoderConfig

        return AudioEncoderConfig.from_dict(meta["config"]).mel
    if meta.get("architecture") == "llava_onevision":
        from imagefm.onevision_processor import OneVisionProcessor

        return OneVisionProcessor.from_pretrained(directory)
    from imagefm.processor import Processor
    from imagefm.tokenizer import Tokenizer

    card = from_dict(ImageCard, meta["preprocess"], "preprocess")
    tokenizer = Tokenizer.from_pretrained(directory) if meta.get("tokenizer") is not None else None
    return Processor(card, tokenizer)


# --- formats -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """A checkpoint format: the functions (``"module:function"``, imported when first used, so
    ``import imagefm`` stays cheap) that build its model and its processor from a local path.
    Loaders take ``(path, *, strict)``, processors ``(path)``; ``arch`` goes to both where the
    format needs it (an open_clip state-dict file)."""

    name: str
    summary: str
    loader: str
    processor: str | None = None
    takes_arch: bool = False

    def load(self, path: Path, *, strict: bool, arch: str | None) -> torch.nn.Module:
        extra = {"arch": arch} if self.takes_arch else {}
        return _function(self.loader)(path, strict=strict, **extra)

    def load_processor(self, path: Path, *, arch: str | None) -> Any:
        if self.processor is None:
            raise CheckpointError(f"{path}: a {self.summary} has no image processor; load the "
                                  f"model and use model.tokenizer")
        return _function(self.processor)(path, **({"arch": arch} if self.takes_arch else {}))


def _function(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _open_clip_text_files(path: Path) -> Path | None:
    """An open_clip model whose text tower is a Hugging Face model names it by its Hub id
    (``text_cfg.hf_model_name``); its config.json and tokenizer come from the Hub cache or the
    Hub, as open_clip's own ``AutoConfig.from_pretrained`` would get them."""
    config = path / "open_clip_config.json"
    if not config.is_file():
        return None
    try:
        text_cfg = json.loads(config.read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
        name = text_cfg.get("hf_model_name")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None  # load_open_clip reports the broken file
    if not isinstance(name, str) or not name or Path(name).is_dir():
        return None
    return fetch_text_model_files(name)


def load_open_clip_dir(path: Path, *, strict: bool = True, arch: str | None = None
                       ) -> torch.nn.Module:
    """open_clip, with the text tower's files from the Hub where the checkpoint names them."""
    from imagefm.convert.open_clip import load_open_clip

    return load_open_clip(path, arch=arch, strict=strict, hf_text=_open_clip_text_files(path))


def load_open_clip_dir_processor(path: Path, *, arch: str | None = None) -> Any:
    from imagefm.convert.open_clip import load_open_clip_processor

    return load_open_clip_processor(path, arch=arch, hf_text=_open_clip_text_files(path))


_C = "imagefm.convert."
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("imagefm", "imagefm directory (imagefm.json)", "imagefm.loading:load_imagefm",
           "imagefm.loading:_imagefm_processor"),
    Format("hf", "Hugging Face CLIPModel / SiglipModel", _C + "hf:load_hf",
           _C + "hf:load_hf_processor"),
    Format("hf_siglip2", "Hugging Face Siglip2Model (NaFlex)", _C + "siglip2:load_siglip2",
           _C + "siglip2:load_siglip2_processor"),
    Format("hf_vision_text", "Hugging Face VisionTextDualEncoderModel (BERT / RoBERTa / XLM-R "
           "text)", _C + "vision_text:load_vision_text",
           _C + "vision_text:load_vision_text_processor"),
    Format("hf_lm", "Hugging Face Llama / Qwen2 / Qwen3 causal LM", _C + "llama:load_hf_lm"),
    Format("hf_llava", "Hugging Face LLaVA", _C + "llava:load_llava",
           _C + "llava:load_llava_processor"),
    Format("hf_idefics3", "Hugging Face Idefics3 / SmolVLM", _C + "idefics3:load_idefics3",
           _C + "idefics3:load_idefics3_processor"),
    Format("hf_llava_onevision", "Hugging Face LLaVA-OneVision",
           _C + "llava_onevision:load_llava_onevision",
           _C + "llava_onevision:load_llava_onevision_processor"),
    Format("hf_qwen2_vl", "Hugging Face Qwen2-VL / Qwen2.5-VL", _C + "qwen2_vl:load_qwen2_vl",
           _C + "qwen2_vl:load_qwen2_vl_processor"),
    Format("hf_whisper", "Hugging Face Whisper (its encoder, as an audio tower)",
           _C + "whisper:load_whisper", _C + "whisper:load_whisper_features"),
    Format("gguf", "GGUF file (llama.cpp)", _C + "gguf:load_gguf"),
    Format("open_clip", "open_clip directory (open_clip_config.json)",
           "imagefm.loading:load_open_clip_dir", "imagefm.loading:load_open_clip_dir_processor",
           takes_arch=True),
    Format("open_clip_state_dict", "open_clip state-dict file (needs arch=)",
           "imagefm.loading:load_open_clip_dir", "imagefm.loading:load_open_clip_dir_processor",
           takes_arch=True),
)}

# config.json model_type → format, for Hugging Face directories.
HF_MODEL_TYPES: dict[str, str] = {
    "clip": "hf", "siglip": "hf", "siglip2": "hf_siglip2",
    "vision-text-dual-encoder": "hf_vision_text",
    "llama": "hf_lm", "qwen2": "hf_lm", "qwen3": "hf_lm",
    "llava": "hf_llava", "llava_onevision": "hf_llava_onevision",
    "qwen2_vl": "hf_qwen2_vl", "qwen2_5_vl": "hf_qwen2_vl",
    "idefics3": "hf_idefics3", "smolvlm": "hf_idefics3", "whisper": "hf_whisper",
}


def detect_format(path: str | Path) -> str:
    """Name the checkpoint format at the local ``path`` (a key of :data:`FORMATS`)."""
    path = Path(path)
    if path.is_file():
        with path.open("rb") as handle:
            if handle.read(4) == b"GGUF":
                return "gguf"
        return "open_clip_state_dict"
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist (and is not a Hub id: those look like "
                              f"org/name or hf-hub:org/name)")
    if (path / CONFIG_FILE).is_file():
        return "imagefm"
    if (path / "open_clip_config.json").is_file():
        return "open_clip"
    if (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get(
                "model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return "hf"  # load_hf reports the broken file
        if model_type not in HF_MODEL_TYPES:
            raise CheckpointError(
                f"{path}/config.json: model_type {model_type!r} is not one imagefm reads; it "
                f"reads {', '.join(sorted(HF_MODEL_TYPES))} (`imagefm models` lists them)")
        return HF_MODEL_TYPES[model_type]
    raise CheckpointError(
        f"{path} holds no checkpoint imagefm understands: expected imagefm.json (imagefm), "
        f"config.json (Hugging Face) or open_clip_config.json (open_clip); a .gguf is a file, "
        f"not a directory")


# --- the public entry points ---------------------------------------------------------------------

def locate(source: str | Path, *, revision: str | None = None,
           cache_dir: str | Path | None = None, token: str | bool | None = None,
           filename: str | None = None) -> Path:
    """A local path for ``source``: the path itself, or the Hub snapshot of a hub id
    (``org/name``, ``hf-hub:org/name``, optionally ``@revision``)."""
    parsed = parse_hub_id(source)
    if parsed is None:
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} only applies to Hub ids; {source} is a "
                                  f"local path")
        return Path(source)
    repo_id, pinned = parsed
    if pinned is not None and revision is not None and pinned != revision:
        raise CheckpointError(f"{source} names revision {pinned!r} but revision={revision!r} "
                              f"was also given: keep one")
    return resolve_hub(repo_id, revision=revision or pinned, cache_dir=cache_dir, token=token,
                       filename=filename)


def _dtype(dtype: str | torch.dtype | None, path: Path) -> torch.dtype | None:
    """The torch dtype asked for; ``"auto"`` is the checkpoint's own (config.json's
    ``torch_dtype`` / ``dtype``, else the first floating tensor stored)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return _stored_dtype(path)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _stored_dtype(path: Path) -> torch.dtype | None:
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        for key in ("dtype", "torch_dtype"):
            if isinstance(data.get(key), str) and data[key] in DTYPES:
                return DTYPES[data[key]]
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    for file in files[:1]:
        header, _ = safetensors_header(file)
        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        for spec in header.values():
            if isinstance(spec, dict) and spec.get("dtype") in names:
                return names[spec["dtype"]]
    return None  # as stored (GGUF: float32 after dequantisation)


def load(source: str | Path, *, processor: bool = False, revision: str | None = None,
         cache_dir: str | Path | None = None, token: str | bool | None = None,
         dtype: str | torch.dtype | None = "float32", device: str | torch.device | None = None,
         strict: bool = True, arch: str | None = None, filename: str | None = None) -> Any:
    """Load a model from a local path or a Hugging Face Hub id.

    ``source``: an imagefm, Hugging Face or open_clip directory, a GGUF file, an open_clip
    state-dict file (with ``arch``, e.g. ``"ViT-B-32"``), or a Hub id (``org/name`` or
    ``hf-hub:org/name``; ``revision``, ``cache_dir``, ``token``, ``filename`` apply to those).
    ``dtype``: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or ``"auto"`` (as stored);
    ``device``: where the model goes. ``processor=True`` returns ``(model, processor)``.
    ``strict`` (default) fails on any weight the checkpoint lacks or has extra.
    """
    path = locate(source, revision=revision, cache_dir=cache_dir, token=token, filename=filename)
    fmt = FORMATS[detect_format(path)]
    torch_dtype = _dtype(dtype, path)
    # Loaders build their models inside empty_parameters(): with empty_init the parameters start
    # on the meta device and the checkpoint's tensors (read in torch_dtype) replace them.
    with load_options(dtype=torch_dtype, empty_init=strict):
        model = fmt.load(path, strict=strict, arch=arch)
    if has_meta_parameters(model):
        left = [name for name, p in model.named_parameters() if p.is_meta]
        raise CheckpointError(f"{path}: the {fmt.name} loader left {len(left)} parameters "
                              f"without weights ({', '.join(left[:5])}); load with strict=False")
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if device is not None:
        model = model.to(device)
    if not processor:
        return model
    return model, _processor(fmt, path, arch, model)


def _processor(fmt: Format, path: Path, arch: str | None, model: Any) -> Any:
    if fmt.processor is not None:
        return fmt.load_processor(path, arch=arch)
    return model.tokenizer  # a language model's processor is its tokenizer


def load_processor(source: str | Path, *, revision: str | None = None,
                   cache_dir: str | Path | None = None, token: str | bool | None = None,
                   arch: str | None = None, filename: str | None = None) -> Any:
    """The processor of any checkpoint :func:`load` reads (a path or a Hub id): a
    :class:`~imagefm.processor.Processor` for dual encoders, a VLM processor for VLMs. Reads
    no weights (a Hub id fetches the small files and the weights once, for :func:`load`)."""
    path = locate(source, revision=revision, cache_dir=cache_dir, token=token, filename=filename)
    return FORMATS[detect_format(path)].load_processor(path, arch=arch)

