"""Generation for :class:`~imagefm.models.decoder.DecoderLM`: greedy and sampled decoding with a
KV cache, batched prompts with left padding, stop tokens and stop strings, streaming.

    generate(model, ids, ...)        -> [B, L + new] ids, prompt included (as HF generate)
    generate_tokens(model, ids, ...) -> iterator over each step's new tokens [B]
    stream_text(model, tok, ids)     -> iterator over text pieces of one sequence (TextStream)

The loop's two halves are objects of their own, ``TokenPicker`` (logits -> next tokens, when a
row is done) and ``TextPieces`` (tokens -> text safe to show), so that the continuous-batching
server decodes each of its sequences with exactly the same steps.

Logit processing follows Hugging Face's order and definitions (tests compare against its
processors): repetition penalty, then (sampling only) temperature, top-k, top-p. The repetition
penalty sees the prompt and the generated tokens, but never padding.

Rows that finish (EOS or a stop string) keep receiving ``pad_token_id`` until every row is done,
so a batch returns one rectangular tensor.

A quantised model's decoding steps (after the prompt) run as one C call each
(:mod:`imagefm.models.fused_decode`, llama.cpp's int8-rounded products); other models, and
prompts padded other than on the left, go through the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from imagefm.models.fused_decode import fused_decoder

# --- logit processors ----------------------------------------------------------------------------


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL's penalty: for tokens already present (``seen`` Bool[B, V]) divide positive scores
    by ``penalty`` and multiply negative ones."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores of each row (ties with the k-th kept too); -inf the rest."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches
    ``p`` (always at least one); -inf the rest."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def process_logits(scores: torch.Tensor, seen: torch.Tensor | None, *, do_sample: bool,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """All processors in Hugging Face's order; ``scores`` [B, V] float."""
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, repetition_penalty)
    if do_sample:
        if temperature != 1.0:
            scores = scores / temperature
        scores = apply_top_p(apply_top_k(scores, top_k), top_p)
    return scores


def _check_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   repetition_penalty: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got "
                         f"{temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _eos_ids(model: Any, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return list(model.config.eos_token_ids)
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


class _StopStrings:
    """Finds a stop string in the text a row has generated; decodes only a tail of the row."""

    def __init__(self, stop_strings: Sequence[str], tokenizer: Any, batch: int) -> None:
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (pass tokenizer=, or load the model "
                             "with one)")
        self.stops = [s for s in stop_strings if s]
        self.tokenizer = tokenizer
        self.rows: list[list[int]] = [[] for _ in range(batch)]
        # A token is at least one character or one byte of one, so a stop string of n
        # characters lies within the last 4n + 4 tokens (UTF-8: at most 4 bytes a character).
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.stops)

    def update(self, tokens: list[int], finished: list[bool]) -> list[bool]:
        """Append this step's tokens; say which unfinished rows now contain a stop string."""
        hits = []
        for row, (token, done) in enumerate(zip(tokens, finished, strict=True)):
            if done:
                hits.append(False)
                continue
            self.rows[row].append(token)
            tail = self.tokenizer.decode(self.rows[row][-self.window:])
            hits.append(any(s in tail for s in self.stops))
        return hits


class TokenPicker:
    """Each step's next tokens [B] from the model's last logits, and which rows are done: logit
    processing, sampling (with ``generator``) or argmax, ``pad_token_id`` for finished rows, end
    tokens and stop strings. Options as :func:`generate_tokens`, which drives one per call; the
    continuous-batching decoder (:mod:`imagefm.models.batched_decode`) drives one per sequence,
    so a sequence decoded among others picks what it would alone."""

    def __init__(self, model: Any, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, stop_strings: Sequence[str] = (),
                 tokenizer: Any = None, generator: torch.Generator | None = None) -> None:
        batch = input_ids.shape[0]
        device = input_ids.device
        self.eos = torch.tensor(_eos_ids(model, eos_token_id), dtype=torch.long, device=device)
        if pad_token_id is None:
            pad_token_id = model.config.pad_token_id
        if pad_token_id is None:
            pad_token_id = int(self.eos[0]) if len(self.eos) else 0
        self.pad_token_id = pad_token_id
        self.stops = _StopStrings(stop_strings, tokenizer or getattr(model, "tokenizer", None),
                                  batch)
        self.processing = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k,
                           "top_p": top_p, "repetition_penalty": repetition_penalty}
        self.generator = generator
        self.seen = None
        if repetition_penalty != 1.0:
            vocab = model.config.vocab_size
            seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
            padded = attention_mask is not None and not bool(attention_mask.all())
            prompt = input_ids.masked_fill(attention_mask == 0, vocab) if padded else input_ids
            seen.scatter_(1, prompt, True)  # padding goes to the extra column, then is dropped
            self.seen = seen[:, :vocab]
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next tokens [B] for the last position's ``logits`` [B, vocab]."""
        scores = process_logits(logits.float(), self.seen, **self.processing)
        if self.processing["do_sample"]:
            token = torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)
        else:
            token = scores.argmax(-1)
        return token.masked_fill(self.finished, self.pad_token_id)

    def update(self, token: torch.Tensor) -> bool:
        """Take in the tokens picked (once their reader has them); True when every row is done."""
        self.finished |= torch.isin(token, self.eos)
        if self.stops:
            hits = self.stops.update(token.tolist(), self.finished.tolist())
            self.finished |= torch.tensor(hits, dtype=torch.bool, device=token.device)
        if bool(self.finished.all()):
            return True
        if self.seen is not None:
            self.seen[torch.arange(len(token), device=token.device), token] = True
        return False


# --- the loop ------------------------------------------------------------------------------------

@torch.inference_mode()
def generate_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    rope_deltas: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens [B] (``pad_token_id`` for rows already finished).

    ``input_ids`` [B, L] are the prompts, left-padded when their lengths differ (``attention_mask``
    0 on the padding). ``inputs_embeds`` [B, L, width], when given, replace the prompt's token
    embeddings (a VLM's spliced image features); ``input_ids`` still feed the repetition penalty.
    ``position_ids`` are the prompt's positions when the model does not derive them (M-RoPE:
    [3, B, L]); ``rope_deltas`` [B] then shift the positions of every generated token (they are
    kept on the KV cache, see :class:`~imagefm.models.decoder.KVCache`).
    ``eos_token_id`` defaults to the model config's EOS ids; ``generator`` seeds sampling.
    ``use_cache=False`` recomputes the whole sequence every step (a reference for tests).
    """
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if not use_cache and (position_ids is not None or rope_deltas is not None):
        raise ValueError("use_cache=False recomputes positions itself: it takes no position_ids "
                         "or rope_deltas")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    device = input_ids.device
    picker = TokenPicker(model, input_ids, attention_mask, do_sample=do_sample,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, stop_strings=stop_strings,
                         tokenizer=tokenizer, generator=generator)

    # One mask for prompt + everything that can be generated; views of it are passed each step.
    full_mask = torch.ones(batch, length + max_new_tokens, dtype=torch.long, device=device)
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded:
        full_mask[:, :length] = attention_mask

    # Positions come from the mask inside the model (left padding shifts them), so a padded
    # row computes what it would alone.
    cache = model.new_cache(batch, length + max_new_tokens) if use_cache else None
    out = model(input_ids=None if inputs_embeds is not None else input_ids,
                inputs_embeds=inputs_embeds, attention_mask=full_mask[:, :length] if padded
                else None, position_ids=position_ids, cache=cache, logits_to_keep=1)
    if cache is not None:
        cache.rope_deltas = rope_deltas
    all_ids = input_ids
    embeds = inputs_embeds
    # A quantised model: each step is one C call (models/fused_decode.py); left padding only.
    fused = fused_decoder(model) if use_cache else None
    prompt_mask = full_mask[:, :length]
    if fused is not None and padded and not bool((prompt_mask[:, 1:] >= prompt_mask[:, :-1]).all()):
        fused = None
    padding = (prompt_mask == 0).sum(1).tolist() if fused is not None and padded else None
    logits = out.logits[:, -1]

    for step in range(max_new_tokens):
        token = picker.pick(logits)
        yield token
        if picker.update(token) or step == max_new_tokens - 1:
            return
        total = length + step + 1
        mask = full_mask[:, :total] if padded else None
        if fused is not None:
            logits = fused.step_batch(token, cache, padding)
        elif use_cache:
            out = model(token[:, None], attention_mask=mask, cache=cache, logits_to_keep=1)
            logits = out.logits[:, -1]
        else:  # the reference path: the whole sequence again, no cache
            all_ids = torch.cat([all_ids, token[:, None]], dim=1)
            if embeds is not None:
                embeds = torch.cat([embeds, model.get_input_embeddings()(token[:, None])], 1)
            out = model(input_ids=None if embeds is not None else all_ids, inputs_embeds=embeds,
                        attention_mask=mask, logits_to_keep=1)
            logits = out.logits[:, -1]


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    streamer: Callable[[torch.Tensor], None] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Continue the prompts; returns [B, L + new] ids with the prompt included (as HF).

    Options are those of :func:`generate_tokens`; ``streamer`` is called with each step's
    tokens [B] as they are produced.
    """
    steps = []
    for token in generate_tokens(model, input_ids, attention_mask, **kwargs):
        if streamer is not None:
            streamer(token)
        steps.append(token)
    if not steps:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


class TextStream:
    """Text pieces of one sequence's continuation as they are generated (iterate once).

    A piece is held back while it ends in an incomplete UTF-8 character or could be the start
    of a stop string; text from a stop string on is never yielded. After iteration ``text`` is
    the whole reply, ``tokens`` how many tokens the model produced (an end token included) and
    ``finish_reason`` ``"stop"`` (end token or stop string), ``"length"`` (``max_new_tokens``)
    or ``"cancelled"`` (``cancel`` was set between two tokens). Options as
    :func:`generate_tokens`.
    """

    def __init__(self, model: Any, tokenizer: Any, input_ids: torch.Tensor, *,
                 stop_strings: Sequence[str] = (), cancel: Any = None, **kwargs: Any) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"streaming takes one sequence [1, L], got "
                             f"{tuple(input_ids.shape)}")
        self.model, self.tokenizer, self.input_ids = model, tokenizer, input_ids
        self.stop_strings, self.cancel, self.kwargs = tuple(stop_strings), cancel, kwargs
        self.text = ""
        self.tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        stops = self.stop_strings
        pieces = TextPieces(self.tokenizer, _eos_ids(self.model, self.kwargs.get("eos_token_id")),
                            stops)
        steps = generate_tokens(self.model, self.input_ids, tokenizer=self.tokenizer,
                                stop_strings=stops, **self.kwargs)
        self.finish_reason = "length"
        try:
            for token in steps:
                self.tokens += 1
                piece = pieces.push(int(token[0]))
                if pieces.stopped:
                    self.finish_reason = "stop"
                    break
                if piece:
                    yield piece
                if self.cancel is not None and self.cancel.is_set():
                    self.finish_reason = "cancelled"
                    break
        finally:
            steps.close()
        rest = pieces.finish()
        self.text = pieces.text
        if rest:
            yield rest


class TextPieces:
    """The text of one sequence's generated tokens, pushed one at a time, in pieces safe to show
    at once: a piece is held back while it ends in an incomplete UTF-8 character or could be the
    start of a stop string; text from a stop string on is never given. :class:`TextStream` and
    the continuous-batching server (:mod:`imagefm.serve.continuous`) write replies with it."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int],
                 stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer, self.eos, self.stops = tokenizer, set(eos_ids), tuple(stop_strings)
        self.ids: list[int] = []
        self.emitted = 0  # characters given out so far
        self.stopped = False  # an end token or a stop string came: no more text
        self.text = ""  # the whole reply, once finish() is called

    def push(self, token: int) -> str:
        """The new piece of text after ``token`` ("" while held back or once ``stopped``)."""
        if token in self.eos:
            self.stopped = True
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # the rest of a multi-byte character comes with the next token
        if _stop_index(text, self.stops) is not None:
            self.stopped = True
            return ""
        safe = len(text) - _partial_stop_length(text, self.stops)
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:safe], safe
        return piece

    def finish(self) -> str:
        """The text held back at the end (once no token follows); sets ``text``."""
        text = self.tokenizer.decode(self.ids) if self.ids else ""
        cut = _stop_index(text, self.stops)
        self.text = text if cut is None else text[:cut]
        rest = self.text[self.emitted:]
        self.emitted = max(self.emitted, len(self.text))
        return rest


def stream_text(model: Any, tokenizer: Any, input_ids: torch.Tensor, *,
                stop_strings: Sequence[str] = (), **kwargs: Any) -> Iterator[str]:
    """Text pieces of one sequence's continuation (see :class:`TextStream`)."""
    return iter(TextStream(model, tokenizer, input_ids, stop_strings=stop_strings, **kwargs))


def _stop_index(text: str, stop_strings: Sequence[str]) -> int | None:
    found = [text.find(s) for s in stop_strings if s and s in text]
    return min(found) if found else None


def _partial_stop_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    best = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
