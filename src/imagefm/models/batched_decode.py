"""Continuous batching for a :class:`~imagefm.models.decoder.DecoderLM`: sequences of different
lengths decode together, one token each per step, joining and leaving at any step.

    decoder = BatchDecoder(lm)
    row = decoder.add(prompt_ids, max_new_tokens=64)   # its prompt runs alone (prefill) now
    for row, token in decoder.step():                  # one token for every row
        ...                                            # finished rows leave by themselves;
    decoder.remove(row)                                # a row may be stopped at any time

Each sequence keeps its own KV cache, sized and laid out exactly as when it is generated alone
(:func:`~imagefm.models.generation.generate_tokens`: ``prompt + max_new_tokens`` positions), and
its own :class:`~imagefm.models.generation.TokenPicker` (options, sampling generator, repetition
penalty, stop strings). A step runs the position-independent work (embedding, norms, every
linear layer, the output head) once for all rows, so the weights are read once per step instead
of once per sequence, the thing that bounds decoding speed on a CPU. Attention runs per row over
that row's own cache (:class:`RowCaches`), with the same call as alone: no padding, no mask, no
copying when a sequence joins or leaves.

Why not one padded cache with a mask per row, or a paged one: with per-row caches every row's
numbers are those of the sequence decoded alone, so batching changes no token where the linear
layers compute each row independently (the quantised kernel of :mod:`imagefm.models.quantized`:
bit for bit; BLAS float32 matmuls may round a batch's rows differently in the last bit). A padded
cache would need shifting or compaction as sequences come and go, and a masked SDPA over padding
computes differently from the unmasked call; a paged cache would need gathering into contiguous
keys every step for SDPA (or a paged-attention kernel). On the CPU attention is a small part of a
step at these lengths: the price of the per-row loop is a few small calls per row and layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from imagefm.models.decoder import DecoderLM, KVCache
from imagefm.models.fused_decode import fused_decoder
from imagefm.models.generation import TokenPicker, _check_options


@dataclass
class RowCaches:
    """The KV caches of the rows of one decoding step; the attention layers see ``rows`` and
    write and read each row's own cache (:meth:`DecoderAttention.forward`)."""

    rows: Sequence[KVCache]


@torch.inference_mode()
def decode_step(lm: DecoderLM, tokens: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
    """One decoding step for ``len(caches)`` sequences: ``tokens`` [B] are each sequence's last
    token, written at its own position; returns the logits [B, vocab] of the next token.
    A quantised model runs the step in C (models/fused_decode.py), as a sequence alone does."""
    fused = fused_decoder(lm)
    if fused is not None:
        return fused.step(tokens, caches)
    x = lm.embed_tokens(tokens[:, None])
    lengths = [cache.length for cache in caches]
    positions = torch.tensor(lengths, device=x.device)[:, None]
    bound: int | None = max(lengths) + 1
    if any(cache.rope_deltas is not None for cache in caches):  # M-RoPE prompts with images
        deltas = [cache.rope_deltas.reshape(1).to(x.device) if cache.rope_deltas is not None
                  else positions.new_zeros(1) for cache in caches]
        positions, bound = positions + torch.cat(deltas)[:, None], None
    cos, sin = lm.rotary(positions, x.dtype, bound)
    rows = RowCaches(caches)
    for index, block in enumerate(lm.blocks):
        x = block(x, cos, sin, None, False, rows, index)
    for cache in caches:
        cache.length += 1
    return lm.output_logits(lm.norm(x))[:, -1]


@dataclass(eq=False)
class DecodeRow:
    """One sequence of a :class:`BatchDecoder`: its cache, its token picker, the token it
    produced last and how many it has produced; ``finished`` once an end token, a stop string
    or ``max_new_tokens`` ends it. ``tag`` is the caller's."""

    cache: KVCache
    picker: TokenPicker
    max_new_tokens: int
    tag: Any = None
    logits: torch.Tensor | None = field(default=None, repr=False)  # [1, vocab], to pick from
    token: int | None = None
    produced: int = 0
    finished: bool = False


class BatchDecoder:
    """Sequences decoded together (see the module docstring). Not thread-safe: one thread
    drives it."""

    def __init__(self, lm: DecoderLM) -> None:
        self.lm = lm
        self.rows: list[DecodeRow] = []
        self.steps = 0  # batched decoding steps run
        self.decoded = 0  # rows summed over those steps

    @torch.inference_mode()
    def add(self, input_ids: torch.Tensor, *, max_new_tokens: int,
            inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
            rope_deltas: torch.Tensor | None = None, tag: Any = None, **options: Any
            ) -> DecodeRow:
        """Run one prompt ``input_ids`` [1, L] (and a VLM's ``inputs_embeds``, ``position_ids``,
        ``rope_deltas``, as :func:`~imagefm.models.generation.generate_tokens`) alone and add
        it; its first token comes with the next :meth:`step`. ``options``: those of
        :class:`~imagefm.models.generation.TokenPicker` (do_sample, temperature, top_k, top_p,
        repetition_penalty, eos_token_id, stop_strings, tokenizer, generator...)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"add one sequence [1, L], got {tuple(input_ids.shape)}")
        _check_options(max_new_tokens, options.get("temperature", 1.0), options.get("top_k", 0),
                       options.get("top_p", 1.0), options.get("repetition_penalty", 1.0))
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        picker = TokenPicker(self.lm, input_ids, **options)
        # The prefill generate_tokens runs for one unpadded prompt, with the same cache.
        cache = self.lm.new_cache(1, input_ids.shape[1] + max_new_tokens)
        out = self.lm(input_ids=None if inputs_embeds is not None else input_ids,
                      inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache,
                      logits_to_keep=1)
        cache.rope_deltas = rope_deltas
        row = DecodeRow(cache, picker, max_new_tokens, tag, logits=out.logits[:, -1])
        self.rows.append(row)
        return row

    def remove(self, row: DecodeRow) -> None:
        """Stop decoding ``row`` (its cache is dropped); no-op when it already left."""
        row.finished = True
        if row in self.rows:
            self.rows.remove(row)

    @torch.inference_mode()
    def step(self) -> list[tuple[DecodeRow, int]]:
        """The next token of every row: one batched forward pass for the rows that continue
        (rows added since the last step have theirs from the prefill), then each row's picker.
        Rows that finish leave the batch."""
        moving = [row for row in self.rows if row.logits is None]
        if moving:
            tokens = torch.tensor([row.token for row in moving],
                                  device=self.lm.embed_tokens.weight.device)
            logits = decode_step(self.lm, tokens, [row.cache for row in moving])
            for i, row in enumerate(moving):
                row.logits = logits[i:i + 1]
            self.steps += 1
            self.decoded += len(moving)
        picked = []
        for row in self.rows:
            token = row.picker.pick(row.logits)
            row.logits = None
            row.produced += 1
            row.token = int(token[0])
            row.finished = row.picker.update(token) or row.produced >= row.max_new_tokens
            picked.append((row, row.token))
        self.rows = [row for row in self.rows if not row.finished]
        return picked
