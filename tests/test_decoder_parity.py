"""Parity with Hugging Face LlamaForCausalLM / Qwen2ForCausalLM: tiny random reference models
built here, saved with save_pretrained, loaded with imagefm.load; logits, padded batches, greedy
generation, HF's logit processors, sharded weights, strict key checks and export back to HF.

Every reference parameter is perturbed before saving (HF initialises RMSNorm weights to exactly 1
and biases to 0, which would hide a swapped norm or a dropped bias).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import imagefm  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.keymap import KeyMapError  # noqa: E402
from imagefm.convert.llama import export_hf_lm, load_hf_lm  # noqa: E402
from imagefm.loading import detect_format  # noqa: E402
from imagefm.models.decoder import DecoderLM  # noqa: E402
from imagefm.models.generation import (  # noqa: E402
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)

TOL = 1e-4
VOCAB = 96


def _perturb(module: torch.nn.Module, scale: float = 0.2) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _shape(**kw) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, **kw)


CASES = {
    "llama-gqa-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_shape(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5))),
    "llama-untied-biases": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_shape(num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True,
                 mlp_bias=True, head_dim=16))),
    "llama3-rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_shape(num_key_value_heads=2, rope_theta=500.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))),
    "qwen2-biases": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_shape(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6))),
    "qwen2-tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_shape(num_key_value_heads=4, tie_word_embeddings=True))),
}


def _reference(name: str, tmp: Path, **save_kw) -> torch.nn.Module:
    reference = CASES[name]().eval()
    reference.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ours
    _perturb(reference)
    reference.save_pretrained(tmp, **save_kw)
    return reference


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    reference = _reference(name, tmp_path)
    assert detect_format(tmp_path) == "hf_lm"
    model = imagefm.load(tmp_path)
    assert isinstance(model, DecoderLM)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert (ours - theirs).abs().max() <= TOL
    # the biases and norms really arrived (perturbed away from HF's 0 / 1 initialisation)
    if "biases" in name:
        assert model.blocks[0].attn.k_proj.bias.abs().sum() > 0
    assert not torch.allclose(model.blocks[1].mlp_norm.weight, torch.ones(32))


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-biases"])
def test_padded_batch_logits_match_transformers(name: str, tmp_path: Path) -> None:
    reference = _reference(name, tmp_path)
    model = load_hf_lm(tmp_path)
    ids = torch.randint(0, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    # HF takes positions from the caller (its generate counts real tokens, as we do by default)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = reference(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= TOL


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-biases", "llama3-rope"])
def test_greedy_generation_matches_transformers(name: str, tmp_path: Path) -> None:
    reference = _reference(name, tmp_path)
    model = load_hf_lm(tmp_path)
    rows = [torch.randint(3, VOCAB, (n,)) for n in (6, 9)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    kw = dict(max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    ours = model.generate(ids, attention_mask=mask, **kw)
    with torch.no_grad():
        theirs = reference.generate(ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=12, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # and with a repetition penalty, which HF applies to prompt + generated tokens
    ours = model.generate(rows[1][None], repetition_penalty=1.5, **kw)
    with torch.no_grad():
        theirs = reference.generate(rows[1][None], do_sample=False, repetition_penalty=1.5,
                                    max_new_tokens=12, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_processors_match_transformers() -> None:
    from transformers.generation import logits_process as lp

    scores = torch.randn(3, VOCAB) * 3
    ids = torch.randint(0, VOCAB, (3, 7))
    seen = torch.zeros(3, VOCAB, dtype=torch.bool).scatter(1, ids, True)
    expected = lp.RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    assert torch.equal(apply_repetition_penalty(scores, seen, 1.7), expected)
    for k in (1, 5, 40):
        assert torch.equal(apply_top_k(scores, k), lp.TopKLogitsWarper(k)(ids, scores.clone()))
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(apply_top_p(scores, p), lp.TopPLogitsWarper(p)(ids, scores.clone()))


def test_sharded_checkpoint_and_strict_keys(tmp_path: Path) -> None:
    reference = _reference("qwen2-biases", tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = imagefm.load(tmp_path / "sharded")
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() <= TOL

    # a dropped q/k/v bias must fail the load, naming the key
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    state = {k: v for k, v in reference.state_dict().items()
             if k != "model.layers.1.self_attn.k_proj.bias"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    with pytest.raises(KeyMapError, match=r"blocks\.1\.attn\.k_proj\.bias"):
        load_hf_lm(broken)
    with pytest.warns(UserWarning, match="partial"):
        load_hf_lm(broken, strict=False)
    assert set(load_file(str(broken / "model.safetensors"))) == set(state)


def test_unsupported_configs_are_refused(tmp_path: Path) -> None:
    config = json.loads(json.dumps(CASES["qwen2-biases"]().config.to_dict()))
    config["use_sliding_window"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="sliding-window"):
        load_hf_lm(tmp_path)


@pytest.mark.parametrize("name", ["llama-untied-biases", "qwen2-tied", "llama3-rope"])
def test_export_to_transformers(name: str, tmp_path: Path) -> None:
    reference = _reference(name, tmp_path / "src")
    model = load_hf_lm(tmp_path / "src")
    export_hf_lm(model, tmp_path / "out")
    cls = type(reference)
    reloaded = cls.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert (reloaded(ids).logits - reference(ids).logits).abs().max() <= TOL
    again = load_hf_lm(tmp_path / "out")
    assert again.config == model.config
