"""What the Hugging Face exports of the VLM families share: the files around the weights.

A VLM directory as transformers 5 writes it with ``save_pretrained`` (model and processor):

    config.json               the model; each exporter writes it last (its presence marks a
                              complete directory)
    model.safetensors         the weights, under the names the published checkpoints use
    generation_config.json    BOS / EOS / pad ids, so ``generate`` stops where ours does
    processor_config.json     the processor's settings, the image (and video) processor's nested
    tokenizer.json, tokenizer_config.json    the vocabulary and its special tokens
    chat_template.jinja       the chat template

The family exporters (:func:`imagefm.convert.qwen2_vl.export_qwen2_vl`,
:func:`imagefm.convert.llava.export_llava`,
:func:`imagefm.convert.llava_onevision.export_llava_onevision`) write config.json, the weights and
processor_config.json; the helpers here write the rest. The family loaders (Qwen2-VL,
LLaVA-OneVision, Idefics3) read such a directory with :func:`load_hf_vlm`,
:func:`load_hf_vlm_processor` and :func:`image_interpolation`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from imagefm.checkpoint import CONFIG_FILE as IMAGEFM_FILE
from imagefm.checkpoint import CheckpointError, atomic_write_text, empty_parameters
from imagefm.convert.hf import read_hf_weights
from imagefm.convert.hf_card import _RESAMPLE_FROM_HF
from imagefm.convert.keymap import KeyMap, load_with_key_map
from imagefm.convert.llama import config_to_hf_lm, load_lm_tokenizer, read_chat_template
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.quantized import dequantize_decoder, is_quantized
from imagefm.tokenizer import SETTINGS_FILE, TOKENIZER_JSON

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
Model = TypeVar("Model", bound=nn.Module)


# --- reading a Hugging Face VLM directory --------------------------------------------------------

def load_hf_vlm(model_class: Callable[[Any], Model], config: Any, directory: Path,
                key_map: Callable[[list[str]], KeyMap], *, strict: bool,
                weights: dict[str, torch.Tensor] | None = None) -> Model:
    """``model_class(config)`` (on the meta device when imagefm.load asks) with the directory's
    weights (or ``weights`` read from it) loaded through ``key_map(their names)``, then the LM's
    tokenizer and the chat template; in eval mode. ``strict`` fails on any missing,
    unexpected or mis-shaped key."""
    with empty_parameters():
        model = model_class(config)
    weights = read_hf_weights(directory) if weights is None else weights
    load_with_key_map(model, key_map(list(weights)), weights, strict=strict,
                      where=str(directory))
    model.tokenizer = load_lm_tokenizer(directory, config.lm)
    model.chat_template = read_chat_template(directory)
    return model.eval()


def load_hf_vlm_processor(processor_class: Any, path: str | Path,
                          read_config: Callable[[Path], Any]) -> Any:
    """The processor of a VLM directory, without loading weights: an imagefm directory through
    ``processor_class.from_pretrained``; a Hugging Face one from ``read_config(directory)``, the
    LM's tokenizer and the chat template."""
    directory = Path(path)
    if (directory / IMAGEFM_FILE).is_file():
        return processor_class.from_pretrained(directory)
    config = read_config(directory)
    return processor_class(config, load_lm_tokenizer(directory, config.lm),
                           read_chat_template(directory))


def image_interpolation(pre: dict[str, Any], where: str, steps: Sequence[str]) -> str:
    """Our interpolation name for the resampling filter of an HF image processor's settings
    ``pre`` (PIL's code; bicubic when absent), once the pixel steps are those our processors
    compute: none of ``steps`` (``do_resize``...) turned off, a rescale by 1/255."""
    for flag in steps:
        if pre.get(flag) is False:
            raise CheckpointError(f"{where}: {flag} = false is not supported")
    if abs(pre.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise CheckpointError(f"{where}: rescale_factor {pre['rescale_factor']} is not 1/255")
    resample = pre.get("resample", 3)
    if resample not in _RESAMPLE_FROM_HF:
        raise CheckpointError(f"{where}: resample {resample!r} is not supported")
    return _RESAMPLE_FROM_HF[resample]


# --- writing one ---------------------------------------------------------------------------------


def refuse(target: str, problems: list[str]) -> None:
    """Raise one CheckpointError listing every field ``target`` cannot express (if any)."""
    if problems:
        raise CheckpointError(f"cannot export this model as {target}:\n  "
                              + "\n  ".join(problems))


def make_directory(path: str | Path) -> Path:
    """The export directory, created; one holding an imagefm checkpoint is refused (the export
    would overwrite its weights and tokenizer)."""
    directory = Path(path)
    if (directory / IMAGEFM_FILE).is_file():
        raise CheckpointError(f"{directory} holds an imagefm checkpoint; export to another "
                              f"directory")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as plain tensors: quantised decoder layers become the float values
    of their blocks (on a copy); unmerged LoRA layers are refused, since no HF class has them."""
    lora = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if lora:
        raise CheckpointError(f"the model holds unmerged LoRA layers ({lora[0]}, ...): merge "
                              f"them into the weights first (imagefm.train.stages.merge_lora; "
                              f"the Trainer does at the end of a run)")
    if is_quantized(model):
        model = copy.deepcopy(model)
        for module in list(model.modules()):
            if isinstance(module, DecoderLM):
                dequantize_decoder(module)
    return model.state_dict()


def dtype_name(model: nn.Module) -> str:
    """config.json's ``dtype``: the dtype the weights are stored in."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return DTYPE_NAMES.get(dtype, "float32")


def text_config(lm: DecoderConfig) -> dict[str, Any]:
    """A VLM's ``text_config``: the LM's config.json (raises where no HF decoder class computes
    what ours does) with rotary settings in transformers 5's ``rope_parameters``."""
    if lm.mrope_section:
        raise CheckpointError(f"lm.mrope_section = {list(lm.mrope_section)}: M-RoPE exists in "
                              f"Qwen2-VL's language model only")
    hf = config_to_hf_lm(lm)
    del hf["architectures"], hf["dtype"]
    rope = hf.pop("rope_scaling") or {"rope_type": "default"}
    hf["rope_parameters"] = {**rope, "rope_theta": hf.pop("rope_theta")}
    return hf


def _ids(values: tuple[int, ...]) -> int | list[int] | None:
    return values[0] if len(values) == 1 else (list(values) or None)


def write_generation_config(directory: Path, lm: DecoderConfig) -> None:
    """generation_config.json with the special ids ``generate`` needs (as transformers derives
    it from the model config: only those that are set)."""
    ids = {"bos_token_id": lm.bos_token_id, "eos_token_id": _ids(lm.eos_token_ids),
           "pad_token_id": lm.pad_token_id}
    data = {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}
    atomic_write_text(directory / "generation_config.json", json.dumps(data, indent=2))


def check_token(tokenizer: Any, name: str, token: str, index: int) -> list[str]:
    """A problem when the tokenizer does not map ``token`` to the id the model expects."""
    if tokenizer is None or tokenizer.token_to_id(token) == index:
        return []
    return [f"{name} = {token!r}: the tokenizer maps it to {tokenizer.token_to_id(token)}, the "
            f"model expects {index}"]


def write_tokenizer(directory: Path, model: nn.Module, lm: DecoderConfig,
                    processor_class: str) -> None:
    """tokenizer.json, tokenizer_config.json (special tokens, length, processor class) and
    chat_template.jinja, those the model has."""
    tokenizer = model.tokenizer
    if model.chat_template is not None:
        atomic_write_text(directory / "chat_template.jinja", model.chat_template)
    if tokenizer is None:
        return
    if tokenizer.settings()["backend"] != "tokenizers":
        raise CheckpointError("the tokenizer is a sentencepiece model; Hugging Face VLM "
                              "processors read tokenizer.json")
    tokenizer.save_pretrained(directory)
    (directory / SETTINGS_FILE).unlink()  # imagefm's own settings: not part of an HF directory

    def token(index: int | None) -> str | None:
        return None if index is None else tokenizer.id_to_token(index)

    named = {"bos_token": token(lm.bos_token_id),
             "eos_token": token(lm.eos_token_ids[0]) if lm.eos_token_ids else None,
             "pad_token": token(tokenizer.pad_id)}
    vocabulary = json.loads((directory / TOKENIZER_JSON).read_text(encoding="utf-8"))
    extra = [t["content"] for t in vocabulary.get("added_tokens", [])
             if t.get("special") and t["content"] not in named.values()]
    data = {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers",
            **{k: v for k, v in named.items() if v is not None},
            "add_bos_token": tokenizer.bos_id is not None, "extra_special_tokens": extra,
            "model_max_length": lm.context_length, "processor_class": processor_class}
    atomic_write_text(directory / "tokenizer_config.json",
                      json.dumps(data, indent=2, ensure_ascii=False))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))
