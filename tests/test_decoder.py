"""DecoderLM and generation on tiny random models: KV cache, padding, embeddings input, sampling
options, stop strings, streaming, loss, fused-projection caching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders
from tokenizers.models import WordLevel

from imagefm.config import ConfigError
from imagefm.models.decoder import IGNORE_INDEX, DecoderLM
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.generation import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    generate_tokens,
    stream_text,
)
from imagefm.tokenizer import Tokenizer, TokenizerSettings, _TokenizersBackend

VOCAB = 64


def _model(**overrides) -> DecoderLM:
    config = DecoderConfig(vocab_size=VOCAB, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64,
                           context_length=128, eos_token_ids=(), **overrides)
    model = DecoderLM(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy paths vary
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def _char_tokenizer() -> Tokenizer:
    """One character per id (ids = letters of the alphabet below), for readable text tests."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?-"[:VOCAB]
    hf = HFTokenizer(WordLevel({c: i for i, c in enumerate(alphabet)}, unk_token="a"))
    hf.decoder = decoders.Fuse()
    settings = TokenizerSettings(context_length=128, padding="longest", pad_id=0)
    return Tokenizer(_TokenizersBackend(hf), settings)


@pytest.mark.parametrize("tied", [True, False])
def test_cached_forward_equals_full_forward(tied: bool) -> None:
    model = _model(tie_embeddings=tied)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 16)
        first = model(ids[:, :7], cache=cache).logits
        second = model(ids[:, 7:10], cache=cache).logits
        third = model(ids[:, 10:], cache=cache).logits
    assert cache.length == 12
    chunked = torch.cat([first, second, third], dim=1)
    assert (chunked - full).abs().max() < 1e-5


def test_cache_overflow_is_refused() -> None:
    model = _model()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_left_padding_gives_the_unpadded_logits() -> None:
    model = _model()
    rows = [torch.randint(0, VOCAB, (n,)) for n in (9, 5, 7)]
    ids, mask = _left_pad(rows, pad=3)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            assert (padded[i, -len(row):] - alone).abs().max() < 1e-5


def test_kv_cache_generation_equals_no_cache_generation() -> None:
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 6))
    cached = generate(model, ids, max_new_tokens=12)
    uncached = generate(model, ids, max_new_tokens=12, use_cache=False)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :6], ids)


def test_batched_left_padded_generation_equals_one_by_one() -> None:
    model = _model()
    rows = [torch.randint(0, VOCAB, (n,)) for n in (3, 8, 5)]
    ids, mask = _left_pad(rows)
    batched = generate(model, ids, mask, max_new_tokens=10, repetition_penalty=1.3)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], max_new_tokens=10, repetition_penalty=1.3)
        assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(row):])
    # the no-cache reference agrees on padded batches too
    assert torch.equal(batched, generate(model, ids, mask, max_new_tokens=10,
                                         repetition_penalty=1.3, use_cache=False))


def test_eos_stops_rows_and_pads_them() -> None:
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 5))
    free = generate(model, ids, max_new_tokens=8)
    eos = int(free[0, 7])  # the third token row 0 generates
    stopped = generate(model, ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=VOCAB - 1)
    first_eos = (free[0, 5:] == eos).nonzero()[0].item()
    assert torch.equal(stopped[0, 5:5 + first_eos + 1], free[0, 5:5 + first_eos + 1])
    assert (stopped[0, 5 + first_eos + 1:] == VOCAB - 1).all()
    row1_hits = (free[1, 5:] == eos).nonzero()
    if len(row1_hits) == 0:  # row 1 never produced it: it ran on unchanged
        assert torch.equal(stopped[1, 5:], free[1, 5:stopped.shape[1]])


def test_generation_from_inputs_embeds_equals_from_ids() -> None:
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 7))
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        assert torch.allclose(model(inputs_embeds=embeds).logits, model(ids).logits)
    from_ids = generate(model, ids, max_new_tokens=6)
    assert torch.equal(generate(model, ids, inputs_embeds=embeds, max_new_tokens=6), from_ids)
    assert torch.equal(generate(model, ids, inputs_embeds=embeds, max_new_tokens=6,
                                use_cache=False), from_ids)


def test_sampling_is_seeded_and_top_k_one_is_greedy() -> None:
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 4))

    def sample(seed: int, **kw) -> torch.Tensor:
        return generate(model, ids, max_new_tokens=10, do_sample=True,
                        generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(1, temperature=1.5), sample(1, temperature=1.5))
    assert not torch.equal(sample(1, temperature=5.0), sample(2, temperature=5.0))
    greedy = generate(model, ids, max_new_tokens=10)
    assert torch.equal(sample(3, top_k=1, temperature=2.0), greedy)
    # a tiny nucleus keeps only the most likely token: greedy again
    assert torch.equal(sample(4, top_p=1e-6), greedy)


def test_processors() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    seen = torch.tensor([[True, True, False, False, False]])
    assert apply_repetition_penalty(scores, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0]]
    top2 = apply_top_k(scores, 2)
    assert torch.isinf(top2).tolist() == [[False, True, True, False, True]]
    probs = scores.softmax(-1)[0]  # 3.0 holds ~0.66, 2.0 ~0.24: 0.8 needs both
    kept = ~torch.isinf(apply_top_p(scores, 0.8))[0]
    assert kept.tolist() == [True, False, False, True, False]
    assert probs[kept].sum() >= 0.8
    with pytest.raises(ValueError, match="temperature"):
        next(generate_tokens(_model(), torch.zeros(1, 2, dtype=torch.long), temperature=0.0))


def test_stop_strings_and_streaming() -> None:
    model, tokenizer = _model(), _char_tokenizer()
    ids = torch.tensor([[tokenizer.token_to_id(c) for c in "hello"]])
    full = generate(model, ids, max_new_tokens=20)
    text = tokenizer.decode(full[0, 5:])
    assert len(text) == 20
    # a two-character stop string that first appears a few characters in
    stop = next(text[k:k + 2] for k in range(3, 18) if text.index(text[k:k + 2]) >= 3)
    cut = text.index(stop)
    stopped = generate(model, ids, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer)
    # generation ends with the token that completes the first occurrence of the stop string
    assert tokenizer.decode(stopped[0, 5:]) == text[:cut + len(stop)]
    pieces = list(stream_text(model, tokenizer, ids, max_new_tokens=20, stop_strings=[stop]))
    assert "".join(pieces) == text[:cut]
    assert len(pieces) > 1
    assert "".join(stream_text(model, tokenizer, ids, max_new_tokens=20)) == text
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, max_new_tokens=3, stop_strings=["x"])


def test_streamer_callback_sees_every_step() -> None:
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 3))
    steps: list[torch.Tensor] = []
    out = generate(model, ids, max_new_tokens=5, streamer=steps.append)
    assert torch.equal(torch.stack(steps, dim=1), out[:, 3:])


def test_loss_matches_cross_entropy_and_trains() -> None:
    model = _model().train()
    ids = torch.randint(0, VOCAB, (2, 10))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.gradient_checkpointing = True
    assert torch.allclose(model(ids, labels=labels).loss, out.loss)


def test_fused_projections_follow_weight_changes_and_wrappers() -> None:
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        before = model(ids).logits  # builds the fused q/k/v and gate/up weights
        model.blocks[0].attn.k_proj.weight.mul_(1.5)
        up = model.blocks[1].mlp.up_proj.weight
        up.copy_(torch.randn_like(up))
        after = model(ids).logits
    with torch.enable_grad():  # the unfused path, computed from the modules themselves
        reference = model(ids).logits.detach()
    assert not torch.allclose(before, after)
    assert (after - reference).abs().max() < 1e-5

    class Doubled(torch.nn.Linear):  # stands in for a LoRA wrapper: not a plain nn.Linear
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    attn = model.blocks[0].attn
    wrapped = Doubled(attn.v_proj.in_features, attn.v_proj.out_features, bias=False)
    wrapped.load_state_dict(attn.v_proj.state_dict())
    attn.v_proj = wrapped
    with torch.no_grad():
        fused = model(ids).logits
    with torch.enable_grad():
        unfused = model(ids).logits.detach()
    assert (fused - unfused).abs().max() < 1e-5
    assert not torch.allclose(fused, after)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="multiple of"):
        DecoderConfig(heads=6, kv_heads=4)
    with pytest.raises(ConfigError, match="unknown key"):
        DecoderConfig.from_dict({"width": 64, "hidden_size": 64})
    config = DecoderConfig(vocab_size=10, width=24, heads=2, kv_heads=1, head_dim=16,
                           eos_token_ids=[3, 4])
    assert config.eos_token_ids == (3, 4)
    assert DecoderConfig.from_dict(config.to_dict()) == config
    model = DecoderLM(config)
    assert model.blocks[0].attn.q_proj.weight.shape == (32, 24)


def test_position_beyond_context_and_rope_scaling() -> None:
    # rotary tables grow on demand; linear scaling by 2 equals halving the positions
    plain = _model()
    scaled = DecoderLM(plain.config.replace(rope_scaling="linear", rope_factor=2.0)).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, VOCAB, (1, 4))
    positions = torch.tensor([[200, 202, 204, 206]])
    with torch.no_grad():
        a = scaled(ids, position_ids=positions).logits
        b = plain(ids, position_ids=positions // 2).logits
    assert (a - b).abs().max() < 1e-4
