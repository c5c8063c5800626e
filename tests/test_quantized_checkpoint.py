"""Quantised checkpoints (``imagefm quantize``): a quantised LM or VLM saves its blocks, loads back
to the same outputs, and dequantises to a float model with exactly its weights — which is what
transformers runs in benchmarks/bench_generate.py ("the same weights")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import imagefm
from imagefm.cli import app
from imagefm.convert.llama import config_to_hf_lm, hf_lm_state_dict
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.quantized import (
    QuantizedLinear,
    decode_weight_bytes,
    dequantize_decoder,
    is_quantized,
    kernel_status,
    quantize_model,
)
from imagefm.models.vlm import VLM
from imagefm.vlm_processor import VLMProcessor

pytestmark = pytest.mark.skipif(not kernel_status()[0],
                                reason=f"no quantised kernel: {kernel_status()[1]}")


def _prompt(vlm: VLM) -> dict[str, torch.Tensor]:
    image = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=torch.Generator()
                          .manual_seed(0)).numpy()
    return VLMProcessor.for_model(vlm).prompt([[{"role": "user", "content": "the dog?"}]],
                                              [image])


@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
def test_quantized_vlm_saves_its_blocks_and_loads_to_the_same_outputs(
        tiny_vlm: VLM, tmp_path: Path, kind: str) -> None:
    quantize_model(tiny_vlm, kind, "q8_0")
    assert isinstance(tiny_vlm.lm.blocks[0].mlp.down_proj, QuantizedLinear)
    assert not is_quantized(tiny_vlm.vision) and not is_quantized(tiny_vlm.projector)
    tiny_vlm.save_pretrained(tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "imagefm.json").read_text())
    layers = 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down), and the Q8_0 head
    expected = {"4-bit layers": 0, "8-bit layers": layers + 1} if kind == "q8_0" else \
        {"4-bit layers": layers, "8-bit layers": 1}
    assert meta["quantization"] == expected
    loaded = imagefm.load(tmp_path / "q")
    assert isinstance(loaded.lm.blocks[1].attn.q_proj, QuantizedLinear)
    assert isinstance(loaded.lm.lm_head, QuantizedLinear)  # the head (untied here): Q8_0
    batch = _prompt(tiny_vlm)
    with torch.inference_mode():
        assert torch.equal(loaded(**batch).logits, tiny_vlm(**batch).logits)
    assert torch.equal(loaded.generate(**batch, max_new_tokens=5, eos_token_id=[]),
                       tiny_vlm.generate(**batch, max_new_tokens=5, eos_token_id=[]))


@pytest.mark.parametrize("tie", [True, False])
def test_dequantised_float_model_has_the_same_weights_as_transformers_sees_them(
        tie: bool) -> None:
    import transformers

    config = DecoderConfig(vocab_size=96, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=128,
                           tie_embeddings=tie)
    model = DecoderLM(config).eval()
    float_embedding = model.embed_tokens.weight.detach().clone()
    quantize_model(model, "q4_1", "q8_0")
    if tie:  # the embedding now holds the head's rounded values (one matrix, as in GGUF)
        head = model.quantized_head.dequantize()
        assert torch.equal(model.embed_tokens.weight, head)
        assert not torch.equal(head, float_embedding)
    dense = dequantize_decoder(_copy(model))
    assert not is_quantized(dense) and dense.quantized_head is None
    assert torch.equal(dense.blocks[0].attn.k_proj.weight,
                       model.blocks[0].attn.k_proj.dequantize())
    # transformers on those float weights computes what the quantised layers compute
    reference = transformers.LlamaForCausalLM(
        transformers.AutoConfig.for_model(**config_to_hf_lm(dense.config))).eval()
    state = hf_lm_state_dict(model)  # an HF export writes the blocks' float values
    assert all(torch.equal(v, hf_lm_state_dict(dense)[k]) for k, v in state.items())
    if tie:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict(state)
    ids = torch.randint(3, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert decode_weight_bytes(model) < decode_weight_bytes(model, 4) / 3


def _copy(model: DecoderLM) -> DecoderLM:
    import copy

    return copy.deepcopy(model)


def test_quantize_command(tiny_vlm: VLM, tmp_path: Path) -> None:
    tiny_vlm.save_pretrained(tmp_path / "float")
    runner = CliRunner()
    done = runner.invoke(app, ["quantize", str(tmp_path / "float"), "--out",
                               str(tmp_path / "q8")])
    assert done.exit_code == 0, done.output
    assert "MB of weights read per decoded token" in done.output
    loaded = imagefm.load(tmp_path / "q8")
    assert loaded.lm.blocks[0].attn.o_proj.bits == 8  # auto: Q8_0 for a float checkpoint
    assert imagefm.load_processor(tmp_path / "q8") is not None
    again = runner.invoke(app, ["quantize", str(tmp_path / "float"), "--out",
                                str(tmp_path / "q8")])
    assert again.exit_code != 0 and "not empty" in again.output
    bad = runner.invoke(app, ["quantize", str(tmp_path / "float"), "--out",
                              str(tmp_path / "x"), "--format", "q3_k"])
    assert bad.exit_code != 0 and "q3_k" in bad.output
    described = {name: runner.invoke(app, ["info", str(tmp_path / name)]) for name in
                 ("float", "q8")}
    assert all(r.exit_code == 0 for r in described.values()), described["float"].output
    assert "vlm (vision vit, lm llama)" in described["float"].output
    assert "quantised" not in described["float"].output
    assert "15 8-bit layers (blocks of 32)" in described["q8"].output
    to_hf = runner.invoke(app, ["convert", str(tmp_path / "q8"), str(tmp_path / "hf"),
                                "--to", "hf"])
    # the tiny VLM's pixel-shuffle projector has no LLaVA equivalent: refused, naming it
    assert to_hf.exit_code != 0 and "projector = 'pixel_shuffle'" in str(to_hf.exception)
    four = runner.invoke(app, ["quantize", str(tmp_path / "q8"), "--out", str(tmp_path / "q4"),
                               "--format", "q4_1", "--head", "none"])
    assert four.exit_code == 0, four.output
    lm = imagefm.load(tmp_path / "q4").lm
    assert lm.blocks[0].mlp.up_proj.bits == 4 and lm.quantized_head is None


def test_generate_none_gives_float_layers_of_a_quantised_checkpoint(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    from imagefm.cli.lm import load_language_model

    model = quantize_model(imagefm.load(tiny_llama_dir), "q8_0")
    model.save_pretrained(tmp_path / "q")
    assert is_quantized(load_language_model(tmp_path / "q", "auto"))
    dense = load_language_model(tmp_path / "q", "none")
    assert not is_quantized(dense)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(dense.generate(ids, max_new_tokens=4, eos_token_id=[]),
                       model.generate(ids, max_new_tokens=4, eos_token_id=[]))


def test_a_quantised_checkpoint_loads_as_float_where_no_kernel_can_be_built(
        tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagefm.models import quantized

    model = quantize_model(imagefm.load(tiny_llama_dir), "q4_1")
    model.save_pretrained(tmp_path / "q")
    monkeypatch.setattr(quantized, "kernel_status", lambda: (False, "no C compiler 'cc'"))
    with pytest.warns(UserWarning, match="no C compiler"):
        dense = imagefm.load(tmp_path / "q")
    assert not is_quantized(dense)  # the same weights as float layers, not slow block layers
    assert torch.equal(dense.blocks[0].mlp.gate_proj.weight,
                       model.blocks[0].mlp.gate_proj.dequantize())
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(dense.generate(ids, max_new_tokens=4, eos_token_id=[]),
                       model.generate(ids, max_new_tokens=4, eos_token_id=[]))
