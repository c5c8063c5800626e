"""Grow a language model's vocabulary: whole-token Hangul syllables for an English-first LM.

SmolLM2's byte-level BPE spends 2-3 tokens on each Hangul syllable (a syllable is 3 UTF-8 bytes
and few byte pairs were merged), which makes Korean text slow to generate and long to attend
over. ``extend_vocabulary`` adds chosen strings as whole tokens and grows the embedding (and an
untied output head) so that each new row starts as the mean of the rows of the old pieces that
spelled it: the model's first guess for a new token is what the old pieces meant together, and
fine-tuning (the VLM's sft stage) refines it.

    syllables = hangul_syllables(korean_corpus, top=2000)
    before = tokens_per_syllable(lm.tokenizer, held_out_texts)
    extend_vocabulary(lm, syllables)
    after = tokens_per_syllable(lm.tokenizer, held_out_texts)
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

HANGUL_WORD = re.compile("[\uac00-\ud7a3]+")  # runs of precomposed syllables


def hangul_syllables(texts: Iterable[str], top: int | None = None,
                     min_count: int = 1) -> list[str]:
    """The Hangul syllables of ``texts`` (NFC), most frequent first."""
    counts: Counter[str] = Counter()
    for text in texts:
        for word in HANGUL_WORD.findall(unicodedata.normalize("NFC", text)):
            counts.update(word)
    return [s for s, n in counts.most_common(top) if n >= min_count]


def tokens_per_syllable(tokenizer: Any, texts: Iterable[str]) -> float:
    """Tokens spent per Hangul syllable, counting only the Hangul words of ``texts``."""
    syllables = tokens = 0
    for text in texts:
        for word in HANGUL_WORD.findall(unicodedata.normalize("NFC", text)):
            syllables += len(word)
            tokens += len(tokenizer.pieces(word))
    if not syllables:
        raise ValueError("no Hangul syllables in the texts")
    return tokens / syllables


def _grown(old: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """``old`` [V, D] with one new row per entry of ``rows``: the mean of those old rows."""
    new = torch.stack([old[ids].float().mean(0) for ids in rows]).to(old.dtype)
    return torch.cat([old, new])


def extend_vocabulary(lm: nn.Module, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to ``lm.tokenizer`` as whole tokens and grow ``lm``'s embeddings to match.

    Tokens the vocabulary already has, or that are already one piece, are skipped. Returns the
    ids of the tokens added, in order. Old token ids, and the model's outputs on text made only
    of them, are unchanged.
    """
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the model has no tokenizer to extend")
    if tokenizer.vocab_size != lm.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"embedding has {lm.config.vocab_size}; extend a model whose tokenizer "
                         f"matches its embedding")
    wanted: list[str] = []
    spelled: list[list[int]] = []
    for token in dict.fromkeys(tokens):
        if not token or tokenizer.token_to_id(token) is not None:
            continue
        pieces = tokenizer.pieces(token)
        if len(pieces) > 1:
            wanted.append(token)
            spelled.append(pieces)
    if not wanted:
        return []
    ids = tokenizer.add_tokens(wanted)
    first = lm.config.vocab_size
    if ids != list(range(first, first + len(wanted))):
        raise RuntimeError(f"the tokenizer gave the new tokens ids {ids[:3]}..., expected them "
                           f"to follow the old vocabulary from {first}")
    with torch.no_grad():
        weight = lm.embed_tokens.weight
        lm.embed_tokens = nn.Embedding.from_pretrained(_grown(weight, spelled), freeze=False)
        if lm.lm_head is not None:
            head = lm.lm_head.weight
            lm.lm_head = nn.Linear(head.shape[1], first + len(wanted), bias=False,
                                   device=head.device, dtype=head.dtype)
            lm.lm_head.weight.copy_(_grown(head, spelled))
    lm.config = dataclasses.replace(lm.config, vocab_size=first + len(wanted))
    return ids
