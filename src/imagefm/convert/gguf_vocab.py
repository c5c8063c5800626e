"""imagefm tokenizers as GGUF vocabularies (``tokenizer.ggml.*``), the way llama.cpp reads them:
the inverse of :func:`imagefm.convert.gguf.tokenizer_from_gguf`.

    tokenizer_metadata(tokenizer, config) -> [(key, value, GGUF value type, array item type)]

* A byte-level BPE (``tokenizers`` backend: SmolLM2, Qwen2/3, Llama 3, ``train_bpe``) becomes
  tokenizer model ``gpt2``: tokens in id order (byte-level text; added tokens as their raw text),
  token types (added special tokens CONTROL, other added tokens such as extra Hangul syllables
  USER_DEFINED, so llama.cpp matches them in the text as whole tokens), merges, and the
  pre-tokenizer under the name llama.cpp knows it by (its split regex is chosen by that name).
* A SentencePiece model becomes tokenizer model ``llama``: pieces, scores and piece types.
  llama.cpp's SentencePiece tokenizer merges pieces by score, which is exact for SentencePiece
  BPE models (Llama 2, Mistral); a unigram model is refused.

A model whose embedding has more rows than the tokenizer has tokens gets ``[PAD{id}]`` tokens of
type UNUSED for the rest (as convert_hf_to_gguf.py writes them): llama.cpp needs one token per
row. Settings llama.cpp cannot express (lower-casing, SigLIP's canonicalisation, other
normalisers or pre-tokenizers) are refused, naming what was found.
"""

from __future__ import annotations

import json
from typing import Any

from imagefm.checkpoint import CheckpointError
from imagefm.convert.gguf import (
    _LLAMA3_SPLIT,
    _QWEN2_SPLIT,
    CONTROL_TOKEN,
    NORMAL_TOKEN,
    UNKNOWN_TOKEN,
    USER_DEFINED_TOKEN,
)
from imagefm.models.decoder_config import DecoderConfig

UNUSED_TOKEN, BYTE_TOKEN = 5, 6  # the rest of llama.cpp's token types (gguf.TokenType)
# Split regexes -> llama.cpp's pre-tokenizer names (llama-vocab.cpp picks its regexes by name).
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

Entry = tuple[str, Any, Any, Any]  # key, value, GGUFValueType, item type of an array (or None)


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a ``tokenizers`` byte-level pre-tokenizer (its JSON form)."""
    def byte_level(step: dict[str, Any], regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
                and bool(step.get("use_regex", True)) == regex)

    steps = (pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence"
             else [pre] if pre else [])
    if len(steps) == 1 and byte_level(steps[0], regex=True):
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits"
            and steps[0].get("individual_digits") and byte_level(steps[1], regex=True)):
        return "smollm"  # SmolLM2: single digits, then GPT-2's split
    if (len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], regex=False)
            and str(steps[0].get("behavior", "")).lower() == "isolated"
            and not steps[0].get("invert", False)):
        name = _SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise CheckpointError(f"the tokenizer's pre-tokenizer has no llama.cpp equivalent here (known: "
                          f"GPT-2, SmolLM2, Llama 3, Qwen2 splits); found {json.dumps(pre)[:300]}")


def _byte_level_bpe(backend: Any) -> tuple[list[str], list[int], list[Entry]]:
    """Tokens, types and the extra entries (model, pre-tokenizer, merges) of a byte-level BPE."""
    from gguf import GGUFValueType as V

    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    odd = {k: model[k] for k in ("continuing_subword_prefix", "end_of_word_suffix",
                                  "byte_fallback") if model.get(k)}
    if model.get("type") != "BPE" or odd:
        raise CheckpointError(f"GGUF's 'gpt2' tokenizer is a plain byte-level BPE; this one is a "
                              f"{model.get('type')} model with {odd}")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise CheckpointError(f"the tokenizer normalises text ({normalizer.get('type')}), which "
                              f"llama.cpp's byte-level BPE does not do")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED_TOKEN] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, NORMAL_TOKEN
    for index, added in backend.get_added_tokens_decoder().items():
        types[index] = CONTROL_TOKEN if added.special else USER_DEFINED_TOKEN
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    entries = [("tokenizer.ggml.model", "gpt2", V.STRING, None),
               ("tokenizer.ggml.pre", pre, V.STRING, None),
               ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)]
    return tokens, types, entries


def _sentencepiece(backend: Any) -> tuple[list[str], list[int], list[Entry], list[float]]:
    """Pieces, types, extra entries and scores of a SentencePiece model."""
    from gguf import GGUFValueType as V

    sp = backend.processor
    try:  # the model proto says BPE or unigram (needs protobuf; skipped without it)
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(backend.model_proto)
        if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
            raise CheckpointError("llama.cpp's SentencePiece tokenizer is exact for BPE models "
                                  "only; this one is a unigram model")
    except ImportError:
        pass
    size = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(size)]
    types = [UNKNOWN_TOKEN if sp.is_unknown(i) else CONTROL_TOKEN if sp.is_control(i)
             else BYTE_TOKEN if sp.is_byte(i) else UNUSED_TOKEN if sp.is_unused(i)
             else NORMAL_TOKEN for i in range(size)]
    # SentencePiece's dummy prefix: "x" encodes with a leading "\u2581" piece when it is on.
    add_space = sp.encode("x", out_type=str)[0].startswith("\u2581")
    entries = [("tokenizer.ggml.model", "llama", V.STRING, None),
               ("tokenizer.ggml.add_space_prefix", add_space, V.BOOL, None)]
    if sp.unk_id() >= 0:
        entries.append(("tokenizer.ggml.unknown_token_id", sp.unk_id(), V.UINT32, None))
    return tokens, types, entries, [sp.get_score(i) for i in range(size)]


def tokenizer_metadata(tokenizer: Any, config: DecoderConfig) -> list[Entry]:
    """The ``tokenizer.ggml.*`` entries for an :class:`imagefm.tokenizer.Tokenizer` of a model
    with ``config`` (its vocabulary size, BOS/EOS/padding ids)."""
    from gguf import GGUFValueType as V

    settings = tokenizer.settings()
    for flag in ("lowercase", "canonicalize"):
        if settings.get(flag):
            raise CheckpointError(f"the tokenizer's {flag}=True setting has no GGUF key; "
                                  f"llama.cpp would tokenize differently")
    backend = tokenizer._backend
    scores = None
    if backend.kind == "sentencepiece":
        tokens, types, entries, scores = _sentencepiece(backend)
    else:
        tokens, types, entries = _byte_level_bpe(backend.tokenizer)
    if len(tokens) > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokens)} tokens but the model only "
                              f"{config.vocab_size} embedding rows (grow the embedding: "
                              f"imagefm.models.vocab.extend_vocabulary)")
    padding = range(len(tokens), config.vocab_size)
    tokens += [f"[PAD{i}]" for i in padding]
    types += [UNUSED_TOKEN] * len(padding)
    entries += [("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
                ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)]
    if scores is not None:
        scores += [-1e4] * len(padding)
        entries.append(("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32))
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else config.bos_token_id
    eos = list(config.eos_token_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None
                                         else [])
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_id
    ids = {"bos_token_id": bos, "eos_token_id": eos[0] if eos else None,
           "eot_token_id": eos[1] if len(eos) > 1 else None, "padding_token_id": pad}
    entries += [(f"tokenizer.ggml.{key}", int(value), V.UINT32, None)
                for key, value in ids.items() if value is not None]
    entries += [("tokenizer.ggml.add_bos_token", tokenizer.bos_id is not None, V.BOOL, None),
                ("tokenizer.ggml.add_eos_token", tokenizer.eos_id is not None, V.BOOL, None)]
    return entries
