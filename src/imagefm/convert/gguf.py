"""GGUF files (llama.cpp) to imagefm: metadata, dequantised weights, tokenizer, chat template.

    load_gguf(path)            -> DecoderLM with .tokenizer and .chat_template
    load_gguf(path, keep_quantized=True) -> the same, Q4_0/Q4_1/Q8_0 matrices kept as their blocks
    read_gguf(path)            -> GGUFFile: metadata dict + raw tensors (memory-mapped)
    dequantize(raw, type, shape) -> float32 tensor

The file is parsed with the ``gguf`` package (llama.cpp's own reader). Blocks are dequantised
here in torch, one vectorised pass per tensor, for F32/F16/BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q4_K, Q5_K and Q6_K (tests compare each against ``gguf.quants.dequantize``); any other type falls
back to that numpy implementation.

Two things differ from a Hugging Face checkpoint besides the names:
* llama.cpp's converter permutes the rows of Llama's q/k projections so that each head's rotary
  pairs are adjacent (GPT-J layout); :class:`RotaryUnpermute` restores HF's rotate-half layout.
  Qwen2 and Qwen3 files keep the NeoX/rotate-half layout and are not permuted (nor are Qwen3's
  per-head q/k norm weights, ``blk.{i}.attn_q_norm`` / ``attn_k_norm``).
* GGML shapes list the fastest dimension first; a [rows, cols] matrix is stored as [cols, rows].
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagefm.checkpoint import CheckpointError, load_dtype
from imagefm.convert.keymap import KeyMap, Rule, Transform, load_with_key_map, rule
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.quantized import GGUF_TYPES, QuantizedLinear, kernel_status, replace_linears

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Architectures whose q/k rows llama.cpp's converter permutes (HF rotate-half -> GGML pairs).
PERMUTED_ROTARY = ("llama",)


# --- reading -------------------------------------------------------------------------------------

@dataclass
class GGUFTensor:
    """One stored tensor: GGML type name, our (row-major) shape, and the raw data as stored."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    raw: np.ndarray


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def key(self, name: str, default: Any = None) -> Any:
        """An architecture key by its short name: ``key("block_count")`` reads
        ``llama.block_count`` in a llama file."""
        return self.metadata.get(f"{self.architecture}.{name}", default)


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and raw tensors of a GGUF file (tensors are memory-mapped, not read yet)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    if not is_gguf(path):
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"reading {path} needs the 'gguf' package: pip install gguf"
                              ) from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file: {err}") from None
    metadata: dict[str, Any] = {}
    for name, reader_field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = reader_field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: metadata {name!r} is unreadable: {err}") from None
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data)
    return GGUFFile(path, metadata, tensors)


# --- dequantisation ------------------------------------------------------------------------------
# Each function takes the blocks as uint8 [n_blocks, bytes_per_block] and returns float32
# [n_blocks, values_per_block]. Layouts are those of ggml-common.h.

def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """A float16 stored at byte ``start`` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [n, 16] -> 32 values [n, 32]: low nibbles are values 0..15, high ones 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Little-endian bytes [n, count / 8] -> bits [n, count] (bit i of the word is value i)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh[:, :, None] >> shifts) & 1).reshape(qh.shape[0], count)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K): [n, 8] each."""
    s = s.long()
    low_sc, low_m, high = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat([low_sc & 63, (high & 0x0F) | ((low_sc >> 6) << 4)], dim=1)
    minimum = torch.cat([low_m & 63, (high >> 4) | ((low_m >> 6) << 4)], dim=1)
    return scale.float(), minimum.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scale, minimum = _k_scales(b[:, 4:16])
    # 4 chunks of 32 bytes; a chunk's low nibbles are sub-block 2c, its high nibbles 2c + 1.
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()
    d = (_f16(b, 0) * scale)[:, :, None]
    dm = (_f16(b, 2) * minimum)[:, :, None]
    return (d * q - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scale, minimum = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # bit j of byte l is the fifth bit of value l in sub-block j
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    low = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    high = (qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1
    q = (low | (high << 4)).float()
    d = (_f16(b, 0) * scale)[:, :, None]
    dm = (_f16(b, 2) * minimum)[:, :, None]
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().reshape(n, 2, 8)
    first, second = ql[:, :, :32], ql[:, :, 32:]
    q = torch.stack([(first & 0x0F) | ((qh & 3) << 4),
                     (second & 0x0F) | (((qh >> 2) & 3) << 4),
                     (first >> 4) | (((qh >> 4) & 3) << 4),
                     (second >> 4) | (((qh >> 6) & 3) << 4)], dim=2).reshape(n, 2, 128)
    # Each run of 16 values shares one signed scale.
    per_value = scales.repeat_interleave(16, dim=2)
    return (_f16(b, 208)[:, :, None] * per_value * (q.float() - 32)).reshape(n, 256)


# type name -> (values per block, bytes per block, function)
_BLOCK_TYPES = {
    "Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1), "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k), "Q6_K": (256, 210, _q6_k),
}
DEQUANTIZED_HERE = ("F32", "F16", "BF16", *_BLOCK_TYPES)


def dequantize(raw: np.ndarray, type_name: str, shape: Sequence[int]) -> torch.Tensor:
    """A stored GGUF tensor as float32 of ``shape`` (row-major, ours).

    ``raw`` is the array ``gguf.GGUFReader`` gives: typed values for F32/F16, bytes otherwise.
    """
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape)) if shape else 1
    if type_name == "F32":
        return torch.from_numpy(np.array(raw, dtype=np.float32)).reshape(shape)
    if type_name == "F16":
        values = np.ascontiguousarray(raw).view(np.float16)
        return torch.from_numpy(values.astype(np.float32)).reshape(shape)
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if type_name == "BF16":
        return torch.from_numpy(data.copy()).view(torch.bfloat16).float().reshape(shape)
    if type_name in _BLOCK_TYPES:
        per_block, block_bytes, fn = _BLOCK_TYPES[type_name]
        if count % per_block or data.size != count // per_block * block_bytes:
            raise ValueError(f"{type_name} data of {data.size} bytes does not hold {shape}")
        blocks = torch.from_numpy(data.copy()).reshape(-1, block_bytes)
        return fn(blocks).reshape(shape)
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[type_name]
    except KeyError:
        raise ValueError(f"unknown GGML type {type_name!r}") from None
    values = gguf.quants.dequantize(np.ascontiguousarray(raw), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


# --- key map -------------------------------------------------------------------------------------

class RotaryUnpermute(Transform):
    """Undo llama.cpp's q/k row permutation for ``heads`` heads.

    The converter reshapes rows as (heads, 2, head_dim/2) and swaps the last two axes, so row
    pairs (i, i + head_dim/2) of each head become neighbours; reading reverses that.
    """

    def __init__(self, heads: int) -> None:
        self.heads = heads
        self.name = f"rotary_unpermute({heads})"

    def _regroup(self, tensor: torch.Tensor, to_hf: bool) -> torch.Tensor:
        rows = tensor.shape[0]
        if rows % (2 * self.heads):
            raise ValueError(f"{rows} rows do not split into {self.heads} heads of rotary pairs")
        half = rows // self.heads // 2
        inner = (half, 2) if to_hf else (2, half)
        grouped = tensor.reshape(self.heads, *inner, *tensor.shape[1:])
        return grouped.transpose(1, 2).reshape(tensor.shape).contiguous()

    def to_ours(self, tensor: torch.Tensor, shapes: Sequence[tuple[int, ...] | None]
                ) -> list[torch.Tensor]:
        return [self._regroup(tensor, to_hf=True)]

    def to_source(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self._regroup(tensors[0], to_hf=False)


def gguf_key_map(config: DecoderConfig, architecture: str) -> KeyMap:
    """GGUF tensor names (``blk.{i}.attn_q.weight`` ...) -> ours."""
    permute = architecture in PERMUTED_ROTARY
    q_transform = RotaryUnpermute(config.heads) if permute else Transform()
    k_transform = RotaryUnpermute(config.kv_heads) if permute else Transform()
    names = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_v": "attn.v_proj",
             "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}  # last two: Qwen3
    rules: list[Rule] = [rule("token_embd.weight", "embed_tokens.weight"),
                         rule("output_norm.weight", "norm.weight")]
    for p in ("weight", "bias"):
        rules += [rule(f"blk.{{i}}.{theirs}.{p}", f"blocks.{{i}}.{ours}.{p}")
                  for theirs, ours in names.items()]
        rules += [rule(f"blk.{{i}}.attn_q.{p}", f"blocks.{{i}}.attn.q_proj.{p}", q_transform),
                  rule(f"blk.{{i}}.attn_k.{p}", f"blocks.{{i}}.attn.k_proj.{p}", k_transform)]
    if not config.tie_embeddings:
        rules.append(rule("output.weight", "lm_head.weight"))
    return KeyMap(f"GGUF {architecture}", tuple(rules))


# --- metadata -> config --------------------------------------------------------------------------

def _int_key(file: GGUFFile, name: str, default: int | None = None) -> int:
    value = file.key(name, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{file.path}: {file.architecture}.{name} differs per layer "
                                  f"({value[:8]}...); imagefm needs one value")
        value = value[0]
    if value is None:
        raise CheckpointError(f"{file.path}: metadata {file.architecture}.{name} is missing")
    return int(value)


def config_from_gguf(file: GGUFFile) -> DecoderConfig:
    """Our decoder config from a GGUF file's metadata (and which tensors it has)."""
    arch, where = file.architecture, file.path
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{where}: GGUF architecture {arch!r} is not supported; imagefm "
                              f"reads {', '.join(ARCHITECTURES)}")
    if "rope_freqs.weight" in file.tensors:
        raise CheckpointError(f"{where}: per-frequency rope factors (rope_freqs.weight, Llama 3.1 "
                              f"scaling) are not supported in GGUF files; load the HF directory")
    width, heads = _int_key(file, "embedding_length"), _int_key(file, "attention.head_count")
    head_dim = int(file.key("attention.key_length") or width // heads)
    rotary_dim = int(file.key("rope.dimension_count") or head_dim)
    if rotary_dim != head_dim:
        raise CheckpointError(f"{where}: rotary dimension {rotary_dim} != head dimension "
                              f"{head_dim} (partial rotary) is not supported")
    scaling = str(file.key("rope.scaling.type") or "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{where}: rope scaling {scaling!r} is not supported")
    tokens = file.metadata.get("tokenizer.ggml.tokens")
    vocab = file.key("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = file.tensors["token_embd.weight"].shape[0]
    eos = [file.metadata.get(k) for k in ("tokenizer.ggml.eos_token_id",
                                          "tokenizer.ggml.eot_token_id")]
    try:
        return DecoderConfig(
            model_type=arch, vocab_size=int(vocab), width=width,
            layers=_int_key(file, "block_count"), heads=heads,
            kv_heads=_int_key(file, "attention.head_count_kv", heads),
            head_dim=head_dim if head_dim != width // heads else 0,
            mlp_dim=_int_key(file, "feed_forward_length"),
            norm_eps=float(file.key("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=_int_key(file, "context_length", 2048),
            rope_theta=float(file.key("rope.freq_base", 10000.0)),
            rope_scaling="linear" if scaling == "linear" else "default",
            rope_factor=float(file.key("rope.scaling.factor") or 1.0),
            qkv_bias="blk.0.attn_q.bias" in file.tensors,
            o_bias="blk.0.attn_output.bias" in file.tensors,
            mlp_bias="blk.0.ffn_gate.bias" in file.tensors,
            qk_norm=arch == "qwen3",  # llama.cpp requires the q/k norms of every qwen3 layer
            tie_embeddings="output.weight" not in file.tensors,
            bos_token_id=file.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            pad_token_id=file.metadata.get("tokenizer.ggml.padding_token_id"))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: cannot express this model in imagefm: {err}") from None


# --- tokenizer -----------------------------------------------------------------------------------
# llama.cpp names the pre-tokenizer ("tokenizer.ggml.pre"); these are the splits each name means.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"default": None, "gpt2": None, "gpt-2": None, "smollm": "digits",
               "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
# llama.cpp's token types (gguf.TokenType)
NORMAL_TOKEN, UNKNOWN_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN = 1, 2, 3, 4


def _byte_level_tokenizer(meta: dict[str, Any], where: Path) -> Any:
    """A ``tokenizers`` byte-level BPE (GGUF tokenizer model "gpt2")."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_SPLITS:
        raise ValueError(f"{where}: pre-tokenizer {pre!r} is not known to imagefm (known: "
                         f"{', '.join(sorted(_PRE_SPLITS))})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    model = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = HFTokenizer(model)
    split = _PRE_SPLITS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(types) if kind == CONTROL_TOKEN]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(types) if kind == USER_DEFINED_TOKEN]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
    return tokenizer


def _sentencepiece_bpe_tokenizer(meta: dict[str, Any]) -> Any:
    """A ``tokenizers`` BPE equal to a SentencePiece BPE vocabulary (GGUF tokenizer model
    "llama": Llama 2, Mistral, TinyLlama): pieces with "▁" for spaces, byte fallback to
    ``<0xXX>`` pieces.

    SentencePiece merges the adjacent pair whose joined piece scores highest; a BPE whose merge
    ranks follow the joined pieces' scores (best first) does the same.
    """
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta["tokenizer.ggml.scores"])
    types = list(meta.get("tokenizer.ggml.token_type", [NORMAL_TOKEN] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for index, (piece, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != NORMAL_TOKEN and kind != USER_DEFINED_TOKEN:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                candidates.append((-scores[index], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(candidates)]
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    model = BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                unk_token=tokens[unknown] if unknown is not None else None)
    tokenizer = HFTokenizer(model)
    steps = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1 if meta.get("tokenizer.ggml.add_space_prefix", True) else 0, 0)])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(types)
                                  if kind in (CONTROL_TOKEN, UNKNOWN_TOKEN)])
    return tokenizer


def tokenizer_from_gguf(file: GGUFFile, context_length: int | None = None) -> Any:
    """The file's tokenizer as an :class:`imagefm.tokenizer.Tokenizer` (prompt settings: BOS as
    the file says, no EOS appended, no truncation, padding to the longest).

    Byte-level BPE vocabularies (tokenizer model "gpt2": SmolLM2, Qwen2, Llama 3) are rebuilt
    from tokens + merges, SentencePiece BPE ones ("llama") from tokens + scores; a file that
    embeds a Hugging Face tokenizer.json uses that.
    """
    from tokenizers import Tokenizer as HFTokenizer

    from imagefm.tokenizer import Tokenizer, TokenizerSettings, _TokenizersBackend

    meta = file.metadata
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.huggingface.json" in meta:
        backend_tokenizer = HFTokenizer.from_str(meta["tokenizer.huggingface.json"])
    elif kind == "gpt2":
        backend_tokenizer = _byte_level_tokenizer(meta, file.path)
    elif kind == "llama":
        backend_tokenizer = _sentencepiece_bpe_tokenizer(meta)
    else:
        raise ValueError(f"{file.path}: GGUF tokenizer model {kind!r} is not supported (imagefm "
                         f"reads byte-level BPE 'gpt2' and SentencePiece BPE 'llama')")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    # llama.cpp's default: SentencePiece vocabularies add BOS, byte-level BPE ones do not.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    settings = TokenizerSettings(
        context_length=int(context_length or file.key("context_length", 2048)),
        padding="longest", truncation=False, pad_id=int(pad if pad is not None else 0),
        bos_id=int(meta["tokenizer.ggml.bos_token_id"]) if add_bos else None, eos_id=None)
    return Tokenizer(_TokenizersBackend(backend_tokenizer), settings)


def chat_template_from_gguf(file: GGUFFile) -> str | None:
    template = file.metadata.get("tokenizer.chat_template")
    return str(template) if template else None


@contextmanager
def _one_thread() -> Iterator[None]:
    """Dequantisation is many small memory-bound ops; on a busy machine every multi-threaded op
    waits for a second core (measured: 10 ms per op instead of 20 us), so run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- load ----------------------------------------------------------------------------------------

def load_gguf(path: str | Path, *, strict: bool = True,
              dtype: torch.dtype | None = None, keep_quantized: bool = False) -> DecoderLM:
    """Load a Llama/Qwen2/Qwen3 GGUF file as a :class:`DecoderLM` (weights dequantised to
    ``dtype``), with its tokenizer and chat template. ``strict`` fails on any tensor mismatch.

    ``keep_quantized=True`` keeps the linear layers (and the output projection) that the file
    stores as Q4_0, Q4_1 or Q8_0 in their blocks, as :class:`QuantizedLinear`: the same weights,
    about 5x (4-bit) / 3.8x (8-bit) fewer bytes to read per token, so CPU decoding is faster
    (docs/benchmarks.md). Other types are dequantised as usual. Where the kernel cannot be built
    (no C compiler) it warns and loads float weights.
    """
    file = read_gguf(path)
    config = config_from_gguf(file)
    dtype = dtype or load_dtype()
    model = DecoderLM.for_loading(config, dtype) if strict else DecoderLM(config).to(dtype)
    weights = {}
    with _one_thread():
        for name, tensor in file.tensors.items():
            try:
                weights[name] = dequantize(tensor.raw, tensor.type_name, tensor.shape).to(dtype)
            except ValueError as err:
                raise CheckpointError(f"{file.path}: tensor {name}: {err}") from None
    key_map = gguf_key_map(config, file.architecture)
    load_with_key_map(model, key_map, weights, strict=strict, where=str(file.path))
    del weights
    if keep_quantized:
        available, why = kernel_status()
        if available:
            _keep_blocks(model, file, key_map)
        else:
            warnings.warn(f"{file.path}: quantised matmul kernel unavailable, loading float "
                          f"weights: {why}", stacklevel=2)
    has_tokenizer = any(k in file.metadata for k in ("tokenizer.ggml.model",
                                                     "tokenizer.huggingface.json"))
    if has_tokenizer:
        try:
            model.tokenizer = tokenizer_from_gguf(file, config.context_length)
        except (ValueError, KeyError) as err:
            warnings.warn(f"{file.path}: loading the model without a tokenizer: {err}",
                          stacklevel=2)
    model.chat_template = chat_template_from_gguf(file)
    return model.eval()


def _keep_blocks(model: DecoderLM, file: GGUFFile, key_map: KeyMap) -> None:
    """Swap the float linears loaded from Q4_0/Q4_1/Q8_0 tensors for their blocks.

    The key map's transforms apply to the blocks too: llama.cpp's q/k permutation moves whole
    rows, and a row's blocks, scales and minima move with it.
    """
    layers: dict[str, QuantizedLinear] = {}
    head = None
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, tensor in file.tensors.items():
        if tensor.type_name not in GGUF_TYPES or len(tensor.shape) != 2:
            continue
        is_embedding = name == "token_embd.weight"
        matched = key_map._match(name)
        if matched is None:
            continue
        found, binding = matched
        target = found.ours[0].format(**binding).removesuffix(".weight")
        if not (target in linears or (is_embedding and model.lm_head is None)):
            continue
        layer = QuantizedLinear.from_gguf(tensor.raw, tensor.type_name, tensor.shape)
        values, scales = (found.transform.to_ours(t, [None])[0]
                          for t in (layer.qweight, layer.scales))
        bias = model.get_submodule(target).bias if target in linears else None
        layer = QuantizedLinear(values.contiguous(), scales.contiguous(), layer.bits,
                                bias.detach() if bias is not None else None)
        if is_embedding:
            head = layer  # the tied output projection; the input lookup keeps float rows
        elif target == "lm_head":
            head = layer
        else:
            layers[target] = layer
    replace_linears(model, layers, head)
