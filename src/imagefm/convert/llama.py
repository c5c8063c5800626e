"""Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` directories to
imagefm and back.

Reading: ``config.json`` -> :class:`DecoderConfig` (transformers' defaults for absent fields
written down here; ``transformers`` is never imported), the weights (single or sharded
safetensors) through a strict key map, the tokenizer and the chat template from the tokenizer
files. Configurations our decoder cannot compute (sliding-window attention, partial rotary,
rope scalings other than linear/llama3) are refused, never approximated.

Writing (``export_hf_lm``): the same key map backwards plus a config.json that transformers reads.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from imagefm.checkpoint import CheckpointError, atomic_write_text, load_dtype, save_state_dict
from imagefm.config import ConfigError
from imagefm.convert.hf import read_hf_weights
from imagefm.convert.keymap import KeyMap, Rule, load_with_key_map, rule
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import DecoderConfig

CONFIG_FILE = "config.json"
LM_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# transformers' defaults for fields a config.json may leave out (configuration_llama.py,
# configuration_qwen2.py, configuration_qwen3.py). num_key_value_heads None means "as many as
# attention heads".
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                  hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                  head_dim=None, bos_token_id=1, eos_token_id=2, pad_token_id=None),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, use_sliding_window=False, head_dim=None,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  use_sliding_window=False, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None),
}
DEFAULT_ROPE_THETA = 10000.0
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu"}  # anything else is refused by DecoderConfig


# --- key map -------------------------------------------------------------------------------------

def hf_lm_key_map(config: DecoderConfig) -> KeyMap:
    """HF ``model.layers.{i}.*`` names <-> our ``blocks.{i}.*`` names."""
    layer = "model.layers.{i}"
    rules: list[Rule] = [rule("model.embed_tokens.weight", "embed_tokens.weight"),
                         rule("model.norm.weight", "norm.weight"),
                         rule(f"{layer}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
                         rule(f"{layer}.post_attention_layernorm.weight",
                              "blocks.{i}.mlp_norm.weight")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules += [rule(f"{layer}.self_attn.{proj}.{p}", f"blocks.{{i}}.attn.{proj}.{p}")
                  for p in ("weight", "bias")]
    rules += [rule(f"{layer}.self_attn.{norm}.weight", f"blocks.{{i}}.attn.{norm}.weight")
              for norm in ("q_norm", "k_norm")]  # Qwen3
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules += [rule(f"{layer}.mlp.{proj}.{p}", f"blocks.{{i}}.mlp.{proj}.{p}")
                  for p in ("weight", "bias")]
    # Rotary frequencies are recomputed from the config; old checkpoints saved them.
    ignore = ["model.layers.{i}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"]
    if config.tie_embeddings:
        ignore.append("lm_head.weight")  # a saved copy of the tied embedding, as HF ignores it
    else:
        rules.append(rule("lm_head.weight", "lm_head.weight"))
    return KeyMap(f"Hugging Face {config.model_type} causal LM", tuple(rules), tuple(ignore))


# --- config.json <-> DecoderConfig ---------------------------------------------------------------

def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Rotary settings from either layout: v4 ``rope_theta`` + ``rope_scaling``, or v5
    ``rope_parameters`` (which holds the theta too)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{where}: partial rotary embeddings are not supported")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_context": int(params.get("original_max_position_embeddings",
                                                        hf.get("max_position_embeddings")))}
    raise CheckpointError(f"{where}: rope type {kind!r} is not supported (imagefm computes "
                          f"default, linear and llama3 rotary embeddings)")


def config_from_hf_lm(hf: dict[str, Any], where: str = CONFIG_FILE) -> DecoderConfig:
    """Our config from the ``config.json`` of a ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
    ``Qwen3ForCausalLM``."""
    model_type = hf.get("model_type")
    if model_type not in LM_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not a decoder LM imagefm "
                              f"reads ({', '.join(LM_MODEL_TYPES)})")
    # An explicit null stays null (bos_token_id: null means "no BOS", not Llama's default 1).
    c = {**_DEFAULTS[model_type], **hf}
    if c.get("use_sliding_window") or any(kind != "full_attention"
                                          for kind in c.get("layer_types") or ()):
        raise CheckpointError(f"{where}: sliding-window attention is not supported")
    if c.get("pretraining_tp", 1) not in (None, 1):
        warnings.warn(f"{where}: pretraining_tp={c['pretraining_tp']} is ignored (it only "
                      f"splits the same matmuls)", stacklevel=3)
    try:
        heads = int(c["num_attention_heads"])
        head_dim = int(c["head_dim"] or 0)
        if head_dim * heads == int(c["hidden_size"]):
            head_dim = 0  # the default, written out by newer transformers
        bias = bool(c.get("attention_bias", False))
        return DecoderConfig(
            model_type=model_type, vocab_size=int(c["vocab_size"]), width=int(c["hidden_size"]),
            layers=int(c["num_hidden_layers"]), heads=heads,
            kv_heads=int(c["num_key_value_heads"] or heads), head_dim=head_dim,
            mlp_dim=int(c["intermediate_size"]), act=_ACTIVATIONS.get(c["hidden_act"],
                                                                       str(c["hidden_act"])),
            norm_eps=float(c["rms_norm_eps"]),
            context_length=int(c["max_position_embeddings"]),
            # Qwen2: q/k/v biases always; Llama and Qwen3: attention_bias on all four.
            qkv_bias=model_type == "qwen2" or bias, o_bias=model_type != "qwen2" and bias,
            mlp_bias=bool(c.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
            tie_embeddings=bool(c["tie_word_embeddings"]),
            bos_token_id=c.get("bos_token_id"), eos_token_ids=_ids(c.get("eos_token_id")),
            pad_token_id=c.get("pad_token_id"), **_rope(hf, where))
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None


def config_to_hf_lm(config: DecoderConfig) -> dict[str, Any]:
    """The ``config.json`` of the HF model equal to ``config`` (raises if there is none)."""
    if config.model_type == "qwen2" and (not config.qkv_bias or config.o_bias or config.mlp_bias):
        raise CheckpointError("Qwen2ForCausalLM has q/k/v biases and no others; this config "
                              f"has qkv_bias={config.qkv_bias}, o_bias={config.o_bias}, "
                              f"mlp_bias={config.mlp_bias}")
    if config.model_type in ("llama", "qwen3") and config.qkv_bias != config.o_bias:
        raise CheckpointError(f"{config.model_type}'s attention_bias covers q/k/v and o "
                              f"together; this config has qkv_bias={config.qkv_bias}, "
                              f"o_bias={config.o_bias}")
    if config.model_type == "qwen3" and config.mlp_bias:
        raise CheckpointError("Qwen3ForCausalLM has no MLP biases; this config has mlp_bias=True")
    if config.qk_norm != (config.model_type == "qwen3"):
        raise CheckpointError(f"of the HF decoders only Qwen3ForCausalLM has a q/k norm; this "
                              f"config has model_type={config.model_type!r}, "
                              f"qk_norm={config.qk_norm}")
    rope: dict[str, Any] = {"rope_type": config.rope_scaling}
    if config.rope_scaling != "default":
        rope["factor"] = config.rope_factor
    if config.rope_scaling == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_context)
    eos = list(config.eos_token_ids)
    hf: dict[str, Any] = {
        "architectures": [_HF_CLASSES[config.model_type]],
        "model_type": config.model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.width, "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.attn_head_dim,
        "hidden_act": config.act, "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": rope if config.rope_scaling != "default" else None,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id, "dtype": "float32",
    }
    if config.model_type == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if config.model_type == "qwen3":
        hf.update(attention_bias=config.qkv_bias, use_sliding_window=False)
    return hf


# --- tokenizer and chat template -----------------------------------------------------------------

def read_chat_template(directory: Path) -> str | None:
    """The Jinja chat template of an HF directory: chat_template.jinja, chat_template.json or
    tokenizer_config.json's ``chat_template`` (a string, or named templates: "default")."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    return None


def load_lm_tokenizer(directory: Path, config: DecoderConfig) -> Any | None:
    """The tokenizer of an HF LM directory as an :class:`imagefm.tokenizer.Tokenizer`, set up for
    prompts: no length cut below the model's context, EOS not appended, padding to the longest
    (generation pads on the left itself). None when the directory has no tokenizer files."""
    if not (directory / "tokenizer.json").is_file():
        return None
    from imagefm.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_hf_dir(directory)
    except (OSError, ValueError) as err:
        warnings.warn(f"{directory}: tokenizer files present but not readable, loading the "
                      f"model without a tokenizer: {err}", stacklevel=3)
        return None
    return tokenizer.with_settings(context_length=config.context_length, truncation=False,
                                   padding="longest", eos_id=None)


# --- load / export -------------------------------------------------------------------------------

def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def load_hf_lm(path: str | Path, *, strict: bool = True,
               dtype: torch.dtype | None = None) -> DecoderLM:
    """Load a Hugging Face Llama/Qwen2/Qwen3 causal-LM directory as a :class:`DecoderLM`, with its
    tokenizer and chat template when present. ``strict`` fails on any key mismatch."""
    directory = Path(path)
    config = config_from_hf_lm(_read_config(directory), str(directory / CONFIG_FILE))
    dtype = dtype or load_dtype()
    model = DecoderLM.for_loading(config, dtype) if strict else DecoderLM(config).to(dtype)
    # Read lazily, one tensor at a time; a model built on the meta device takes them as they are.
    weights = read_hf_weights(directory)
    load_with_key_map(model, hf_lm_key_map(config), weights, strict=strict,
                      where=str(directory))
    model.tokenizer = load_lm_tokenizer(directory, config)
    model.chat_template = read_chat_template(directory)
    return model.eval()


def hf_lm_state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our weights under HF names (tied models: no ``lm_head.weight``, as HF saves them).
    Quantised layers are written as the float values of their blocks."""
    from imagefm.models.quantized import dequantize_decoder, is_quantized

    if is_quantized(model):
        model = dequantize_decoder(copy.deepcopy(model))
    return hf_lm_key_map(model.config).to_source(model.state_dict())


def export_hf_lm(model: DecoderLM, path: str | Path) -> Path:
    """Write ``model`` as a directory ``AutoModelForCausalLM.from_pretrained`` reads
    (config.json + model.safetensors, the tokenizer and chat template when present)."""
    directory = Path(path)
    hf_config = config_to_hf_lm(model.config)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(hf_lm_state_dict(model), directory / "model.safetensors",
                    metadata={"format": "pt"})
    tokenizer = model.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        def token(index: int | None) -> str | None:
            return None if index is None else tokenizer.id_to_token(index)
        eos = model.config.eos_token_ids
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "add_bos_token": tokenizer.bos_id is not None,
                      "bos_token": token(model.config.bos_token_id),
                      "eos_token": token(eos[0]) if eos else None,
                      "pad_token": token(tokenizer.pad_id),
                      "model_max_length": model.config.context_length}
        if model.chat_template is not None:
            tok_config["chat_template"] = model.chat_template
        atomic_write_text(directory / "tokenizer_config.json",
                          json.dumps(tok_config, indent=2, ensure_ascii=False))
    elif model.chat_template is not None:
        atomic_write_text(directory / "chat_template.jinja", model.chat_template)
    # config.json last: its presence marks a complete directory.
    atomic_write_text(directory / CONFIG_FILE, json.dumps(hf_config, indent=2))
    return directory
