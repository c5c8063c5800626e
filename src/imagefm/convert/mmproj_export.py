"""imagefm VLMs to llama.cpp: the language model as a GGUF file, the vision tower + projector as
an "mmproj" GGUF file beside it (what llama.cpp's multimodal tools -- ``llama-mtmd-cli``,
``llama-server --mmproj``, llama-cpp-python's ``MTMDChatHandler`` -- load).

    export_vlm_gguf(vlm, "out/", quant="q8_0")   out/model-q8_0.gguf + out/mmproj-f16.gguf
    export_vlm_gguf(vlm, "out/", quant="f32")    out/model-f32.gguf + out/mmproj-f32.gguf
    export_mmproj(vlm, "mmproj.gguf", dtype="f16")

Projector type: ``mlp``, llama.cpp's LLaVA-1.5 projector (``mm.0`` -> GELU -> ``mm.2``), for
imagefm's ``mlp2x_gelu`` projector. It is the one type whose whole path fits imagefm's ``vlm``
architecture: one fixed-size image, no tiles, no marker tokens around the image, one LM token per
patch, the vision tower read at any block (``clip.vision.feature_layer``) before its post-norm.
Checked against the mtmd sources vendored in llama-cpp-python 0.3.36 (llama.cpp 0c1e570).

What llama.cpp cannot run is refused (one line, before anything is written):

* a vision tower with a class token. llama.cpp's llava graph appends the class token after the
  patches, yet still fills the position and output-row indices for a class token in front: the
  LM would get the class token's features and lose the first patch's (ggml-org/llama.cpp#25814,
  fix #25844 not merged). No other graph with a class token ends in a plain MLP or one linear
  layer (internvl and nemotron_v2_vl normalise before their MLP). SigLIP-style towers run.
* the ``pixel_shuffle`` projector. The one type with one linear layer after the merge,
  ``idefics3``, merges 2x2 patches in the same channel order as ours (``dy, dx, channel``,
  ``build_patch_merge_permute`` == :func:`imagefm.models.projector.pixel_shuffle`), but has no
  bias, runs its SigLIP graph without a class token, and always tiles an image (an overview plus
  Lanczos-resized tiles, each wrapped in Idefics3's ``<fake_token_around_image>`` tokens): not the
  prompt an imagefm ``vlm`` was trained on. ``lfm2`` (merge, optional LayerNorm, two linear
  layers) resizes images to 64-256 tokens and wraps them in LFM2's tokens.
* EfficientNet, NaFlex and convolutional-stem towers (no clip graph has them); a ReLU tower (no
  ``clip.use_*`` key selects it); ``mlp_dim == width`` (llama.cpp then swaps ``ffn_up`` and
  ``ffn_down`` for legacy files).

What differs from imagefm, by construction of llama.cpp: GELU (the projector's and a ``gelu``
tower's) is the tanh approximation, read like QuickGELU from an F16 table, so image features
agree to <1e-3 of their scale with an F32 file (1-2e-3 with F16; greedy answers the same,
tests/test_mmproj_export.py). llama.cpp resizes with Pillow's bicubic filter: square images
resize alike under a bicubic card (a bilinear one, SigLIP's, differs slightly); other shapes are
letterboxed to the square (padded with grey 122,116,104) where imagefm resizes the shortest side
(or squashes) and centre-crops: crop such images first for the same answers.

The small bilingual VLM recomposed this way (the quickstart's ViT trained without a class token,
SmolLM2-135M with Korean tokens added by ``imagefm extend-vocab``, ``mlp2x_gelu``), written in
F32, gives imagefm's greedy answers word for word in llama.cpp on 20 synthetic questions in
English and Korean (tests/test_llama_cpp_vlm.py, docs/results.md).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imagefm.checkpoint import CheckpointError, atomic_write
from imagefm.convert.gguf_export import check_exportable, export_gguf, gguf_package
from imagefm.models.vlm import VLM

PROJECTOR_TYPE = "mlp"
DTYPES = ("f16", "f32")
MEDIA_MARKER = "<__media__>"  # mtmd_default_marker(): where llama.cpp puts an image's tokens
# clip.use_gelu / clip.use_silu; neither is QuickGELU (llama.cpp's default for CLIP towers).
ACTIVATION_KEYS = {"quick_gelu": None, "gelu": "clip.use_gelu", "gelu_tanh": "clip.use_gelu",
                   "silu": "clip.use_silu"}
# imagefm's ChatML (imagefm.chat), reading content parts as llama.cpp's tools pass them: text
# parts, image parts already turned into the media marker (llama-server, llama-cpp-python) or
# still typed. An image is followed by a newline when text follows, as VLMProcessor writes it.
VLM_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% set image = part['type'] != 'text' or part['text'] == '" + MEDIA_MARKER + "' %}"
    "{{ '" + MEDIA_MARKER + "' if image else part['text'] }}"
    "{% if image and not loop.last %}{% set after = message['content'][loop.index0 + 1] %}"
    "{% if after['type'] == 'text' and after['text'] != '" + MEDIA_MARKER + "' %}{{ '\n' }}"
    "{% endif %}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# --- which model --------------------------------------------------------------------------------

def check_mmproj_exportable(vlm: Any) -> None:
    """Raise :class:`CheckpointError` naming what llama.cpp's ``mlp`` projector type cannot run
    (see the module docstring); return quietly when the model can be written."""
    if not isinstance(vlm, VLM):
        raise CheckpointError(f"mmproj export writes imagefm's LLaVA-style 'vlm' architecture; "
                              f"got a {type(vlm).__name__}")
    c = vlm.config
    if not c.is_vit:
        raise CheckpointError("llama.cpp's vision graphs have no EfficientNet tower: mmproj "
                              "export needs a ViT vision tower")
    v = c.vision
    if c.projector != "mlp2x_gelu":
        raise CheckpointError(
            f"llama.cpp has no projector type for imagefm's {c.projector!r} projector (idefics3 "
            f"merges patches as we do but has no bias, no class token and tiles every image in "
            f"Idefics3's tokens): compose the VLM with projector='mlp2x_gelu' for llama.cpp")
    if v.class_token:
        raise CheckpointError(
            "llama.cpp's mlp projector cannot run a vision tower with a class token: its llava "
            "graph feeds the class token to the LM in place of the first patch "
            "(ggml-org/llama.cpp#25814); use a tower without one (SigLIP-style)")
    if v.naflex or v.stem != "patch":
        raise CheckpointError("llama.cpp's vision graphs embed patches with one strided "
                              "convolution: NaFlex and convolutional-stem towers cannot be written")
    if v.act not in ACTIVATION_KEYS:
        raise CheckpointError(f"vision.act = {v.act!r}: llama.cpp's vision towers run "
                              f"{', '.join(ACTIVATION_KEYS)} only")
    if v.mlp_dim == v.width:
        raise CheckpointError(f"vision.mlp_dim = vision.width = {v.width}: llama.cpp reads such "
                              f"a tower's MLP as a legacy file and swaps its two layers")
    if c.feature_blocks == 0:
        raise CheckpointError("vlm.vision_feature_layer = 0 reads the patch embeddings alone; "
                              "llama.cpp's llava graph runs at least one block")
    if vlm.card.resize_mode == "naflex" or vlm.card.image_size != v.image_size:
        raise CheckpointError(f"the preprocessing card resizes to {vlm.card.image_size} px, the "
                              f"tower's grid is for {v.image_size} px; llama.cpp feeds the tower "
                              f"clip.vision.image_size px")
    if any(type(m) not in (nn.Linear, nn.Conv2d, nn.LayerNorm) for m in _modules(vlm).values()):
        raise CheckpointError("the vision tower or projector holds quantised or adapter layers: "
                              "merge or dequantise them before export")


# --- tensors -------------------------------------------------------------------------------------

def _modules(vlm: VLM) -> dict[str, nn.Module]:
    """llama.cpp's tensor prefixes -> our layers: the blocks up to the feature layer and no
    post-norm (the VLM reads the hidden state before it), the projector as ``mm.0`` / ``mm.2``."""
    tower = vlm.vision
    modules = {"v.patch_embd": tower.patch_embed}
    if tower.norm_pre is not None:
        modules["v.pre_ln"] = tower.norm_pre
    parts = {"ln1": "norm1", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
             "attn_v": "attn.v_proj", "attn_out": "attn.o_proj", "ln2": "norm2",
             "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
    for index in range(vlm.config.feature_blocks):
        block = tower.transformer.blocks[index]
        modules.update({f"v.blk.{index}.{theirs}": block.get_submodule(ours)
                        for theirs, ours in parts.items()})
    modules["mm.0"], modules["mm.2"] = vlm.projector.fc1, vlm.projector.fc2
    return modules


def _vision_weights(vlm: VLM) -> dict[str, torch.Tensor]:
    """Every tensor of the file under llama.cpp's name."""
    weights = {"v.position_embd.weight": vlm.vision.pos_embed}
    for prefix, module in _modules(vlm).items():
        weights[f"{prefix}.weight"] = module.weight
        if module.bias is not None:
            weights[f"{prefix}.bias"] = module.bias
        elif prefix.startswith("mm."):  # llama.cpp adds mm.0 / mm.2 biases unconditionally
            weights[f"{prefix}.bias"] = torch.zeros(module.weight.shape[0])
    return weights


def mmproj_tensors(vlm: VLM, dtype: str = "f16") -> Iterator[tuple[str, np.ndarray, str]]:
    """``(name, data, GGML type name)`` of every tensor of the mmproj file. With ``f16`` the
    patch convolution and the linear layers' matrices are F16 (as llama.cpp's converter writes
    them); norms, biases and the position table stay F32."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    for name, tensor in _vision_weights(vlm).items():
        data = tensor.detach().float().cpu().numpy()
        half = dtype == "f16" and data.ndim >= 2 and name != "v.position_embd.weight"
        yield name, data.astype(np.float16 if half else np.float32), "F16" if half else "F32"


# --- the file ------------------------------------------------------------------------------------

def _add_metadata(writer: Any, vlm: VLM, dtype: str, name: str | None) -> None:
    gguf = gguf_package()
    c, v = vlm.config, vlm.config.vision
    writer.add_name(name or "imagefm vlm vision tower")
    writer.add_file_type(int(gguf.LlamaFileType["MOSTLY_F16" if dtype == "f16" else "ALL_F32"]))
    writer.add_string("clip.projector_type", PROJECTOR_TYPE)
    writer.add_bool("clip.has_vision_encoder", True)
    if ACTIVATION_KEYS[v.act]:
        writer.add_bool(ACTIVATION_KEYS[v.act], True)
    for key, value in (("image_size", v.image_size), ("patch_size", v.patch_size),
                       ("embedding_length", v.width), ("feed_forward_length", v.mlp_dim),
                       ("block_count", c.feature_blocks), ("attention.head_count", v.heads),
                       ("projection_dim", c.lm.width)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", v.norm_eps)
    f32, i32 = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.INT32
    array = gguf.GGUFValueType.ARRAY
    writer.add_key_value("clip.vision.image_mean", list(vlm.card.mean), array, sub_type=f32)
    writer.add_key_value("clip.vision.image_std", list(vlm.card.std), array, sub_type=f32)
    # Without it the llava graph stops one block early (LLaVA-1.5's second-to-last layer).
    writer.add_key_value("clip.vision.feature_layer", [c.feature_blocks], array, sub_type=i32)


def export_mmproj(vlm: VLM, path: str | Path, *, dtype: str = "f16",
                  name: str | None = None) -> Path:
    """Write ``vlm``'s vision tower and projector as a llama.cpp mmproj GGUF file (projector
    type ``mlp``); ``dtype``: ``f16`` or ``f32``; ``name``: ``general.name``. Written whole or not
    at all; raises :class:`CheckpointError` before writing for what llama.cpp cannot run."""
    gguf = gguf_package()
    check_mmproj_exportable(vlm)
    tensors = list(mmproj_tensors(vlm, dtype))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "clip")
        _add_metadata(writer, vlm, dtype, name)
        for tensor_name, data, _ in tensors:
            writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def export_vlm_gguf(vlm: VLM, out_dir: str | Path, *, quant: str = "f16",
                    mmproj_dtype: str | None = None) -> tuple[Path, Path]:
    """``out_dir/model-<quant>.gguf`` (the LM, :func:`imagefm.convert.gguf_export.export_gguf`)
    and ``out_dir/mmproj-<mmproj_dtype>.gguf``, both checked before either is written.
    ``mmproj_dtype`` defaults to ``f32`` for an F32 LM (the files to compare answers with
    imagefm's) and ``f16`` otherwise (what llama.cpp's converter writes).

    A VLM without a chat template of its own gets imagefm's ChatML, written to read content
    parts (the text of llama.cpp's media marker for an image), so chat handlers that pass
    OpenAI-style content lists render the prompt imagefm's processor builds.
    """
    check_mmproj_exportable(vlm)
    check_exportable(vlm.lm)
    if mmproj_dtype is None:
        mmproj_dtype = "f32" if quant == "f32" else "f16"
    if mmproj_dtype not in DTYPES:
        raise CheckpointError(f"mmproj_dtype={mmproj_dtype!r}: choose one of {', '.join(DTYPES)}")
    lm = vlm.lm
    if lm.chat_template is None:
        lm = copy.copy(lm)  # shares the weights; only the template attribute differs
        lm.chat_template = VLM_CHATML_TEMPLATE
    out_dir = Path(out_dir)
    model_path = export_gguf(lm, out_dir / f"model-{quant}.gguf", quant=quant)
    mmproj_path = export_mmproj(vlm, out_dir / f"mmproj-{mmproj_dtype}.gguf", dtype=mmproj_dtype)
    return model_path, mmproj_path


def describe_mmproj_export(path: str | Path) -> str:
    """One line about a written mmproj file: projector type, tower, tensors per type, size."""
    from collections import Counter

    gguf = gguf_package()
    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    types = Counter(t.tensor_type.name for t in reader.tensors)
    return (f"clip (projector {value('clip.projector_type')}), vision "
            f"{value('clip.vision.block_count')} blocks x {value('clip.vision.embedding_length')}"
            f" at {value('clip.vision.image_size')} px, {len(reader.tensors)} tensors ("
            + ", ".join(f"{n} {k}" for k, n in types.most_common())
            + f"), {Path(path).stat().st_size / 1e6:.1f} MB")
