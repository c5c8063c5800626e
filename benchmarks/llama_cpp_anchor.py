"""llama.cpp (through llama-cpp-python) as a row of ``bench_generate.py``: the same GGUF file, the
same prompt ids and thread count, greedy, end tokens ignored.

Greedy tokens are the argmax of llama.cpp's own last logits (``llama_get_logits_ith``), read in
place. (llama-cpp-python 0.3.x no longer fills ``Llama.scores`` unless ``logits_all=True``: an
argmax of ``scores`` there reads stale zeros, which costs the same time but picks other tokens.)

llama.cpp's arithmetic is not ours: it rounds each input vector of a matrix product to int8
blocks and keeps an F16 KV cache; our fused step (``imagefm.models.fused_decode``) rounds the
inputs the same way but keeps float32 keys and values, so greedy tokens agree until two
candidates are within rounding of each other.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """One llama.cpp context on ``path`` with ``threads`` threads, ``context`` positions."""

    def __init__(self, path: Path, threads: int, context: int) -> None:
        import llama_cpp

        self.api = llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=context, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        pointer = self.api.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(pointer, shape=(self.vocab,)).argmax())

    def generate(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        """(seconds to the first token, seconds for the rest, the new tokens): the prompt in
        one batch, then one token at a time, as ours."""
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        tokens = [self._next()]
        first = time.perf_counter()
        while len(tokens) < new_tokens:
            self.llm.eval([tokens[-1]])
            tokens.append(self._next())
        return first - start, time.perf_counter() - first, tokens

    def close(self) -> None:
        self.llm.close()
