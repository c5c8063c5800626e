"""Weight-only quantised layers (imagefm.models.quantized): the kernel multiplies by exactly the
weights that llama.cpp's own dequantisation (``gguf.quants``) gives, GGUF files keep their blocks
when loaded quantised and give the float load's logits and greedy tokens, and everything around
(fused q/k/v, batches with left padding, inputs_embeds, gradients, fallbacks) still works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import imagefm  # noqa: E402
from imagefm.convert import gguf as gguf_convert  # noqa: E402
from imagefm.convert.gguf import load_gguf  # noqa: E402
from imagefm.models import fused_decode, quant_kernel, quantized  # noqa: E402
from imagefm.models.decoder import DecoderLM  # noqa: E402
from imagefm.models.decoder_config import DecoderConfig  # noqa: E402
from imagefm.models.quantized import (  # noqa: E402
    KERNEL_MAX_ROWS,
    QuantizedLinear,
    is_quantized,
    kernel_status,
    quantize_decoder,
)

Q = gguf.GGMLQuantizationType
TYPES = ["Q4_0", "Q4_1", "Q8_0"]

needs_kernel = pytest.mark.skipif(not kernel_status()[0],
                                  reason=f"no quantised kernel: {kernel_status()[1]}")


def _random_gguf_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random blocks with finite float16 scales of a realistic size."""
    rng = np.random.default_rng(seed)
    per_block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    raw = rng.integers(0, 256, size=(rows * cols // per_block, size), dtype=np.uint8)
    halves = (rng.normal(size=(raw.shape[0], 2)) * 0.02).astype(np.float16).view(np.uint8)
    raw[:, 0:2] = halves[:, 0:2]  # d
    if type_name == "Q4_1":
        raw[:, 2:4] = halves[:, 2:4]  # m
    return raw


def _bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What float32 summation order may change: a few ulps of sum(|x| |w|)."""
    return 1e-5 * (x.abs() @ weight.abs().T) + 1e-6


@needs_kernel
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 5])
def test_matmul_equals_llama_cpp_dequantised_weights(type_name: str, rows: int) -> None:
    out_features, in_features = 70, 160  # 70 rows: the kernel's 4-row tiles leave a tail
    raw = _random_gguf_blocks(type_name, out_features, in_features)
    expected = torch.from_numpy(gguf.quants.dequantize(raw.reshape(1, -1), Q[type_name])
                                ).reshape(out_features, in_features)
    layer = QuantizedLinear.from_gguf(raw, type_name, (out_features, in_features))
    assert torch.equal(layer.dequantize(), expected)  # the kernel's own dequantisation
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        y = layer(x)
    reference = x.double() @ expected.double().T
    assert ((y.double() - reference).abs() <= _bound(x, expected).double()).all()
    assert layer.nbytes < expected.numel() * 4 / (3.5 if type_name == "Q8_0" else 5)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_from_float_rounds_as_llama_cpp(kind: str) -> None:
    weight = torch.randn(12, 96)
    weight[3, :32] = 0.0  # a zero block (scale 0)
    layer = QuantizedLinear.from_float(weight, kind)
    blocks = gguf.quants.quantize(weight.numpy(), Q[kind.upper()])
    expected = gguf.quants.dequantize(blocks, Q[kind.upper()])
    assert torch.equal(layer.dequantize(), torch.from_numpy(expected))
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedLinear.from_float(torch.randn(4, 40), kind)


def test_without_kernel_and_with_gradients_uses_the_same_weights(monkeypatch) -> None:
    layer = QuantizedLinear.from_float(torch.randn(40, 64), "q4_1", bias=torch.randn(40))
    weight = layer.dequantize()
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)  # a gradient is needed: the dequantised weight through F.linear
    y.sum().backward()
    assert torch.allclose(x.grad, weight.sum(0).expand(2, 5, 64), atol=1e-5)
    assert torch.allclose(y, x @ weight.T + layer.bias, atol=1e-5)
    monkeypatch.setattr(quantized, "kernel", lambda: None)
    with torch.no_grad():
        assert torch.allclose(layer(x), y, atol=1e-5)
        assert torch.equal(layer.dequantize(), weight)
    bf16 = layer.to(torch.bfloat16)
    assert bf16.scales.dtype == torch.float32  # the exact scales are never rounded


def test_missing_compiler_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C compiler 'no-such-compiler-here'"):
        quant_kernel._build()


# --- GGUF files ----------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from test_gguf import _reference, _trained_bpe, _write_gguf  # noqa: E402


@needs_kernel
@pytest.mark.parametrize("arch,tied,matrix_type", [("llama", True, "Q4_1"),
                                                   ("llama", True, "Q4_0"),
                                                   ("qwen2", False, "Q4_1"),
                                                   ("llama", False, "Q8_0")])
def test_gguf_loads_quantized_with_the_float_loads_results(arch: str, tied: bool,
                                                           matrix_type: str,
                                                           tmp_path: Path,
                                                           monkeypatch) -> None:
    path = tmp_path / "model.gguf"
    _write_gguf(path, _reference(arch, tied), arch, matrix_type)
    dense, packed = load_gguf(path), load_gguf(path, keep_quantized=True)
    linears = [m for m in packed.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * packed.config.layers + 1  # every projection, and the head
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    # the same weights: q/k un-permuted with their blocks, biases kept
    for name, module in dense.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(packed.get_submodule(name).dequantize(), module.weight), name
    head = packed.quantized_head if tied else packed.lm_head
    assert torch.equal(head.dequantize(), dense.output_weight)

    ids = torch.randint(0, 64, (2, 12))
    with torch.inference_mode():
        expected = dense(ids).logits  # 12 rows per batch item: the prompt (dequantise) path
        assert (packed(ids).logits - expected).abs().max() <= 1e-4
        step_dense, step_packed = dense.new_cache(2, 16), packed.new_cache(2, 16)
        dense(ids, cache=step_dense)
        packed(ids, cache=step_packed)
        last = ids[:, -1:]  # one row per batch item: the kernel path
        assert (packed(last, cache=step_packed).logits
                - dense(last, cache=step_dense).logits).abs().max() <= 1e-4
        embeds = dense.get_input_embeddings()(ids)
        assert (packed(inputs_embeds=embeds).logits - expected).abs().max() <= 1e-4
    # left padding: each row as it would be alone, with the fused decoding step (int8-rounded
    # inputs, tests/test_fused_decode.py) and without it
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    for fused in (True, False):
        monkeypatch.setattr(fused_decode, "ENABLED", fused)
        padded = packed.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
        alone = packed.generate(ids[:1, 5:], max_new_tokens=6, eos_token_id=[])
        assert torch.equal(padded[0, 12:], alone[0, 7:])
    # without it (float inputs) the same weights give the same tokens as the float model
    assert torch.equal(packed.generate(ids, max_new_tokens=8, eos_token_id=[]),
                       dense.generate(ids, max_new_tokens=8, eos_token_id=[]))
    assert torch.equal(padded, dense.generate(ids, attention_mask=mask, max_new_tokens=6,
                                              eos_token_id=[]))
    # an imagefm checkpoint holds the file's blocks as they are
    packed.save_pretrained(tmp_path / "out")
    again = imagefm.load(tmp_path / "out")
    for name, module in packed.named_modules():
        if isinstance(module, QuantizedLinear):
            saved = again.get_submodule(name)
            assert torch.equal(saved.qweight, module.qweight), name
            assert torch.equal(saved.scales, module.scales), name


def test_gguf_without_kernel_warns_and_loads_float(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.gguf"
    _write_gguf(path, _reference("llama", True), "llama", "Q4_1")
    monkeypatch.setattr(gguf_convert, "kernel_status", lambda: (False, "no C compiler 'cc'"))
    with pytest.warns(UserWarning, match="no C compiler"):
        model = load_gguf(path, keep_quantized=True)
    assert not is_quantized(model)


@needs_kernel
def test_generate_command_keeps_gguf_blocks(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imagefm.cli import app
    from imagefm.cli.lm import load_language_model

    bpe = _trained_bpe()
    tokens = [bpe.id_to_token(i) for i in range(bpe.get_vocab_size())]
    merges = [m if isinstance(m, str) else " ".join(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    V = gguf.GGUFValueType
    meta = {"tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("smollm", V.STRING),
            "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
            "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
            "tokenizer.ggml.token_type": ([3 if t.startswith("<|") else 1 for t in tokens],
                                          V.ARRAY, V.INT32),
            "tokenizer.ggml.bos_token_id": (1, V.UINT32),
            "tokenizer.ggml.eos_token_id": (2, V.UINT32)}
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, reference, "llama", "Q4_1", tokenizer_meta=meta)
    runs = {choice: CliRunner().invoke(app, ["generate", str(path), "the small cat", "--raw",
                                             "-n", "6", "--quantize", choice])
            for choice in ("auto", "none")}
    for result in runs.values():
        assert result.exit_code == 0, result.output
    assert runs["auto"].output == runs["none"].output  # the same weights, the same text
    assert len(runs["auto"].output.strip()) > 0
    assert is_quantized(load_language_model(path, "auto"))
    assert not is_quantized(load_language_model(path, "none"))
    bad = CliRunner().invoke(app, ["generate", str(path), "hi", "--quantize", "q3_k"])
    assert bad.exit_code != 0 and "q3_k" in bad.output


@needs_kernel
def test_quantize_decoder_float_model() -> None:
    config = DecoderConfig(vocab_size=96, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=128,
                           qkv_bias=True, tie_embeddings=True)
    model = DecoderLM(config).eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.inference_mode():
        dense = model(ids).logits
    quantize_decoder(model, "q8_0", head="q8_0")
    assert isinstance(model.blocks[1].attn.q_proj, QuantizedLinear)
    assert model.blocks[0].attn.q_proj.bias is not None
    # q, k and v lie back to back: one kernel call reads them without a copy
    attn = model.blocks[0].attn
    joined = QuantizedLinear.concat([attn.q_proj, attn.k_proj, attn.v_proj])
    assert joined.qweight.data_ptr() == attn.q_proj.qweight.data_ptr()
    with torch.inference_mode():
        error = (model(ids).logits - dense).abs().max() / dense.abs().max()
    assert error < 0.02  # 8-bit blocks: within a percent or so of the float model
    out = model.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (2, 14)
    with pytest.raises(ValueError, match="unknown quantisation"):
        quantize_decoder(model, "q3_k")


# --- the real model ------------------------------------------------------------------------------

@needs_kernel
@pytest.mark.slow
def test_smollm2_quantized_greedy_equals_float() -> None:
    from test_smollm2 import QUESTION, _smollm2_file

    from imagefm.chat import encode_chat

    path = _smollm2_file()
    packed = load_gguf(path, keep_quantized=True)
    assert isinstance(packed.blocks[0].mlp.down_proj, QuantizedLinear)
    dense = load_gguf(path)
    prompt = torch.tensor([encode_chat(packed, QUESTION)])
    expected = dense.generate(prompt, max_new_tokens=24)
    assert torch.equal(packed.generate(prompt, max_new_tokens=24), expected)
    assert "Paris" in packed.tokenizer.decode(expected[0, prompt.shape[1]:])

