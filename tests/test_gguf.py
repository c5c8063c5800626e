"""GGUF: files written here with the `gguf` package (GGUFWriter, gguf.quants) load to the same
tensors, the same logits as the Hugging Face model they were converted from (with llama.cpp's
q/k permutation applied here, as its converter does), the same tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import imagefm  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.gguf import DEQUANTIZED_HERE, dequantize, load_gguf, read_gguf  # noqa: E402
from imagefm.convert.keymap import KeyMapError  # noqa: E402
from imagefm.loading import detect_format  # noqa: E402

Q = gguf.GGMLQuantizationType
BLOCK_TYPES = [name for name in DEQUANTIZED_HERE if name not in ("F32", "F16", "BF16")]


def _random_blocks(type_name: str, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random quantised blocks whose float16 scales are finite (random bytes would give NaNs)."""
    per_block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    halves = (rng.normal(size=(blocks, 2)) * 0.05).astype(np.float16).view(np.uint8)
    if type_name == "Q6_K":
        raw[:, 208:210] = halves[:, :2]
    else:
        raw[:, 0:2] = halves[:, 0:2]  # d
        if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
            raw[:, 2:4] = halves[:, 2:4]  # the minimum (dmin)
    return raw


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_dequantize_equals_the_gguf_package(type_name: str) -> None:
    rng = np.random.default_rng(0)
    per_block = gguf.GGML_QUANT_SIZES[Q[type_name]][0]
    raw = _random_blocks(type_name, 12, rng)
    expected = gguf.quants.dequantize(raw.reshape(1, -1), Q[type_name]).reshape(-1)
    ours = dequantize(raw, type_name, (3, 4 * per_block)).reshape(-1).numpy()
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("type_name,tolerance", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2),
                                                 ("Q5_0", 0.07), ("Q5_1", 0.07), ("Q4_0", 0.15),
                                                 ("Q4_1", 0.15)])
def test_quantized_values_close_to_the_originals(type_name: str, tolerance: float) -> None:
    original = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    stored = (original.astype(np.float16) if type_name == "F16"
              else gguf.quants.quantize(original, Q[type_name]))
    ours = dequantize(stored, type_name, original.shape).numpy()
    assert np.array_equal(ours, gguf.quants.dequantize(stored, Q[type_name]))
    # relative to each row's largest magnitude, the quantisation step's size
    error = np.abs(ours - original).max(axis=1) / np.abs(original).max(axis=1)
    assert error.max() <= tolerance


# --- whole models -----------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permutation of Llama q/k rows (rotate-half -> adjacent pairs)."""
    half = weight.shape[0] // heads // 2
    return (weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{param}"


def _write_gguf(path: Path, reference: torch.nn.Module, arch: str, matrix_type: str = "F32",
                tokenizer_meta: dict | None = None) -> dict[str, np.ndarray]:
    """The reference model as llama.cpp would convert it; returns the stored arrays."""
    config = reference.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    for key, value in (tokenizer_meta or {}).items():
        writer.add_key_value(key, value[0], value[1], sub_type=value[2] if len(value) > 2
                             else None)
    stored = {}
    state = reference.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        array = tensor.detach().float().numpy()
        if arch == "llama" and "self_attn.q_proj" in hf_name:
            array = _llama_cpp_permute(array, config.num_attention_heads)
        if arch == "llama" and "self_attn.k_proj" in hf_name:
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        name = _gguf_name(hf_name)
        if array.ndim == 2 and matrix_type == "F16":
            data = array.astype(np.float16)
            writer.add_tensor(name, data)
        elif array.ndim == 2 and matrix_type != "F32":
            data = gguf.quants.quantize(array, Q[matrix_type])
            writer.add_tensor(name, data, raw_dtype=Q[matrix_type])
        else:
            data = array
            writer.add_tensor(name, data)
        stored[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _shape(**kw) -> dict:
    return dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, **kw)


def _reference(arch: str, tied: bool) -> torch.nn.Module:
    if arch == "llama":
        config = transformers.LlamaConfig(**_shape(num_key_value_heads=2,
                                                   tie_word_embeddings=tied))
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**_shape(num_key_value_heads=2,
                                                   tie_word_embeddings=tied, rope_theta=1e6))
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ours
    return model.eval()


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_f32_gguf_logits_match_transformers(arch: str, tied: bool, tmp_path: Path) -> None:
    reference = _reference(arch, tied)
    path = tmp_path / "model.gguf"
    _write_gguf(path, reference, arch)
    assert detect_format(path) == "gguf"
    model = imagefm.load(path)
    assert model.config.tie_embeddings == tied
    assert model.config.qkv_bias == (arch == "qwen2")
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() <= 1e-4
    assert torch.equal(model.generate(ids, max_new_tokens=8, eos_token_id=[]),
                       reference.generate(ids, attention_mask=torch.ones_like(ids),
                                          do_sample=False, max_new_tokens=8, pad_token_id=0))


@pytest.mark.parametrize("matrix_type", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_1"])
def test_quantized_gguf_loads_the_stored_values(matrix_type: str, tmp_path: Path) -> None:
    reference = _reference("llama", tied=False)
    path = tmp_path / "model.gguf"
    stored = _write_gguf(path, reference, "llama", matrix_type)
    model = load_gguf(path)
    ours = model.state_dict()
    # q_proj holds the un-permuted rows; compare it after permuting back as llama.cpp stores it
    q = ours["blocks.1.attn.q_proj.weight"].numpy()
    q_stored = gguf.quants.dequantize(stored["blk.1.attn_q.weight"], Q[matrix_type])
    assert np.array_equal(_llama_cpp_permute(q, 4), q_stored.reshape(q.shape))
    down = gguf.quants.dequantize(stored["blk.0.ffn_down.weight"], Q[matrix_type])
    assert np.array_equal(ours["blocks.0.mlp.down_proj.weight"].numpy(), down.reshape(64, 128))
    if matrix_type in ("F16", "Q8_0"):  # fine enough to keep the logits close
        ids = torch.randint(0, 64, (1, 12))
        with torch.no_grad():
            diff = (model(ids).logits - reference(ids).logits).abs().max()
        assert diff < (0.05 if matrix_type == "F16" else 0.5)


def test_k_quant_tensor_in_a_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    blocks = {name: _random_blocks(name, 4, rng) for name in ("Q4_K", "Q5_K", "Q6_K")}
    for name, raw in blocks.items():
        writer.add_tensor(f"t.{name}", raw.reshape(2, -1), raw_dtype=Q[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = read_gguf(path)
    for name, raw in blocks.items():
        tensor = file.tensors[f"t.{name}"]
        assert tensor.shape == (2, 512) and tensor.type_name == name
        expected = gguf.quants.dequantize(raw.reshape(1, -1), Q[name]).reshape(2, 512)
        assert np.array_equal(dequantize(tensor.raw, name, tensor.shape).numpy(), expected)


def _trained_bpe() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = ["the cat sat on the mat", "a photo of a dog", "고양이가 매트 위에 앉아 있다",
             "강아지 사진 한 장", "numbers like 12345 and 2024", "Hello, world! How are you?"] * 20
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def test_tokenizer_and_chat_template_from_gguf(tmp_path: Path) -> None:
    bpe = _trained_bpe()
    vocab = bpe.get_vocab_size()
    tokens = [bpe.id_to_token(i) for i in range(vocab)]
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    V = gguf.GGUFValueType
    meta = {"tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("smollm", V.STRING),
            "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
            "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.bos_token_id": (1, V.UINT32),
            "tokenizer.ggml.eos_token_id": (2, V.UINT32),
            "tokenizer.ggml.add_bos_token": (False, V.BOOL),
            "tokenizer.chat_template": (template, V.STRING)}
    config = transformers.LlamaConfig(**{**_shape(num_key_value_heads=2), "vocab_size": vocab})
    reference = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "no-suffix"  # detected by its magic bytes, not its name
    _write_gguf(path, reference, "llama", tokenizer_meta=meta)
    model = imagefm.load(path)
    assert model.config.eos_token_ids == (2,) and model.config.bos_token_id == 1
    assert model.chat_template == template
    texts = ["the cat sat on the mat 42", "고양이 사진", "<|im_start|>user\nhi<|im_end|>\n",
             "  spaced\n\nlines\t12", "unseen wörds ünïcode 🙂"]
    for text in texts:
        assert model.tokenizer.encode(text) == bpe.encode(text).ids
        assert model.tokenizer.decode(bpe.encode(text).ids) == bpe.decode(bpe.encode(text).ids)

    from imagefm.chat import encode_chat

    ids = encode_chat(model, [{"role": "user", "content": "a photo of a dog"}])
    assert ids == bpe.encode("<|im_start|>user\na photo of a dog<|im_end|>\n"
                             "<|im_start|>assistant\n").ids


def test_sentencepiece_tokenizer_from_gguf(tmp_path: Path) -> None:
    """GGUF tokenizer model "llama" (Llama 2, Mistral, TinyLlama): SentencePiece BPE with byte
    fallback, rebuilt from pieces and scores, gives SentencePiece's own ids."""
    import io

    import sentencepiece

    texts = ["the cat sat on the mat", "a photo of a dog", "고양이가 매트 위에 앉아 있다",
             "강아지 사진 한 장", "numbers like 12345 and 2024", "Hello, world! How are you?"]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 30), model_writer=proto, vocab_size=420, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    size = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1
             for i in range(size)]
    V = gguf.GGUFValueType
    meta = {"tokenizer.ggml.model": ("llama", V.STRING),
            "tokenizer.ggml.tokens": ([sp.id_to_piece(i) for i in range(size)], V.ARRAY,
                                      V.STRING),
            "tokenizer.ggml.scores": ([sp.get_score(i) for i in range(size)], V.ARRAY,
                                      V.FLOAT32),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.unknown_token_id": (sp.unk_id(), V.UINT32),
            "tokenizer.ggml.bos_token_id": (sp.bos_id(), V.UINT32),
            "tokenizer.ggml.eos_token_id": (sp.eos_id(), V.UINT32)}
    config = transformers.LlamaConfig(**{**_shape(num_key_value_heads=2), "vocab_size": size})
    path = tmp_path / "spm.gguf"
    _write_gguf(path, transformers.LlamaForCausalLM(config), "llama", tokenizer_meta=meta)
    tokenizer = load_gguf(path).tokenizer
    samples = ["the cat sat on the mat 42", "고양이 사진", "  spaced\n\nlines\t12", " leading",
               "unseen wörds ünïcode 🙂 (bytes)", "the  mat"]
    for text in samples:
        # llama.cpp adds BOS to SentencePiece prompts unless the file says otherwise
        assert tokenizer.encode(text) == [sp.bos_id(), *sp.encode(text)], text
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_broken_and_unsupported_files(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(fake)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        load_gguf(truncated)

    reference = _reference("llama", tied=True)
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'gemma' is not supported"):
        load_gguf(other)

    missing = tmp_path / "missing.gguf"
    stored = _write_gguf(missing, reference, "llama")
    assert "blk.1.ffn_up.weight" in stored
    partial = tmp_path / "partial.gguf"
    file = read_gguf(missing)
    writer = gguf.GGUFWriter(str(partial), "llama")
    for key, value in file.metadata.items():
        if key.startswith("llama."):
            field = gguf.GGUFReader(str(missing)).fields[key]
            writer.add_key_value(key, value, field.types[0])
    for name, tensor in file.tensors.items():
        if name != "blk.1.ffn_up.weight":
            writer.add_tensor(name, np.array(tensor.raw))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(KeyMapError, match=r"blocks\.1\.mlp\.up_proj\.weight"):
        load_gguf(partial)
