"""imagefm decoder LMs to GGUF files that llama.cpp (and anything built on it) runs.

    export_gguf(model, "model.gguf", quant="q8_0")   a DecoderLM, float or quantised
    QUANTS                                         f32, f16, q8_0, q4_0, q4_1, q4_k

What the file holds, as llama.cpp's own ``convert_hf_to_gguf.py`` would write it:
* the architecture (``llama``, ``qwen2`` or ``qwen3``, from ``DecoderConfig.model_type``) and its
  hyper-parameters under ``{arch}.*``; Llama 3.1 rotary scaling as the ``rope_freqs.weight``
  factors, linear scaling as ``rope.scaling.*``;
* the tensors under llama.cpp's names (the reader's key map run backwards, so names and the Llama
  q/k row permutation agree with :func:`imagefm.convert.gguf.load_gguf` by construction). A tied
  model stores ``token_embd.weight`` only: llama.cpp uses it as the output projection too;
* the tokenizer (``tokenizer.ggml.*``): a byte-level BPE as tokenizer model ``gpt2`` (tokens, token
  types, merges, the pre-tokenizer's llama.cpp name), a SentencePiece one as ``llama`` (pieces,
  scores, types); BOS/EOS/padding ids and whether prompts start with BOS;
* the chat template: the model's own, or the ChatML that imagefm uses without one (written out, so
  that llama.cpp-based tools do not fall back to a template of their own guess).

Types, as llama.cpp's tools choose them: vectors (norms, biases) stay F32; matrices take ``quant``.
For 4-bit files the output projection (``output.weight``, or the tied ``token_embd.weight``) is
Q8_0, as imagefm's own quantiser and llama-quantize keep it finer (llama-quantize uses Q6_K).
A matrix whose rows do not split into blocks of 32 is stored F16. Float weights are quantised
with ``gguf.quants`` (llama.cpp's reference quantisers, in numpy), Q4_K with
:mod:`imagefm.convert.gguf_kquants` (ours; the same bytes as ggml's reference quantiser). ``q4_k``
is Q4_K for every matrix whose rows split into blocks of 256 and, as llama-quantize falls back,
Q5_0 for the others (F16 below 32): not llama.cpp's Q4_K_M mix, which puts Q6_K in some tensors
(none is written here). A model already holding Q4/Q8 blocks (``imagefm quantize``,
``load_gguf(..., keep_quantized=True)``) writes those blocks as they are when the requested type
can hold them, so nothing is rounded twice (Q4_K re-quantises their float values).
The other k-quants are not written here: export F16 or Q8_0 and run ``llama-quantize``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagefm.checkpoint import CheckpointError, atomic_write
from imagefm.convert.gguf import ARCHITECTURES, gguf_key_map, read_gguf
from imagefm.convert.gguf_kquants import QK_K, quantize_q4_k
from imagefm.convert.gguf_vocab import tokenizer_metadata
from imagefm.convert.llama import config_to_hf_lm
from imagefm.models.decoder import DecoderLM
from imagefm.models.quantized import QuantizedLinear, dequantize_decoder, is_quantized
from imagefm.models.rotary import rope_inverse_frequencies

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k")
BLOCK = 32
# The ChatML that imagefm renders for a model without a template (imagefm.chat.render_chatml).
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                   "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def gguf_package() -> Any:
    """The `gguf` package (llama.cpp's reader and writer), or a one-line error naming it."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError("writing GGUF files needs the 'gguf' package: pip install gguf"
                              ) from None
    return gguf


# --- which model, which file ---------------------------------------------------------------------

def check_exportable(model: Any) -> str:
    """The GGUF architecture of ``model``; raises :class:`CheckpointError` naming what llama.cpp
    cannot run (the same limits as the Hugging Face classes, plus llama.cpp's own)."""
    if not isinstance(model, DecoderLM):
        raise CheckpointError(f"GGUF export writes decoder language models; got a "
                              f"{type(model).__name__} (a VLM's language model is its .lm, but "
                              f"the file would have no vision tower)")
    config = model.config
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"model_type {arch!r} has no GGUF architecture here "
                              f"({', '.join(ARCHITECTURES)})")
    if config.mrope_section:
        raise CheckpointError("a decoder with M-RoPE (Qwen2-VL's language model) is not a plain "
                              "qwen2 model; llama.cpp reads it only with its vision part")
    config_to_hf_lm(config)  # biases / q-k norm per family, as transformers needs them
    if arch == "qwen3" and (config.qkv_bias or config.mlp_bias):
        raise CheckpointError("llama.cpp's qwen3 architecture has no bias tensors; this model "
                              "has attention or MLP biases")
    if config.rope_scaling == "llama3" and arch != "llama":
        raise CheckpointError(f"Llama 3.1 rotary scaling in a {arch} model cannot be written "
                              f"(llama.cpp reads rope_freqs.weight for llama only)")
    return arch


def _matrix_types(quant: str, head: str | None) -> tuple[str, str]:
    """(type of the layers' matrices, type of the output projection)."""
    if quant not in QUANTS:
        raise CheckpointError(f"quant={quant!r}: choose one of {', '.join(QUANTS)} (the "
                              f"other k-quants: export f16 or q8_0, then run llama-quantize)")
    if head is None:
        head = "q8_0" if quant in ("q4_0", "q4_1", "q4_k") else quant
    if head not in QUANTS:
        raise CheckpointError(f"head={head!r}: choose one of {', '.join(QUANTS)}")
    return quant, head


# --- tensors -------------------------------------------------------------------------------------

def _ordered(names: list[str]) -> list[str]:
    """llama.cpp's order: the embedding, the blocks in turn, the final norm and output."""
    def key(name: str) -> tuple[int, int, str]:
        found = re.match(r"blk\.(\d+)\.", name)
        if found:
            return (1, int(found.group(1)), name)
        return (0 if name.startswith(("token_embd", "rope_freqs")) else 2, 0, name)
    return sorted(names, key=key)


def _float_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our float32 weights (a quantised model's blocks as the float values they stand for)."""
    if is_quantized(model):
        model = dequantize_decoder(copy.deepcopy(model))
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def _block_bytes(layer: QuantizedLinear, type_name: str) -> torch.Tensor | None:
    """A quantised layer's blocks as GGUF bytes [rows, row bytes] of ``type_name``, or None when
    that type cannot hold them exactly (they are then re-quantised from their float values)."""
    rows, groups = layer.out_features, layer.in_features // BLOCK
    scales = layer.scales.cpu()
    if layer.bits == 8:
        if type_name != "Q8_0":
            return None
        parts = [scales[..., None].half(), layer.qweight.cpu().reshape(rows, groups, BLOCK)]
    else:
        d, m = scales[..., 0], scales[..., 1]
        nibbles = layer.qweight.cpu().reshape(rows, groups, BLOCK // 2)
        if type_name == "Q4_1":
            parts = [d[..., None].half(), m[..., None].half(), nibbles]
        elif type_name == "Q4_0" and torch.equal(m, -8 * d):  # Q4_0 blocks kept as Q4_1
            parts = [d[..., None].half(), nibbles]
        else:
            return None
    data = torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim=-1)
    return data.reshape(rows, -1)


def _stored_blocks(model: DecoderLM, key_map: Any) -> dict[str, QuantizedLinear]:
    """The quantised layers of ``model`` under their GGUF names, q/k rows (and their blocks'
    scales) permuted as the float weights are."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        ours = "embed_tokens.weight" if name == "quantized_head" else f"{name}.weight"
        [(gguf_name, values)] = key_map.to_source({ours: module.qweight}).items()
        [(_, scales)] = key_map.to_source({ours: module.scales}).items()
        found[gguf_name] = QuantizedLinear(values.contiguous(), scales.contiguous(), module.bits)
    return found


def gguf_tensors(model: DecoderLM, quant: str = "f16", head: str | None = None
                 ) -> Iterator[tuple[str, np.ndarray, str]]:
    """``(name, data, GGML type name)`` of every tensor of the file, in llama.cpp's order.
    ``data`` is float32 / float16 values, or the quantised blocks as bytes [rows, row bytes]."""
    gguf = gguf_package()
    arch = check_exportable(model)
    layer_type, head_type = (t.upper() for t in _matrix_types(quant, head))
    key_map = gguf_key_map(model.config, arch)
    weights = key_map.to_source(_float_state(model))
    blocks = _stored_blocks(model, key_map)
    output = "token_embd.weight" if model.config.tie_embeddings else "output.weight"
    if model.config.rope_scaling == "llama3":
        # llama.cpp divides each default rotary frequency by its factor (convert_hf_to_gguf).
        default = rope_inverse_frequencies(model.config.replace(rope_scaling="default"))
        weights["rope_freqs.weight"] = default / rope_inverse_frequencies(model.config)
    for name in _ordered(list(weights)):
        tensor = weights[name]
        if tensor.dim() != 2 or (layer_type == "F32" and name != output):
            yield name, tensor.numpy().astype(np.float32), "F32"
            continue
        wanted = head_type if name == output else layer_type
        if wanted in ("F32", "F16"):
            yield name, tensor.numpy().astype(np.float32 if wanted == "F32" else np.float16), \
                wanted
        elif tensor.shape[1] % BLOCK:
            yield name, tensor.numpy().astype(np.float16), "F16"  # as llama.cpp falls back
        elif wanted == "Q4_K" and tensor.shape[1] % QK_K == 0:
            yield name, quantize_q4_k(tensor.numpy()), wanted
        elif wanted == "Q4_K":  # rows not in blocks of 256: llama-quantize's Q4_K fallback
            yield name, gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType.Q5_0), \
                "Q5_0"
        elif name in blocks and (data := _block_bytes(blocks[name], wanted)) is not None:
            yield name, data.numpy(), wanted
        else:
            yield name, gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType[wanted]), \
                wanted


# --- metadata ------------------------------------------------------------------------------------

def _add_config(writer: Any, model: DecoderLM, quant: str, name: str | None) -> None:
    gguf = gguf_package()
    c = model.config
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0",
                  "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1",
                  "q4_k": "MOSTLY_Q4_K_S"}  # Q4_K, no Q6_K: nearest llama.cpp's "Q4_K - Small"
    writer.add_name(name or f"imagefm {c.model_type}")
    writer.add_file_type(int(gguf.LlamaFileType[file_types[quant]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.width)
    writer.add_block_count(c.layers)
    writer.add_feed_forward_length(c.mlp_dim)
    writer.add_head_count(c.heads)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.attn_head_dim)
    if c.head_dim:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if c.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_factor)
    writer.add_vocab_size(c.vocab_size)


def export_gguf(model: DecoderLM, path: str | Path, *, quant: str = "f16",
                head: str | None = None, name: str | None = None) -> Path:
    """Write ``model`` (with its tokenizer and chat template) as a GGUF file llama.cpp runs.

    ``quant``: the matrices' type, one of :data:`QUANTS`; ``head``: the output projection's type
    (default: ``quant``; Q8_0 for the 4-bit types, q4_k included); ``name``: ``general.name``.
    The file is written whole or not at all. Raises :class:`CheckpointError` for a model
    llama.cpp cannot run, naming what stands in the way, before anything is written.
    """
    gguf = gguf_package()
    arch = check_exportable(model)
    _matrix_types(quant, head)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise CheckpointError("the model has no tokenizer, and llama.cpp loads no GGUF file "
                              "without its vocabulary: load the model from a checkpoint that has "
                              "one, or set model.tokenizer")
    tokenizer_keys = tokenizer_metadata(tokenizer, model.config)
    template = getattr(model, "chat_template", None) or CHATML_TEMPLATE
    tensors = list(gguf_tensors(model, quant, head))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_config(writer, model, quant, name)
        for key, value, value_type, sub_type in tokenizer_keys:
            writer.add_key_value(key, value, value_type, sub_type=sub_type)
        writer.add_chat_template(template)
        for tensor_name, data, type_name in tensors:
            qtype = gguf.GGMLQuantizationType[type_name]
            writer.add_tensor(tensor_name, data,
                              raw_dtype=qtype if type_name not in ("F32", "F16") else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def describe_gguf_export(path: str | Path) -> str:
    """One line about a written file, for a command to print: architecture, tensors per type,
    vocabulary, size."""
    from collections import Counter


    file = read_gguf(path)
    types = Counter(t.type_name for t in file.tensors.values())
    vocab = len(file.metadata.get("tokenizer.ggml.tokens", []))
    return (f"{file.architecture}, {len(file.tensors)} tensors ("
            + ", ".join(f"{n} {k}" for k, n in types.most_common())
            + f"), vocab {vocab:,}, {Path(path).stat().st_size / 1e6:.1f} MB")
