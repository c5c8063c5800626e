"""Qwen3 decoders: parity with Hugging Face ``Qwen3ForCausalLM`` on tiny random models with odd
shapes (head_dim 12 != hidden 40 / 4 heads, grouped-query attention), loaded from an HF directory
and from a GGUF file written here as llama.cpp's converter writes one (architecture ``qwen3``:
``blk.{i}.attn_q_norm`` / ``attn_k_norm``, no q/k permutation), and exported back to HF.

Every reference parameter is perturbed before saving: HF initialises the q/k norms to exactly 1,
which would hide a norm that was dropped or applied to the wrong side of the rotation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import imagefm  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.keymap import KeyMapError  # noqa: E402
from imagefm.convert.llama import export_hf_lm, load_hf_lm  # noqa: E402
from imagefm.models.decoder import DecoderLM  # noqa: E402
from imagefm.models.decoder_config import DecoderConfig, decoder_preset  # noqa: E402

VOCAB, WIDTH, HEADS, KV_HEADS, HEAD_DIM = 96, 40, 4, 2, 12
TOL = 1e-5


def _reference(tied: bool = True, bias: bool = False, **kw) -> torch.nn.Module:
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        attention_bias=bias, **{"rope_theta": 1e6, **kw})
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ours
    return model


def _saved(tmp: Path, **kw) -> tuple[torch.nn.Module, Path]:
    reference = _reference(**kw)
    reference.save_pretrained(tmp)
    return reference, tmp


def _left_padded(lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:], mask[i, width - n:] = torch.randint(3, VOCAB, (n,)), 1
    return ids, mask


# --- Hugging Face directories ---------------------------------------------------------------------

@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_logits_match_transformers(tied: bool, bias: bool, tmp_path: Path) -> None:
    reference, path = _saved(tmp_path, tied=tied, bias=bias)
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3"
    model = imagefm.load(path)  # the loading layer routes model_type "qwen3" to load_hf_lm
    assert isinstance(model, DecoderLM)
    c = model.config
    assert (c.model_type, c.qk_norm, c.attn_head_dim, c.kv_heads) == ("qwen3", True, HEAD_DIM,
                                                                       KV_HEADS)
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_embeddings) == (bias, bias, False, tied)
    attn = model.blocks[1].attn
    assert torch.equal(attn.k_norm.weight, reference.model.layers[1].self_attn.k_norm.weight)
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert (ours - theirs).abs().max() <= TOL


def test_padded_batch_logits_match_transformers(tmp_path: Path) -> None:
    reference, path = _saved(tmp_path)
    model = load_hf_lm(path)
    ids, mask = _left_padded((10, 4, 7))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # HF's generate counts real tokens, as we do
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = reference(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= TOL


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_greedy_generation_matches_transformers(tied: bool, bias: bool, tmp_path: Path) -> None:
    """Token for token, both sides decoding with their KV caches, across prompt lengths and a
    left-padded batch."""
    reference, path = _saved(tmp_path, tied=tied, bias=bias)
    model = load_hf_lm(path)
    kw = dict(max_new_tokens=14, pad_token_id=0)
    for lengths in ((1,), (5,), (11,), (9, 3, 6)):
        ids, mask = _left_padded(lengths)
        ours = model.generate(ids, attention_mask=mask, eos_token_id=[], **kw)
        with torch.no_grad():
            theirs = reference.generate(ids, attention_mask=mask, do_sample=False,
                                        use_cache=True, **kw)
        assert torch.equal(ours, theirs), lengths


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_export_to_transformers(tied: bool, bias: bool, tmp_path: Path) -> None:
    reference, path = _saved(tmp_path / "src", tied=tied, bias=bias)
    model = load_hf_lm(path)
    export_hf_lm(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "qwen3" and written["architectures"] == ["Qwen3ForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is transformers.Qwen3ForCausalLM
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert (reloaded(ids).logits - reference(ids).logits).abs().max() <= TOL
    assert load_hf_lm(tmp_path / "out").config == model.config


def test_model_built_here_exports_to_transformers(tmp_path: Path) -> None:
    """A Qwen3 decoder made from our config (as training makes one) is a Qwen3ForCausalLM."""
    config = DecoderConfig(model_type="qwen3", vocab_size=VOCAB, width=WIDTH, layers=2,
                           heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, mlp_dim=56,
                           norm_eps=1e-6, context_length=128, rope_theta=1e6, qk_norm=True,
                           tie_embeddings=True)
    assert DecoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = DecoderLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    export_hf_lm(model, tmp_path)
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        assert (model(ids).logits - reloaded(ids).logits).abs().max() <= TOL
    # and the export refuses what Qwen3ForCausalLM cannot compute
    for wrong in (dict(qk_norm=False), dict(qkv_bias=True), dict(mlp_bias=True)):
        with pytest.raises(CheckpointError):
            export_hf_lm(DecoderLM(config.replace(**wrong)), tmp_path / "refused")
    with pytest.raises(CheckpointError, match="q/k norm"):
        export_hf_lm(DecoderLM(config.replace(model_type="llama")), tmp_path / "refused")


def test_bf16_is_close_to_fp32(tmp_path: Path) -> None:
    reference, path = _saved(tmp_path)
    fp32, bf16 = load_hf_lm(path), load_hf_lm(path, dtype=torch.bfloat16)
    assert bf16.blocks[0].attn.q_norm.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        ours = bf16(ids).logits.float()
        exact = fp32(ids).logits
        theirs = reference.to(torch.bfloat16)(ids).logits.float()
    assert torch.isfinite(ours).all()
    scale = exact.abs().max()
    # bf16 keeps ~3 significant digits; both implementations round about as much
    assert (ours - exact).abs().max() <= 0.05 * scale
    assert (ours - theirs).abs().max() <= 0.05 * scale
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    out = bf16.generate(ids[:1, :5], max_new_tokens=6, eos_token_id=[])
    assert out.shape == (1, 11)


def test_strict_keys_and_refused_configs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    reference, path = _saved(tmp_path / "good")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()
             if k not in ("lm_head.weight", "model.layers.1.self_attn.q_norm.weight")}
    config = json.loads((path / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyMapError, match=r"blocks\.1\.attn\.q_norm\.weight"):
        load_hf_lm(broken)
    # the q/k norms of a Qwen3 checkpoint are not silently dropped by a Qwen2 config
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(KeyMapError, match=r"q_norm"):
        load_hf_lm(broken)
    sliding = tmp_path / "sliding"
    sliding.mkdir()
    (sliding / "config.json").write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(CheckpointError, match="sliding-window"):
        load_hf_lm(sliding)


def test_preset() -> None:
    config = decoder_preset("qwen3-0.6b")
    assert config.qk_norm and config.attn_head_dim == 128 and config.width == 1024


# --- GGUF ----------------------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")

_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "model.norm.weight": "output_norm.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{param}"


def _write_qwen3_gguf(path: Path, reference: torch.nn.Module, skip: str = "",
                      matrix_type: str = "F32") -> None:
    """The reference as llama.cpp's convert_hf_to_gguf.py writes a Qwen3 model (no q/k row
    permutation: Qwen models keep the rotate-half layout)."""
    c = reference.config
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    state = reference.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        name = _gguf_name(hf_name)
        if name == skip:
            continue
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and matrix_type == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_gguf_matches_transformers(tied: bool, bias: bool, tmp_path: Path) -> None:
    reference = _reference(tied=tied, bias=bias)
    path = tmp_path / "qwen3.gguf"
    _write_qwen3_gguf(path, reference)
    model = imagefm.load(path)  # found by its magic bytes, architecture qwen3
    assert isinstance(model, DecoderLM)
    c = model.config
    assert (c.model_type, c.qk_norm, c.attn_head_dim, c.tie_embeddings, c.qkv_bias) == (
        "qwen3", True, HEAD_DIM, tied, bias)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() <= TOL
    prompt = ids[:, :6]
    ours = model.generate(prompt, max_new_tokens=10, eos_token_id=[])
    with torch.no_grad():
        theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                    do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_gguf_f16_and_missing_norm(tmp_path: Path) -> None:
    from imagefm.convert.gguf import load_gguf

    reference = _reference()
    half = tmp_path / "f16.gguf"
    _write_qwen3_gguf(half, reference, matrix_type="F16")
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        diff = (load_gguf(half)(ids).logits - reference(ids).logits).abs().max()
    assert 0 < diff < 0.05  # the matrices were rounded to float16; the norms were not
    missing = tmp_path / "missing.gguf"
    _write_qwen3_gguf(missing, reference, skip="blk.0.attn_k_norm.weight")
    with pytest.raises(KeyMapError, match=r"blocks\.0\.attn\.k_norm\.weight"):
        load_gguf(missing)


def test_transformers_gguf_reader_agrees(tmp_path: Path) -> None:
    """transformers' own GGUF reader, on a file whose head_dim is its Qwen3 default (it does
    not read ``qwen3.attention.key_length``), gives the logits we give."""
    from imagefm.convert.gguf import load_gguf

    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=56, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1e6)
    reference = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path / "qwen3.gguf"
    _write_qwen3_gguf(path, reference)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name).eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        ours = load_gguf(path)(ids).logits
        assert (ours - theirs_model(ids).logits).abs().max() <= TOL
        assert (ours - reference(ids).logits).abs().max() <= TOL
