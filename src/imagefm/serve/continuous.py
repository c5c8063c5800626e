"""Continuous batching for chat completions: every request being answered decodes in ONE batch,
which takes new requests in and lets finished ones go at every step.

    submit(reply, sink) ─► waiting (at most ``max_queue`` admitted, else QueueFullError → 429)
         ─► a free slot (at most ``slots`` decoding): prompt run alone (prefill; a VLM's vision
            tower too), then the request joins the batch
         ─► every step: one token for each request in the batch (one forward pass for all),
            text pieces to each request's sink ─► out at its end token, stop string, length
            limit, or when its client went away (``sink.cancel``: the slot is free at the next
            step and the next waiting request takes it)

One scheduler thread runs all of it, so model calls never overlap. The tokens are exactly those
of answering each request alone (:class:`~imagefm.apps.vlm_chat.Reply`): each request keeps its
own KV cache, options, seeded sampling generator and stop strings, and goes through the same
:class:`~imagefm.models.generation.TokenPicker` and
:class:`~imagefm.models.generation.TextPieces` (see :mod:`imagefm.models.batched_decode` for
why per-row caches, and where float32 rounding may differ).

Language models and VLMs of every family batch alike: a VLM's image features only enter the
prefill (``generation_inputs``); decoding steps see tokens, positions and the caches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from imagefm.apps.vlm_chat import Reply, language_model
from imagefm.models.batched_decode import BatchDecoder, DecodeRow
from imagefm.models.generation import TextPieces
from imagefm.serve.batching import QueueFullError

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Where one request's reply goes (called on the scheduler thread)."""

    cancel: threading.Event  # set by the request when nobody wants the rest

    def begin(self) -> None:
        """The request has its slot: decoding starts."""

    def emit(self, piece: str) -> None:
        """A piece of the reply's text."""

    def end(self, error: Exception | None = None) -> None:
        """No more pieces: the reply is complete (``reply`` filled in), or ``error``."""


@dataclass(eq=False)
class _Request:
    reply: Reply
    sink: Sink
    pieces: TextPieces | None = None
    row: DecodeRow | None = None


class ContinuousBatcher:
    """The scheduler of one model's chat replies: ``slots`` decode together, ``max_queue``
    admitted in all (decoding or waiting for a slot)."""

    def __init__(self, model: Any, *, slots: int, max_queue: int) -> None:
        if slots < 1 or max_queue < 1:
            raise ValueError("slots and max_queue must be >= 1")
        self.model = model
        self.lm = language_model(model)
        self.decoder = BatchDecoder(self.lm)
        self.slots, self.max_queue = slots, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []  # the scheduler thread's own
        self._admitted = 0  # waiting + decoding, under _cond
        self._closed = False
        self._thread: threading.Thread | None = None
        self.largest = 0  # most requests decoded in one step
        self.prefill_s = self.decode_s = 0.0  # seconds spent running prompts, and in steps
        self.completion_tokens = 0  # tokens generated, end tokens included

    # --- the request side (any thread) ----------------------------------------------------------

    def submit(self, reply: Reply, sink: Sink) -> None:
        """Queue ``reply`` (not iterated: the scheduler fills in its text and counts) for
        ``sink``; raises QueueFullError when ``max_queue`` requests are already admitted."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self._admitted >= self.max_queue:
                raise QueueFullError(f"{self._admitted} chat requests are decoding or waiting")
            self._admitted += 1
            self._waiting.append(_Request(reply, sink))
            if self._thread is None or not self._thread.is_alive():  # first use, or it failed
                self._thread = threading.Thread(target=self._run, name="imagefm-generate",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop: requests still waiting or decoding end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict[str, Any]:
        decoder = self.decoder
        mean = decoder.decoded / decoder.steps if decoder.steps else 0.0
        return {"slots": self.slots, "decoding": len(decoder.rows), "waiting": self.waiting,
                "steps": decoder.steps, "mean_batch": round(mean, 2), "largest": self.largest,
                "prefill_s": round(self.prefill_s, 3), "decode_s": round(self.decode_s, 3)}

    # --- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._next():
                    pass
        except Exception:  # a bug, not a model error (those go to their requests)
            logger.exception("the chat scheduler stopped")
            raise
        finally:
            error = RuntimeError("the server is shutting down" if self._closed
                                 else "the chat scheduler stopped")
            for request in list(self._active):
                self._end(request, error)
            with self._cond:
                left, self._waiting = list(self._waiting), deque()
            for request in left:
                self._end(request, error)

    def _next(self) -> bool:
        """Retire requests whose client left, fill free slots, run one step; False to stop."""
        for request in [r for r in self._active if r.sink.cancel.is_set()]:
            self._finish(request, "cancelled")
        with self._cond:
            while not self._closed and not self._waiting and not self._active:
                self._cond.wait()
            if self._closed:
                return False
            gone = [r for r in self._waiting if r.sink.cancel.is_set()]  # timed out waiting
            for request in gone:  # (or their clients left): their places in the queue free up
                self._waiting.remove(request)
                self._admitted -= 1
                request.sink.end(None)
            joining = []
            while self._waiting and len(self._active) + len(joining) < self.slots:
                joining.append(self._waiting.popleft())
        for request in joining:
            self._start(request)
        if self._active:
            self._step()
        return True

    def _start(self, request: _Request) -> None:
        """Give ``request`` its slot: run its prompt and add it to the batch."""
        request.sink.begin()
        started = time.perf_counter()
        try:
            arguments = {**request.reply.decoding_arguments(),
                         "tokenizer": self.lm.tokenizer}
            request.pieces = TextPieces(self.lm.tokenizer, arguments["eos_token_id"],
                                        arguments["stop_strings"])
            request.row = self.decoder.add(**arguments, tag=request)
        except Exception as err:  # reported to the request, which logs it
            self._end(request, err)
            return
        finally:
            self.prefill_s += time.perf_counter() - started
        self._active.append(request)

    def _step(self) -> None:
        started = time.perf_counter()
        self.largest = max(self.largest, len(self.decoder.rows))
        try:
            picked = self.decoder.step()
        except Exception as err:  # every request in the batch gets the error
            logger.exception("a batched decoding step failed")
            for request in list(self._active):
                self.decoder.remove(request.row)
                self._end(request, err)
            return
        finally:
            self.decode_s += time.perf_counter() - started
        for row, token in picked:
            request = row.tag
            request.reply.completion_tokens += 1
            self.completion_tokens += 1
            piece = request.pieces.push(token)
            if request.pieces.stopped:
                self._finish(request, "stop")
                continue
            if piece:
                request.sink.emit(piece)
            if request.sink.cancel.is_set():
                self._finish(request, "cancelled")
            elif row.finished:  # its length limit, or the picker saw an end it did not
                self._finish(request, "length")

    def _finish(self, request: _Request, reason: str) -> None:
        """As a :class:`Reply` ends: the held-back text, the whole text, why it ended."""
        self.decoder.remove(request.row)
        rest = request.pieces.finish()
        if rest:
            request.sink.emit(rest)
        request.reply.text, request.reply.finish_reason = request.pieces.text, reason
        self._end(request)

    def _end(self, request: _Request, error: Exception | None = None) -> None:
        if request in self._active:
            self._active.remove(request)
        with self._cond:
            self._admitted -= 1
        request.sink.end(error)
