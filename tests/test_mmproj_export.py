"""mmproj export (imagefm.convert.mmproj_export): a VLM's vision tower + projector as the GGUF
file llama.cpp's multimodal tools load beside the language model's.

* read back with the gguf package: the clip.* keys, llama.cpp's tensor names, GGML's reversed
  shapes, types and values;
* the file run through llama.cpp's llava graph as clip.cpp builds it for projector type ``mlp``
  (written out here in torch, from the file alone): the VLM's image features;
* what llama.cpp cannot run is refused before anything is written; ``export_vlm_gguf`` and
  ``imagefm export VLM --format gguf`` write both files;
* slow, where ``llama_cpp`` is installed: llama.cpp itself (mtmd) gives the VLM's image
  embeddings and the same greedy answer ids, through its C API and through llama-cpp-python's
  chat handler.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

import imagefm  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.config import VisionConfig  # noqa: E402
from imagefm.convert.mmproj_export import (  # noqa: E402
    MEDIA_MARKER,
    VLM_CHATML_TEMPLATE,
    export_mmproj,
    export_vlm_gguf,
)
from imagefm.models.vit import VisionTransformer  # noqa: E402
from imagefm.models.vlm import VLM, compose_vlm  # noqa: E402
from imagefm.vlm_processor import VLMProcessor  # noqa: E402

# SigLIP-style: no class token, a patch bias; width 48 beside the LM's 32, so a transposed matrix
# cannot pass unnoticed.
SIGLIP = {"image_size": 32, "patch_size": 8, "width": 48, "layers": 3, "heads": 4, "mlp_dim": 64,
          "act": "gelu_tanh", "class_token": False, "patch_bias": True, "pre_norm": False,
          "pool": "mean"}


def _vlm(lm_dir: Path, feature_layer: int = -2, **tower: object) -> VLM:
    """A tiny random VLM (mlp2x_gelu) with every parameter perturbed, biases and norms included,
    so that a dropped or misplaced tensor shows."""
    config = VisionConfig(**{**SIGLIP, **tower})
    vlm = compose_vlm(VisionTransformer(config), imagefm.load(lm_dir), projector="mlp2x_gelu",
                      vision_feature_layer=feature_layer).eval()
    with torch.no_grad():
        for module in (vlm.vision, vlm.projector):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    vlm.chat_template = None  # imagefm's ChatML
    return vlm


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    keys = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return keys, {t.name: t for t in reader.tensors}


def _noise(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


# --- the file ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_keys_names_shapes_types_and_values(dtype: str, tiny_llama_dir: Path,
                                            tmp_path: Path) -> None:
    vlm = _vlm(tiny_llama_dir)
    keys, tensors = _fields(export_mmproj(vlm, tmp_path / "mmproj.gguf", dtype=dtype))
    assert keys["general.architecture"] == "clip" and keys["clip.projector_type"] == "mlp"
    assert keys["clip.has_vision_encoder"] is True and keys["clip.use_gelu"] is True
    assert "clip.use_silu" not in keys
    expected = {"image_size": 32, "patch_size": 8, "embedding_length": 48,
                "feed_forward_length": 64, "block_count": 2, "attention.head_count": 4,
                "projection_dim": 32}
    assert {k: keys[f"clip.vision.{k}"] for k in expected} == expected
    assert keys["clip.vision.feature_layer"] == [2]  # vision_feature_layer -2 of 3 blocks
    assert keys["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert np.allclose(keys["clip.vision.image_mean"], vlm.card.mean)
    assert np.allclose(keys["clip.vision.image_std"], vlm.card.std)
    block = {f"v.blk.{i}.{part}.{kind}" for i in range(2) for kind in ("weight", "bias")
             for part in ("ln1", "attn_q", "attn_k", "attn_v", "attn_out", "ln2", "ffn_up",
                          "ffn_down")}
    assert set(tensors) == block | {"v.patch_embd.weight", "v.patch_embd.bias",
                                    "v.position_embd.weight", "mm.0.weight", "mm.0.bias",
                                    "mm.2.weight", "mm.2.bias"}
    # GGML lists dimensions fastest first: the patch kernel as (KW, KH, in, out).
    assert list(tensors["v.patch_embd.weight"].shape) == [8, 8, 3, 48]
    assert list(tensors["v.blk.0.ffn_up.weight"].shape) == [48, 64]
    assert list(tensors["mm.0.weight"].shape) == [48, 32]
    assert list(tensors["mm.2.weight"].shape) == [32, 32]
    matrix = "F16" if dtype == "f16" else "F32"
    assert tensors["v.blk.1.attn_q.weight"].tensor_type.name == matrix
    assert tensors["v.patch_embd.weight"].tensor_type.name == matrix
    assert tensors["v.position_embd.weight"].tensor_type.name == "F32"
    assert tensors["v.blk.1.ln2.bias"].tensor_type.name == "F32"
    ours = {"v.blk.1.attn_v.weight": vlm.vision.transformer.blocks[1].attn.v_proj.weight,
            "v.blk.0.ffn_down.bias": vlm.vision.transformer.blocks[0].mlp.fc2.bias,
            "v.patch_embd.weight": vlm.vision.patch_embed.weight,
            "v.position_embd.weight": vlm.vision.pos_embed, "mm.2.bias": vlm.projector.fc2.bias}
    for name, value in ours.items():
        stored = torch.from_numpy(np.array(tensors[name].data, dtype=np.float32))
        tolerance = 1e-3 if dtype == "f16" and stored.dim() >= 2 else 0
        assert torch.allclose(stored.reshape(value.shape), value.detach(), atol=tolerance), name


def _llava_graph(path: Path, pixels: torch.Tensor) -> torch.Tensor:
    """What clip.cpp's llava graph (models/llava.cpp, projector type mlp, no class token)
    computes from the file for one preprocessed image [3, H, W]: patch convolution (+ bias),
    positions 0..n-1, optional pre-norm, ``feature_layer`` pre-LN blocks, output rows 0..n-1,
    mm.0 -> GELU (ggml's tanh form) -> mm.2."""
    keys, tensors = _fields(path)
    t = {name: torch.from_numpy(np.array(v.data, dtype=np.float32)).reshape(
        [int(d) for d in reversed(v.shape)]) for name, v in tensors.items()}
    eps, heads = keys["clip.vision.attention.layer_norm_epsilon"], keys[
        "clip.vision.attention.head_count"]
    act = (F.silu if keys.get("clip.use_silu") else
           (lambda x: F.gelu(x, approximate="tanh")) if keys.get("clip.use_gelu") else
           (lambda x: x * torch.sigmoid(1.702 * x)))

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], t[f"{name}.weight"], t[f"{name}.bias"], eps)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, t[f"{name}.weight"], t[f"{name}.bias"])

    patch = keys["clip.vision.patch_size"]
    x = F.conv2d(pixels[None], t["v.patch_embd.weight"], t.get("v.patch_embd.bias"), patch)
    x = x.flatten(2)[0].T
    x = x + t["v.position_embd.weight"][:x.shape[0]]
    if "v.pre_ln.weight" in t:
        x = norm(x, "v.pre_ln")
    for i in range(keys["clip.vision.feature_layer"][0]):
        h = norm(x, f"v.blk.{i}.ln1")
        q, k, v = (linear(h, f"v.blk.{i}.attn_{n}").reshape(len(h), heads, -1).transpose(0, 1)
                   for n in "qkv")
        attn = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(len(h), -1)
        x = x + linear(attn, f"v.blk.{i}.attn_out")
        x = x + linear(act(linear(norm(x, f"v.blk.{i}.ln2"), f"v.blk.{i}.ffn_up")),
                       f"v.blk.{i}.ffn_down")
    return linear(F.gelu(linear(x, "mm.0"), approximate="tanh"), "mm.2")


@pytest.mark.parametrize("tower", [{}, {"act": "quick_gelu", "pre_norm": True,
                                        "patch_bias": False}, {"act": "silu"}])
def test_llava_graph_of_the_file_gives_the_vlm_image_features(tower: dict, tiny_llama_dir: Path,
                                                              tmp_path: Path) -> None:
    vlm = _vlm(tiny_llama_dir, feature_layer=-1 if tower else -2, **tower)
    path = export_mmproj(vlm, tmp_path / "mmproj.gguf", dtype="f32")
    pixels = VLMProcessor.for_model(vlm).images([_noise((32, 32), 1)])
    theirs = _llava_graph(path, pixels[0])
    with torch.no_grad():
        ours = vlm.image_features(pixels)[0]
        # llama.cpp's GELU is the tanh form; with ours swapped for it the file is exact.
        vlm.projector.act = torch.nn.GELU(approximate="tanh")
        ours_tanh = vlm.image_features(pixels)[0]
    assert theirs.shape == ours.shape == (16, 32)
    assert (theirs - ours_tanh).abs().max() < 1e-5 * ours.abs().max()  # float rounding
    assert 0 < (theirs - ours).abs().max() < 1e-2 * ours.abs().max()


def test_what_llama_cpp_cannot_run_is_refused_before_writing(tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "mmproj.gguf"
    cases = [({"class_token": True, "pool": "cls"}, {}, "class token"),
             ({}, {"projector": "pixel_shuffle"}, "idefics3"),
             ({"act": "relu"}, {}, "vision.act"),
             ({"mlp_dim": 48}, {}, "swaps"),
             ({}, {"feature_layer": 0}, "vision_feature_layer = 0")]
    for tower, vlm_options, message in cases:
        config = VisionConfig(**{**SIGLIP, **tower})
        projector = vlm_options.get("projector", "mlp2x_gelu")
        vlm = compose_vlm(VisionTransformer(config), imagefm.load(tiny_llama_dir),
                          projector=projector, pixel_shuffle=2 if projector != "mlp2x_gelu" else 1,
                          vision_feature_layer=vlm_options.get("feature_layer", -1))
        with pytest.raises(CheckpointError, match=message):
            export_mmproj(vlm, path)
        with pytest.raises(CheckpointError, match=message):
            export_vlm_gguf(vlm, tmp_path / "out")
    with pytest.raises(CheckpointError, match="'vlm' architecture"):
        export_mmproj(imagefm.load(tiny_llama_dir), path)
    assert not path.exists() and not (tmp_path / "out").exists()


def test_export_vlm_gguf_writes_both_files_and_a_template_for_content_parts(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    import jinja2.sandbox

    vlm = _vlm(tiny_llama_dir)
    model, mmproj = export_vlm_gguf(vlm, tmp_path / "out", quant="q8_0")
    assert (model.name, mmproj.name) == ("model-q8_0.gguf", "mmproj-f16.gguf")
    keys, tensors = _fields(model)
    assert keys["general.architecture"] == "llama"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert keys["tokenizer.chat_template"] == VLM_CHATML_TEMPLATE
    assert vlm.chat_template is None  # the model itself is left as it was
    assert imagefm.load(model).config.vocab_size == vlm.config.lm.vocab_size  # <image> included
    # The template renders what imagefm's processor renders, with llama.cpp's marker for the
    # image: from a string, from typed parts, and from parts a chat handler already turned into
    # marker text.
    proc = VLMProcessor.for_model(vlm)
    question = [{"role": "user", "content": "<image>\nthe dog?"}]
    expected = proc.render(question).replace("<image>", MEDIA_MARKER)
    # As llama-cpp-python's chat handlers render templates.
    template = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True).from_string(VLM_CHATML_TEMPLATE)
    for content in (f"{MEDIA_MARKER}\nthe dog?",
                    [{"type": "image"}, {"type": "text", "text": "the dog?"}],
                    [{"type": "text", "text": MEDIA_MARKER}, {"type": "text", "text": "the dog?"}]):
        assert template.render(messages=[{"role": "user", "content": content}],
                               add_generation_prompt=True) == expected


def test_cli_export_writes_the_lm_and_the_mmproj(tiny_llama_dir: Path, tiny_vlm: VLM,
                                                 tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imagefm.cli import app

    _vlm(tiny_llama_dir).save_pretrained(tmp_path / "vlm")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "vlm"), "--format", "gguf",
                                      "--quant", "f32", "--out", str(tmp_path / "gguf")])
    assert result.exit_code == 0, result.output
    assert "projector mlp" in result.output
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["mmproj-f32.gguf",
                                                                     "model-f32.gguf"]
    # The small bilingual VLM's shape (a CLIP tower with a class token, the pixel-shuffle
    # projector): refused with the reason, nothing written.
    tiny_vlm.save_pretrained(tmp_path / "shuffle")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "shuffle"), "--format", "gguf",
                                      "--out", str(tmp_path / "refused")])
    assert isinstance(result.exception, CheckpointError) and "idefics3" in str(result.exception)
    assert not (tmp_path / "refused").exists()


# --- llama.cpp itself ----------------------------------------------------------------------------

def _mtmd(llama_cpp, mmproj: Path, llm):
    from llama_cpp import mtmd_cpp

    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, 1
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx is not None
    return mtmd_cpp, ctx


def _chunks(mtmd_cpp, ctx, text: str, image: np.ndarray):
    """mtmd_tokenize of ``text`` (with the media marker) and one RGB image."""
    import ctypes

    height, width, _ = image.shape
    data = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
    bitmap = mtmd_cpp.mtmd_bitmap_init(width, height, data)
    prompt = mtmd_cpp.mtmd_input_text()
    encoded = text.encode()
    prompt.text, prompt.text_len, prompt.add_special, prompt.parse_special = (
        encoded, len(encoded), True, True)
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
    assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), bitmaps, 1) == 0
    mtmd_cpp.mtmd_bitmap_free(bitmap)
    return chunks


@pytest.fixture
def llama_files(tiny_llama_dir: Path, tmp_path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    vlm = _vlm(tiny_llama_dir)
    model, mmproj = export_vlm_gguf(vlm, tmp_path, quant="f32", mmproj_dtype="f32")
    return llama_cpp, vlm, model, mmproj


def _letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """What llama.cpp's ``mlp`` preprocessing makes of a non-square image (mtmd-image.cpp,
    fixed size, PAD_CEIL): fit inside the square (bicubic), centred on grey 122,116,104."""
    from PIL import Image

    height, width, _ = image.shape
    scale = min(size / width, size / height)
    new = (min(int(np.ceil(width * scale)), size), min(int(np.ceil(height * scale)), size))
    canvas = Image.new("RGB", (size, size), (122, 116, 104))
    canvas.paste(Image.fromarray(image).resize(new, Image.Resampling.BICUBIC),
                 ((size - new[0]) // 2, (size - new[1]) // 2))
    return np.asarray(canvas)


@pytest.mark.slow
def test_llama_cpp_image_embeddings(llama_files, tmp_path: Path) -> None:
    """mtmd's image embeddings, F32 and F16 files: the VLM's image features for images at the
    tower's size and for square ones both resize; a non-square image is letterboxed by llama.cpp
    (imagefm crops it): the VLM's features of that letterboxed picture."""
    import ctypes

    llama_cpp, vlm, model, mmproj = llama_files
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=128, n_threads=1, verbose=False)
    proc = VLMProcessor.for_model(vlm)
    wide = _noise((24, 40), 4)
    cases = [(_noise((32, 32), 1), None), (_noise((32, 32), 2), None), (_noise((64, 64), 3), None),
             (wide, _letterbox(wide, 32))]
    for path in (mmproj, export_mmproj(vlm, tmp_path / "mmproj-f16.gguf")):
        mtmd_cpp, ctx = _mtmd(llama_cpp, path, llm)
        try:
            for image, seen in cases:
                chunks = _chunks(mtmd_cpp, ctx, MEDIA_MARKER, image)
                chunk = next(mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                             for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))
                             if mtmd_cpp.mtmd_input_chunk_get_type(
                                 mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                             == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE)
                count = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd_cpp.mtmd_encode_chunk(ctx, chunk) == 0
                pointer = mtmd_cpp.mtmd_get_output_embd(ctx)
                theirs = torch.from_numpy(np.ctypeslib.as_array(
                    ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (count, 32)).copy())
                mtmd_cpp.mtmd_input_chunks_free(chunks)
                with torch.no_grad():
                    ours = vlm.image_features(proc.images([image if seen is None else seen]))[0]
                assert theirs.shape == ours.shape
                # F16 GELU tables, the tanh GELU, F16 weights: 1e-3 of the features' scale.
                error = (theirs - ours).abs().max() / ours.abs().max()
                assert error < 3e-3, (path.name, image.shape, float(error))
                if seen is not None:  # imagefm's own crop of the same picture is another input
                    with torch.no_grad():
                        cropped = vlm.image_features(proc.images([image]))[0]
                    assert (theirs - cropped).abs().max() > 0.1 * ours.abs().max()
        finally:
            mtmd_cpp.mtmd_free(ctx)
    llm.close()


def _png_uri(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow
def test_llama_cpp_answers_with_the_vlm_greedy_tokens(llama_files) -> None:
    """The same greedy ids for a few pictures and questions: llama.cpp's text and image chunks
    evaluated in turn (as its chat handler does), then its own sampler at temperature 0; and
    the chat handler's answer text, from an OpenAI-style message with an image part."""
    import ctypes

    llama_cpp, vlm, model, mmproj = llama_files
    from llama_cpp.llama_chat_format import MTMDChatHandler

    proc = VLMProcessor.for_model(vlm)
    cases = [(_noise((32, 32), 4), "the dog?"), (_noise((32, 32), 5), "작은 고양이"),
             (np.full((32, 32, 3), 200, np.uint8), "a small cat runs")]
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=128, n_threads=1, verbose=False)
    mtmd_cpp, ctx = _mtmd(llama_cpp, mmproj, llm)
    steps = 8
    try:
        for image, question in cases:
            messages = [{"role": "user", "content": f"<image>\n{question}"}]
            batch = proc.prompt([messages], [image])
            with torch.no_grad():
                mine = vlm.generate(**batch, max_new_tokens=steps, eos_token_id=[])
            mine = mine[0, batch["input_ids"].shape[1]:].tolist()
            text = proc.render(messages).replace("<image>", MEDIA_MARKER)
            chunks = _chunks(mtmd_cpp, ctx, text, image)
            llm.reset()
            llm._ctx.kv_cache_clear()
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ids = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    llm.eval([ids[j] for j in range(n.value)])
                else:
                    n_past = llama_cpp.llama_pos(0)
                    assert mtmd_cpp.mtmd_helper_eval_chunk_single(
                        ctx, llm._ctx.ctx, chunk, llama_cpp.llama_pos(llm.n_tokens),
                        llama_cpp.llama_seq_id(0), llm.n_batch, False, ctypes.byref(n_past)) == 0
                    llm.n_tokens = n_past.value
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            assert llm.n_tokens == batch["input_ids"].shape[1]
            theirs = []
            for token in llm.generate(llm.input_ids[:llm.n_tokens].tolist(), top_k=1, temp=0.0,
                                      repeat_penalty=1.0, reset=True):
                theirs.append(token)
                if len(theirs) == steps:
                    break
            assert theirs == mine, question
    finally:
        mtmd_cpp.mtmd_free(ctx)
        llm.close()
    # The chat handler's path: an OpenAI-style message with an image part, the GGUF's template.
    chat = llama_cpp.Llama(model_path=str(model), n_ctx=128, n_threads=1, verbose=False,
                           chat_handler=MTMDChatHandler(clip_model_path=str(mmproj),
                                                        verbose=False, use_gpu=False))
    image, question = cases[0]
    reply = chat.create_chat_completion(
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_uri(image)}},
            {"type": "text", "text": question}]}],
        temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=steps)
    prompt = reply["usage"]["prompt_tokens"]
    batch = proc.prompt([[{"role": "user", "content": f"<image>\n{question}"}]], [image])
    assert prompt == batch["input_ids"].shape[1]
    with torch.no_grad():
        mine = vlm.generate(**batch, max_new_tokens=2 * steps, eos_token_id=[])
    # Its answer ids (it detokenises random byte tokens leniently, so ids, not text, and it
    # samples past max_tokens while the text ends inside a UTF-8 character): the tokens it
    # evaluated after the prompt.
    theirs = chat.input_ids[prompt:chat.n_tokens].tolist()
    assert steps - 1 <= len(theirs) <= 2 * steps
    assert theirs == mine[0, prompt:prompt + len(theirs)].tolist()
    chat.close()
