"""Text tokenizers: one wrapper over HF `tokenizers` (or `sentencepiece`), settings kept as data.

Every model card differs in small ways that silently change ids: CLIP lower-cases, adds
``<|startoftext|>``/``<|endoftext|>`` and pads to 77; SigLIP strips punctuation, appends ``</s>``
only and pads to 64 with ``</s>``. Those choices live in :class:`TokenizerSettings`, which is saved
next to the vocabulary (``imagefm_tokenizer.json``) and embedded in checkpoints, never guessed from
a model name.

The text path, for every backend::

    text -> NFC -> [canonicalize] -> [lower-case] -> backend pieces -> [bos] + ids + [eos] -> pad

NFC comes first so Korean typed or copied as decomposed jamo (NFD) gets the same ids as composed
syllables. Special tokens and padding are added here in Python rather than by the backend's
post-processor, so the rule is the same whichever backend holds the vocabulary.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SETTINGS_FILE = "imagefm_tokenizer.json"
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_FILE = "spiece.model"

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
PAD_TOKEN = "<pad>"
# OpenAI CLIP's pre-tokenisation: contractions, letter runs, single digits, punctuation runs.
CLIP_SPLIT_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
CLIP_END_OF_WORD = "</w>"
# bpe_simple_vocab_16e6.txt.gz holds more merges than CLIP uses; OpenAI keeps the first
# 49152 - 256 - 2 of them so that bytes + merges + 2 specials give a 49408-token vocabulary.
CLIP_NUM_MERGES = 49152 - 256 - 2
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class TokenizerSettings:
    """Everything besides the vocabulary that decides a tokenizer's output.

    ``bos_id``/``eos_id`` are added to every sequence when not None; on truncation the EOS stays
    the last token (CLIP pools at it). ``padding`` is ``"max_length"`` (every row is
    ``context_length`` long, as CLIP and SigLIP are trained) or ``"longest"`` (rows as long as the
    longest in the batch). ``canonicalize`` is SigLIP's big_vision clean-up (ASCII punctuation
    removed, whitespace collapsed); ``lowercase`` is a Python-side ``str.lower`` before the backend
    (CLIP's vocabulary lower-cases inside its own normaliser instead, saved in tokenizer.json).
    """

    context_length: int = 77
    padding: str = "max_length"
    truncation: bool = True
    pad_id: int = 0
    bos_id: int | None = None
    eos_id: int | None = None
    canonicalize: bool = False
    lowercase: bool = False
    backend: str = "tokenizers"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerSettings:
        """Build settings from a dict, refusing keys we do not know (a typo must not be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Backends: the vocabulary and its piece-level encoder. No special tokens, no padding here.
# --------------------------------------------------------------------------------------------


class _TokenizersBackend:
    """A `tokenizers.Tokenizer` used for pieces only; the wrapper adds specials and padding."""

    kind = "tokenizers"

    def __init__(self, tokenizer: HFTokenizer) -> None:
        # A tokenizer.json from elsewhere may carry its own padding/truncation; ours rule instead.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        # CLIP's BPE marks word ends with "</w>"; the byte-level decoder leaves it in the text.
        self.end_of_word_suffix = getattr(tokenizer.model, "end_of_word_suffix", None) or ""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.end_of_word_suffix:
            text = text.replace(self.end_of_word_suffix, " ").strip()
        return text

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.tokenizer.id_to_token(index)

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / TOKENIZER_JSON))

    @classmethod
    def load(cls, directory: Path) -> _TokenizersBackend:
        return cls(_load_tokenizer_json(directory / TOKENIZER_JSON))


class _SentencePieceBackend:
    """A sentencepiece model used as is, so its ids equal the reference by construction."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece

        self.model_proto = model_proto
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        index = self.processor.piece_to_id(token)
        # sentencepiece answers the unknown id for pieces it does not have.
        return index if self.processor.id_to_piece(index) == token else None

    def id_to_token(self, index: int) -> str | None:
        return self.processor.id_to_piece(index) if 0 <= index < self.vocab_size else None

    def save(self, directory: Path) -> None:
        (directory / SENTENCEPIECE_FILE).write_bytes(self.model_proto)

    @classmethod
    def load(cls, directory: Path) -> _SentencePieceBackend:
        path = directory / SENTENCEPIECE_FILE
        _require_file(path, "a sentencepiece model")
        return cls(path.read_bytes())


_BACKENDS = {b.kind: b for b in (_TokenizersBackend, _SentencePieceBackend)}
_Backend = _TokenizersBackend | _SentencePieceBackend


# --------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Text to ``{"input_ids", "attention_mask"}`` tensors, following saved settings exactly.

    Build one with a constructor (:meth:`clip_bpe`, :meth:`from_sentencepiece`,
    :meth:`from_hf_dir`, :meth:`from_open_clip`, :meth:`from_file`, :func:`train_bpe`) or load a
    saved one with :meth:`from_pretrained`.
    """

    def __init__(self, backend: _Backend, settings: TokenizerSettings) -> None:
        self._backend = backend
        self._settings = settings
        self._validate()

    def _validate(self) -> None:
        s, size = self._settings, self._backend.vocab_size
        if s.backend != self._backend.kind:
            raise ValueError(
                f"settings say backend {s.backend!r} but the vocabulary is {self._backend.kind!r}"
            )
        if s.padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {s.padding!r}")
        n_special = (s.bos_id is not None) + (s.eos_id is not None)
        if s.context_length <= n_special:
            raise ValueError(f"context_length {s.context_length} leaves no room for text tokens")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(s, name)
            if value is not None and not 0 <= value < size:
                raise ValueError(f"{name}={value} is outside the vocabulary (size {size})")

    # ---- text to ids -----------------------------------------------------------------------

    def prepare_text(self, text: str) -> str:
        """The Python-side normalisation applied before the backend (NFC always)."""
        return normalize_text(
            text, canonicalize=self._settings.canonicalize, lowercase=self._settings.lowercase
        )

    def _add_specials(self, pieces: list[int]) -> list[int]:
        s = self._settings
        head = [s.bos_id] if s.bos_id is not None else []
        tail = [s.eos_id] if s.eos_id is not None else []
        room = s.context_length - len(head) - len(tail)
        if len(pieces) > room:
            if not s.truncation:
                raise ValueError(
                    f"text has {len(pieces)} tokens, more than the {room} that fit in "
                    f"context_length {s.context_length}, and truncation is off"
                )
            pieces = pieces[:room]  # cut the text, never the EOS
        return head + pieces + tail

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text with BOS/EOS as set and truncation applied, without padding."""
        prepared = [self.prepare_text(t) for t in texts]
        return [self._add_specials(p) for p in self._backend.encode_batch(prepared)]

    def encode(self, text: str) -> list[int]:
        """Ids of one text with BOS/EOS as set and truncation applied, without padding."""
        return self.encode_batch([text])[0]

    def pieces(self, text: str) -> list[int]:
        """Ids of one text alone: no BOS/EOS, no truncation."""
        return self._backend.encode_batch([self.prepare_text(text)])[0]

    def add_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Make each of ``tokens`` one whole token (matched in the text before the model's own
        pieces, as Hugging Face's added tokens); returns their ids. Tokens already in the
        vocabulary keep their id."""
        if not isinstance(self._backend, _TokenizersBackend):
            raise TypeError(f"adding tokens needs a tokenizers (tokenizer.json) vocabulary; this "
                            f"one is {self._backend.kind}")
        from tokenizers import AddedToken

        fresh = [t for t in dict.fromkeys(tokens) if self.token_to_id(t) is None]
        self._backend.tokenizer.add_tokens([AddedToken(t, normalized=False) for t in fresh])
        return [self.token_to_id(t) for t in tokens]  # type: ignore[misc]

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize and pad: ``input_ids`` and ``attention_mask``, both ``Long[B, L]``."""
        if isinstance(texts, str):
            texts = [texts]
        rows = self.encode_batch(texts)
        if self._settings.padding == "max_length":
            length = self._settings.context_length
        else:
            length = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), length), self._settings.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- ids to text -----------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids; special tokens are dropped and anything after the first EOS is
        treated as padding (CLIP pads with id 0, which is the ordinary token "!")."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        eos = self._settings.eos_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        bos = self._settings.bos_id
        ids = [i for i in ids if i != bos]
        return self._backend.decode(ids)

    def batch_decode(self, rows: Iterable[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` for each row."""
        return [self.decode(row) for row in rows]

    # ---- facts -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def pad_id(self) -> int:
        return self._settings.pad_id

    @property
    def eos_id(self) -> int | None:
        return self._settings.eos_id

    @property
    def bos_id(self) -> int | None:
        return self._settings.bos_id

    @property
    def context_length(self) -> int:
        return self._settings.context_length

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, None when absent."""
        return self._backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """Vocabulary entry of an id, None when out of range."""
        return self._backend.id_to_token(index)

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings (what ``imagefm_tokenizer.json`` holds)."""
        return self._settings.to_dict()

    def with_settings(self, **changes: Any) -> Tokenizer:
        """The same vocabulary with some settings changed, e.g. ``with_settings(pad_id=49407)``."""
        merged = TokenizerSettings.from_dict({**self.settings(), **changes})
        return Tokenizer(self._backend, merged)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, {self._settings})"

    # ---- saving and loading ----------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the vocabulary (tokenizer.json, or spiece.model for sentencepiece) and settings."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)
        text = json.dumps(self.settings(), indent=2, ensure_ascii=False)
        (directory / SETTINGS_FILE).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, settings: dict[str, Any] | None = None
    ) -> Tokenizer:
        """Load what :meth:`save_pretrained` wrote. ``settings`` (e.g. from a checkpoint's
        imagefm.json) replace the directory's ``imagefm_tokenizer.json`` when given."""
        directory = Path(directory)
        if settings is None:
            path = directory / SETTINGS_FILE
            _require_file(
                path,
                "imagefm tokenizer settings written by Tokenizer.save_pretrained "
                "(for a Hugging Face checkpoint directory use Tokenizer.from_hf_dir)",
            )
            settings = _read_json(path)
        parsed = TokenizerSettings.from_dict(settings)
        if parsed.backend not in _BACKENDS:
            raise ValueError(f"unknown tokenizer backend {parsed.backend!r} in {directory}")
        return cls(_BACKENDS[parsed.backend].load(directory), parsed)

    # ---- constructors ----------------------------------------------------------------------

    @classmethod
    def from_file(cls, tokenizer_json_path: str | Path, **settings: Any) -> Tokenizer:
        """A `tokenizers` tokenizer.json plus explicit settings (keyword names of
        :class:`TokenizerSettings`; defaults: 77 tokens, padded to max_length with id 0, no
        BOS/EOS)."""
        backend = _TokenizersBackend(_load_tokenizer_json(Path(tokenizer_json_path)))
        return cls(backend, TokenizerSettings.from_dict({**settings, "backend": "tokenizers"}))

    @classmethod
    def clip_bpe(
        cls,
        vocab_json: str | Path | None = None,
        merges_txt: str | Path | None = None,
        *,
        bpe_gz: str | Path | None = None,
        context_length: int = 77,
    ) -> Tokenizer:
        """OpenAI CLIP's byte-level BPE, from HF-style vocab.json + merges.txt or from OpenAI's
        ``bpe_simple_vocab_16e6.txt.gz``. Pads with 0 as open_clip does (CLIP pools at the EOS,
        so the pad id does not change its outputs)."""
        if bpe_gz is not None:
            if vocab_json is not None or merges_txt is not None:
                raise ValueError("give either vocab_json + merges_txt or bpe_gz, not both")
            vocab, merges = clip_vocab_from_bpe_gz(bpe_gz)
        elif vocab_json is not None and merges_txt is not None:
            vocab, merges = _read_vocab_json(Path(vocab_json)), _read_merges_txt(Path(merges_txt))
        else:
            raise ValueError(
                "clip_bpe needs vocab_json and merges_txt, or bpe_gz "
                "(or use Tokenizer.from_open_clip to find open_clip's shipped vocabulary)"
            )
        backend = _TokenizersBackend(_clip_pipeline(vocab, merges))
        settings = TokenizerSettings(
            context_length=context_length,
            padding="max_length",
            pad_id=0,
            bos_id=_required_id(backend, CLIP_BOS),
            eos_id=_required_id(backend, CLIP_EOS),
        )
        return cls(backend, settings)

    @classmethod
    def from_open_clip(cls, context_length: int = 77) -> Tokenizer:
        """CLIP BPE from the vocabulary file that the installed ``open_clip_torch`` ships."""
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"open_clip is not installed, so its {OPEN_CLIP_BPE_FILE} cannot be found; "
                "install open_clip_torch or pass the file to Tokenizer.clip_bpe(bpe_gz=...)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / OPEN_CLIP_BPE_FILE
        _require_file(path, "OpenAI CLIP BPE merges shipped by open_clip_torch")
        return cls.clip_bpe(bpe_gz=path, context_length=context_length)

    @classmethod
    def from_sentencepiece(
        cls,
        spiece_model_path: str | Path,
        *,
        context_length: int = 64,
        canonicalize: bool = True,
        lowercase: bool | None = None,
    ) -> Tokenizer:
        """SigLIP's tokenizer: a sentencepiece model, text canonicalised and lower-cased, EOS
        appended (no BOS), padded to ``context_length`` with the EOS id as HF's SiglipTokenizer
        does. ``lowercase`` defaults to ``canonicalize``."""
        path = Path(spiece_model_path)
        _require_file(path, "a sentencepiece model (spiece.model)")
        backend = _SentencePieceBackend(path.read_bytes())
        eos = backend.processor.eos_id()
        if eos < 0:
            raise ValueError(f"sentencepiece model {path} has no EOS piece; SigLIP appends one")
        settings = TokenizerSettings(
            context_length=context_length,
            padding="max_length",
            pad_id=eos,
            eos_id=eos,
            canonicalize=canonicalize,
            lowercase=canonicalize if lowercase is None else lowercase,
            backend="sentencepiece",
        )
        return cls(backend, settings)

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """A Hugging Face CLIP or SigLIP checkpoint directory (tokenizer.json, vocab.json +
        merges.txt, or spiece.model; with tokenizer_config.json / special_tokens_map.json).

        Settings come from those files: ``tokenizer_class`` picks the CLIP (BOS + EOS) or SigLIP
        (canonicalise, EOS) rule; special tokens and ``model_max_length`` give ids and length.
        SigLIP 2 ships Gemma's tokenizer (``Siglip2Tokenizer``, or ``GemmaTokenizer`` next to a
        config.json whose model_type is ``siglip``/``siglip2``): lower-cased, no BOS, ``<eos>``
        appended, padded with ``<pad>`` to 64 tokens, as it was trained (big_vision) and as
        transformers' ``Siglip2Tokenizer`` does. (transformers' AutoTokenizer gives the plain
        GemmaTokenizer, which does not lower-case, for the fixed-resolution ``siglip`` ones.)
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory (expected an HF checkpoint)")
        config = _read_json_if_present(directory / "tokenizer_config.json")
        config.update(_read_json_if_present(directory / "special_tokens_map.json"))
        tokenizer_class = str(config.get("tokenizer_class", "")).lower()
        model_type = _read_json_if_present(directory / "config.json").get("model_type")
        is_siglip2 = tokenizer_class.startswith("siglip2") or (
            tokenizer_class.startswith("gemma") and model_type in ("siglip", "siglip2"))
        is_siglip = tokenizer_class.startswith("siglip") and not is_siglip2
        is_clip = tokenizer_class.startswith("clip")

        backend = _backend_from_hf_dir(directory, prefer_sentencepiece=is_siglip, clip=is_clip)
        if is_siglip and backend.kind != "sentencepiece":
            raise ValueError(f"{directory}: SiglipTokenizer needs {SENTENCEPIECE_FILE}")

        def special_id(key: str, default: str | None) -> int | None:
            token = _token_content(config.get(key, default))
            return None if token is None else _required_id(backend, token, directory)

        default_length = 64 if is_siglip or is_siglip2 else 77
        length = config.get("model_max_length", default_length)
        # HF writes a huge sentinel when no length was set.
        if not isinstance(length, int) or length >= 100_000:
            length = default_length
        context_length = length
        if is_clip:
            eos_id = special_id("eos_token", CLIP_EOS)
            settings = TokenizerSettings(
                context_length=context_length,
                pad_id=special_id("pad_token", CLIP_EOS),
                bos_id=special_id("bos_token", CLIP_BOS),
                eos_id=eos_id,
                lowercase=False,  # CLIP's backend normaliser lower-cases
            )
        elif is_siglip2:
            settings = TokenizerSettings(
                context_length=context_length,
                pad_id=special_id("pad_token", "<pad>"),
                bos_id=special_id("bos_token", "<bos>") if config.get("add_bos_token") else None,
                eos_id=(special_id("eos_token", "<eos>")
                        if config.get("add_eos_token", True) else None),
                lowercase=bool(config.get("do_lower_case", True)),
                backend=backend.kind,
            )
        elif is_siglip:
            eos_id = special_id("eos_token", "</s>")
            settings = TokenizerSettings(
                context_length=context_length,
                pad_id=special_id("pad_token", "</s>"),
                eos_id=eos_id,
                canonicalize=True,
                lowercase=bool(config.get("do_lower_case", True)),
                backend="sentencepiece",
            )
        else:
            # Another family: follow the config's explicit flags, nothing inferred.
            bos_id = special_id("bos_token", None) if config.get("add_bos_token") else None
            eos_id = special_id("eos_token", None) if config.get("add_eos_token") else None
            pad_id = special_id("pad_token", None)
            settings = TokenizerSettings(
                context_length=context_length,
                padding="longest",
                pad_id=pad_id if pad_id is not None else (eos_id or 0),
                bos_id=bos_id,
                eos_id=eos_id,
                lowercase=bool(config.get("do_lower_case", False)),
                backend=backend.kind,
            )
        return cls(backend, settings)


# --------------------------------------------------------------------------------------------
# Training a bilingual byte-level BPE
# --------------------------------------------------------------------------------------------


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    context_length: int = 77,
    min_frequency: int = 2,
    lowercase: bool = True,
    padding: str = "max_length",
) -> Tokenizer:
    """Train a byte-level BPE (e.g. on English + Korean captions), CLIP-style: BOS + tokens + EOS.

    Specials are ``<|startoftext|>``, ``<|endoftext|>``, ``<pad>`` (ids 0, 1, 2). Byte-level
    pieces mean any text, emoji included, encodes without an unknown token; the GPT-2 style
    pre-tokeniser keeps a Hangul word together so frequent Korean words become single tokens.
    Texts are normalised exactly as they will be at encode time (NFC, lower-case if set).
    """
    specials = [CLIP_BOS, CLIP_EOS, PAD_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} must exceed 256 bytes + {len(specials)} specials"
        )
    backend = HFTokenizer(BPE())
    backend.normalizer = normalizers.NFC()  # tokenizer.json stays correct when used on its own
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    prepared = (normalize_text(t, canonicalize=False, lowercase=lowercase) for t in texts)
    backend.train_from_iterator(prepared, trainer=trainer)
    wrapped = _TokenizersBackend(backend)
    settings = TokenizerSettings(
        context_length=context_length,
        padding=padding,
        lowercase=lowercase,
        pad_id=_required_id(wrapped, PAD_TOKEN),
        bos_id=_required_id(wrapped, CLIP_BOS),
        eos_id=_required_id(wrapped, CLIP_EOS),
    )
    return Tokenizer(wrapped, settings)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def normalize_text(text: str, *, canonicalize: bool = False, lowercase: bool = False) -> str:
    """NFC (always), then optional canonicalisation and lower-casing, as settings say."""
    if not isinstance(text, str):
        raise TypeError(f"tokenizer input must be str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    if canonicalize:
        text = canonicalize_text(text)
    if lowercase:
        text = text.lower()
    return text


def canonicalize_text(text: str) -> str:
    """SigLIP / big_vision clean-up as in HF's SiglipTokenizer: ASCII punctuation removed,
    whitespace runs collapsed to one space, ends stripped (lower-casing is a separate setting)."""
    text = text.translate(_PUNCTUATION_TABLE)
    return _WHITESPACE.sub(" ", text).strip()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: each byte maps to a printable character. Printable bytes
    keep their own character and come first (CLIP's vocabulary follows this order); the others
    get code points from 256 up, in byte order."""
    byte_values = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    code_points = list(byte_values)
    next_free = 256
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(next_free)
            next_free += 1
    return dict(zip(byte_values, map(chr, code_points), strict=True))


def clip_vocab_from_bpe_gz(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``: 256 byte
    characters, the same with ``</w>``, one entry per merge, then the two specials."""
    path = Path(path)
    _require_file(path, "OpenAI CLIP BPE merges (bpe_simple_vocab_16e6.txt.gz)")
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a gzip-compressed UTF-8 merges file: {exc}") from exc
    merges = [_parse_merge(line, path) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    if len(merges) != CLIP_NUM_MERGES:
        raise ValueError(f"{path} holds {len(merges)} merges, CLIP needs {CLIP_NUM_MERGES}")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + CLIP_END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def _clip_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]) -> HFTokenizer:
    """The `tokenizers` pipeline equal to OpenAI CLIP's tokenizer (as HF's CLIP tokenizer.json):
    NFC, whitespace runs to one space, lower-case; split by CLIP's regex; byte-level BPE whose
    word-final pieces end in ``</w>``; unknown pieces map to ``<|endoftext|>``."""
    model = BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix=CLIP_END_OF_WORD,
        unk_token=CLIP_EOS,
        fuse_unk=False,
    )
    tokenizer = HFTokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True: the regex matches are the pieces; whatever lies between is dropped.
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Text that spells a special token maps to its id, as in HF and OpenAI CLIP.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (CLIP_BOS, CLIP_EOS)]
    )
    return tokenizer


def _backend_from_hf_dir(directory: Path, *, prefer_sentencepiece: bool, clip: bool) -> _Backend:
    tokenizer_json = directory / TOKENIZER_JSON
    vocab_json, merges_txt = directory / "vocab.json", directory / "merges.txt"
    spiece = directory / SENTENCEPIECE_FILE
    if prefer_sentencepiece and spiece.is_file():
        return _SentencePieceBackend(spiece.read_bytes())
    if tokenizer_json.is_file():
        return _TokenizersBackend(_load_tokenizer_json(tokenizer_json))
    if clip and vocab_json.is_file() and merges_txt.is_file():
        vocab, merges = _read_vocab_json(vocab_json), _read_merges_txt(merges_txt)
        return _TokenizersBackend(_clip_pipeline(vocab, merges))
    if spiece.is_file():
        return _SentencePieceBackend(spiece.read_bytes())
    raise FileNotFoundError(
        f"no tokenizer in {directory}: expected {TOKENIZER_JSON}, vocab.json + merges.txt "
        f"(CLIP), or {SENTENCEPIECE_FILE} (SigLIP)"
    )


def _required_id(backend: _Backend, token: str, where: Path | str = "the vocabulary") -> int:
    index = backend.token_to_id(token)
    if index is None:
        raise ValueError(f"special token {token!r} is not in {where}")
    return index


def _token_content(value: Any) -> str | None:
    """HF configs store special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _parse_merge(line: str, path: Path) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{path}: expected a merge 'left right', got {line!r}")
    return parts[0], parts[1]


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    _require_file(path, "BPE merges (merges.txt, one 'left right' pair per line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [_parse_merge(line, path) for line in lines if line and not line.startswith("#version")]


def _read_vocab_json(path: Path) -> dict[str, int]:
    _require_file(path, "a BPE vocabulary (vocab.json, token -> id)")
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{path}: expected a JSON object mapping tokens to integer ids")
    return vocab


def _load_tokenizer_json(path: Path) -> HFTokenizer:
    _require_file(path, "a Hugging Face tokenizers file (tokenizer.json)")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust error alone does not say which file
        raise ValueError(f"could not read {path} as a tokenizers tokenizer.json: {exc}") from exc


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {what}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _read_json_if_present(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}
