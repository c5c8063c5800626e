"""Records in WebDataset shards (writing and reading), and what every reader shares.

* WebDataset tar shards: ``<key>.<image_ext>`` + ``<key>.json`` (``Record.to_json()``) + optional
  ``<key>.mask.png``. Shards written by others in the plain WebDataset style (e.g. CIFAR-10 as
  ``NNNNNN.jpg`` + ``NNNNNN.cls``, captions as ``<key>.txt`` or ``<key>.<lang>.txt``) and by
  img2dataset (``jpg`` + ``txt`` + its metadata ``json``) are read too (``sample_to_record``).
  Shards are read by ``imagefm.data.shards`` (webdataset: braces, ``::``, ``pipe:``, http).
* CSV / JSONL caption files, image folders and LLaVA-style conversation JSON: see
  ``imagefm.data.files``; streamed inputs of any size (shards, CSV/TSV, Hugging Face datasets):
  ``imagefm.data.stream``.

Readers never decode images (that is the loader's job, with ``open_image``); they hand out
``Record``s holding the encoded bytes. Problems with one item raise ``RecordError`` (with a
short ``reason`` used for counting) or are counted in a ``SkipCounter`` and skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imagefm.data.records import Caption, Record
from imagefm.data.shards import (  # noqa: F401  (re-exported: the one reader)
    ShardReadError,
    expand_shard_spec,
    iter_tar_samples,
    local_path,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)
MASK_EXT = "mask.png"
CLASSES_FILE = "classes.json"


class RecordError(ValueError):
    """One sample cannot be turned into a Record; ``reason`` is a short label for skip counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SkipCounter:
    """Counts what was seen and what was skipped, by reason, and says so in one line.

    Long jobs never stop for one bad sample: they ``add`` it here and go on. The first few
    messages per reason are kept so the summary can name the files.
    """

    def __init__(self, keep_examples: int = 3) -> None:
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.keep_examples = keep_examples

    def ok(self, n: int = 1) -> None:
        """Count ``n`` samples that went through."""
        self.seen += n

    def add(self, reason: str, message: str = "") -> None:
        """Count one skipped sample (it was seen too)."""
        self.seen += 1
        self.skipped[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if message and len(kept) < self.keep_examples:
            kept.append(message)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: SkipCounter | dict[str, Any]) -> None:
        """Add another counter's numbers (or its ``as_dict()``), e.g. from a worker process."""
        data = other.as_dict() if isinstance(other, SkipCounter) else other
        self.seen += int(data.get("seen", 0))
        self.skipped.update(data.get("skipped", {}))
        for reason, messages in data.get("examples", {}).items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(messages[: max(0, self.keep_examples - len(kept))])

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.skipped),
                "examples": {k: list(v) for k, v in self.examples.items()}}

    def take(self) -> dict[str, Any]:
        """Return the counts so far and reset; lets workers ship deltas with their samples."""
        data = self.as_dict()
        self.seen, self.skipped, self.examples = 0, Counter(), {}
        return data

    def summary(self) -> str:
        """E.g. ``skipped 3 of 1000: 2 corrupt image, 1 empty caption``."""
        if not self.skipped:
            return f"skipped 0 of {self.seen}"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"skipped {self.total_skipped} of {self.seen}: {parts}"

    def report(self) -> str:
        """The summary plus example messages naming the files."""
        lines = [self.summary()]
        for reason, messages in self.examples.items():
            lines.extend(f"  {reason}: {m}" for m in messages)
        return "\n".join(lines)


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str, unique: bool = False) -> str:
    """A shard key from any text: WebDataset splits names at the first dot, so keys carry none.

    Characters other than ``A-Z a-z 0-9 _ -`` become ``_``. With ``unique``, a key that needed
    changes gets 8 hex digits of the text's SHA-1 appended, so ``view+`` and ``view-`` (or
    ``a.b`` and ``a_b``) stay distinct.
    """
    key = _UNSAFE_KEY_CHARS.sub("_", text).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}")
    if unique and key != text:
        key += "-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return key


# ---------------------------------------------------------------- WebDataset shards: writing


def record_members(record: Record) -> list[tuple[str, bytes]]:
    """The tar members (name, bytes) for one record in the standard layout."""
    if "." in record.key or "/" in record.key:
        raise ValueError(f"record key {record.key!r} must not contain '.' or '/' "
                         "(use imagefm.data.formats.safe_key)")
    members = []
    if record.image is not None:
        members.append((f"{record.key}.{record.image_ext}", record.image))
    text = json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True)
    members.append((f"{record.key}.json", text.encode("utf-8")))
    if record.mask is not None:
        members.append((f"{record.key}.{MASK_EXT}", record.mask))
    return members


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner and time: the same records always give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes records into numbered tar shards ``{prefix}-000000.tar``, ``-000001.tar``...

    Each shard is written as ``*.tar.tmp`` and renamed when complete, so a reader (or a crash)
    never sees half a shard. A new shard starts after ``max_samples`` records or ``max_bytes``.
    Use as a context manager; leaving the block with an error removes the unfinished shard.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_samples: int = 1000,
                 max_bytes: int | None = None) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[Path] = []
        self.count = 0
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self._bytes = 0

    def _open_next(self) -> None:
        final = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = final.with_name(final.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w")
        self._in_shard = 0
        self._bytes = 0

    def _finish_current(self) -> None:
        if self._tar is None or self._tmp is None:
            return
        self._tar.close()
        final = self._tmp.with_name(self._tmp.name[: -len(".tmp")])
        os.replace(self._tmp, final)
        self.shards.append(final)
        self._tar, self._tmp = None, None

    def write(self, record: Record) -> None:
        """Add one record; raises ``ValueError`` on a repeated key (a bug in the producer)."""
        if record.key in self._keys:
            raise ValueError(f"duplicate record key {record.key!r} in {self.out_dir}")
        members = record_members(record)
        size = sum(len(data) for _, data in members)
        full = self._in_shard >= self.max_samples or (
            self.max_bytes is not None and self._in_shard and self._bytes + size > self.max_bytes)
        if self._tar is not None and full:
            self._finish_current()
        if self._tar is None:
            self._open_next()
        assert self._tar is not None
        for name, data in members:
            _add_member(self._tar, name, data)
        self._keys.add(record.key)
        self._in_shard += 1
        self._bytes += size
        self.count += 1

    def close(self) -> list[Path]:
        """Finish the last shard; returns all shard paths written."""
        self._finish_current()
        return self.shards

    def abort(self) -> None:
        """Drop the unfinished shard (finished ones stay)."""
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar, self._tmp = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(records: Iterable[Record], out_dir: str | Path, prefix: str = "shard",
                 max_samples: int = 1000) -> list[Path]:
    """Write records into shards; returns the shard paths."""
    with ShardWriter(out_dir, prefix=prefix, max_samples=max_samples) as writer:
        for record in records:
            writer.write(record)
    return writer.shards


# ---------------------------------------------------------------- WebDataset shards: reading


def list_shards(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """Local shard paths from a directory (all ``*.tar`` below it), a file, a glob, a brace
    pattern, a ``::``-joined spec or a list (``imagefm.data.shards.expand_shard_spec``)."""
    urls = expand_shard_spec(source)
    remote = [u for u in urls if local_path(u) is None]
    if remote:
        raise ValueError(f"list_shards lists local shards only; got {remote[0]} (read remote "
                         "shards with read_shards or imagefm.data.stream)")
    return [Path(u) for u in urls]


def _image_member(sample: dict[str, Any]) -> tuple[str | None, bytes | None]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None, None


def utf8_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("invalid utf-8", f"{where}: invalid UTF-8 ({err})") from err


# What Record.to_json() writes: a <key>.json with only these keys is one of our records; any
# other JSON object is metadata (img2dataset writes url, key, status, caption, width, height,
# original_width, original_height, exif, sha256, error_message).
RECORD_JSON_KEYS = frozenset(
    {"image_ext", "captions", "label", "label_name", "conversation", "boxes", "split", "source",
     "license", "meta", "has_mask"})
_LANG_TEXT = re.compile(r"^([a-z]{2,3}(?:[-_][a-z0-9]+)?)\.txt$")  # ko.txt, en.txt, zh-hans.txt


def parse_captions(value: Any, default_lang: str = "en", where: str = "") -> list[Caption]:
    """Captions from a text field: a string, or a list of strings and/or ``{"text", "lang"}``
    objects (several captions or languages per image). Raises ``RecordError("bad caption")``."""
    items = value if isinstance(value, list) else [value]
    captions = []
    for item in items:
        if isinstance(item, str):
            captions.append(Caption(item, default_lang))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            lang = item.get("lang") or default_lang
            captions.append(Caption(item["text"], str(lang)))
        elif item is not None:
            raise RecordError("bad caption", f"{where}: a caption must be a string or "
                              f"{{\"text\", \"lang\"}}, got {item!r:.80}")
    return captions


def text_captions(text: str, lang: str = "en", where: str = "") -> list[Caption]:
    """Captions of one text field: a JSON list is several (``parse_captions``), any other text
    is one caption in ``lang``."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, list):
            return parse_captions(value, lang, where)
    return [Caption(text, lang)]


def sample_to_record(sample: dict[str, Any], classes: list[str] | None = None,
                     default_lang: str = "en") -> Record:
    """A Record from one tar sample, whatever the layout:

    * ours: ``<key>.json`` = ``Record.to_json()`` (everything but the image);
    * img2dataset: ``jpg``/``png``/``webp`` + ``txt`` + ``json`` holding its download metadata
      (kept in ``record.meta``; the caption comes from ``txt``, else the metadata's ``caption``);
    * plain WebDataset: ``cls`` (a class index, named by ``classes``), ``txt``/``caption``.

    Captions: ``txt`` is in ``default_lang``; ``<lang>.txt`` members (``ko.txt``) in theirs; a
    ``txt`` or a ``json`` holding a JSON list gives several (strings or ``{"text", "lang"}``).
    """
    key = sample["__key__"].replace("/", "_")
    where = f"{sample.get('__url__', '?')}:{sample['__key__']}"
    ext, image = _image_member(sample)
    data: Any = None
    if "json" in sample:
        try:
            data = json.loads(utf8_text(sample["json"], where + ".json"))
        except ValueError as err:
            if isinstance(err, RecordError):
                raise
            raise RecordError("bad json", f"{where}.json: not JSON ({err})") from err
        if not isinstance(data, (dict, list)):
            raise RecordError("bad json", f"{where}.json: not a record, metadata or a list of "
                              f"captions: {data!r:.80}")
    if isinstance(data, dict) and set(data) <= RECORD_JSON_KEYS:
        try:
            return Record.from_json(key, data, image=image, image_ext=ext or data.get("image_ext"),
                                    mask=sample.get(MASK_EXT))
        except (ValueError, TypeError) as err:
            raise RecordError("bad json", f"{where}.json: not a record ({err})") from err
    record = Record(key=key, image=image, image_ext=ext or "png", mask=sample.get(MASK_EXT))
    if isinstance(data, dict):
        record.meta = data
    elif isinstance(data, list):
        record.captions += parse_captions(data, default_lang, where + ".json")
    if "cls" in sample:
        text = utf8_text(sample["cls"], where + ".cls").strip()
        try:
            record.label = int(text)
        except ValueError as err:
            raise RecordError("bad label", f"{where}.cls: not a class index: {text!r}") from err
        if classes is not None and 0 <= record.label < len(classes):
            record.label_name = classes[record.label]
    for name in ("txt", "caption", *sorted(n for n in sample if _LANG_TEXT.match(n))):
        if name in sample:
            match = _LANG_TEXT.match(name)
            lang = match.group(1).replace("_", "-") if match else default_lang
            text = utf8_text(sample[name], f"{where}.{name}")
            record.captions += text_captions(text, lang, f"{where}.{name}")
    if not record.captions and isinstance(data, dict) and isinstance(data.get("caption"), str):
        record.captions.append(Caption(data["caption"], default_lang))
    return record


def read_classes(shard: Path) -> list[str] | None:
    """Class names from ``classes.json`` beside a shard (as CIFAR-10 ships), if present."""
    path = Path(shard).parent / CLASSES_FILE
    if not path.is_file():
        return None
    names = json.loads(path.read_text(encoding="utf-8"))
    return [str(n) for n in names]


def read_shards(source: str | Path | Iterable[str | Path],
                skips: SkipCounter | None = None) -> Iterator[Record]:
    """All records of the shards in ``source`` in order (images stay encoded). ``source`` is
    anything ``imagefm.data.shards.expand_shard_spec`` takes (paths, globs, braces, ``pipe:``...).

    With ``skips`` bad samples and broken shards are counted and skipped; without it they raise.
    """
    for url in expand_shard_spec(source):
        yield from read_shard(url, skips)


def read_shard(url: str, skips: SkipCounter | None = None, *, part: int = 0, parts: int = 1,
               default_lang: str = "en") -> Iterator[Record]:
    """The records of one shard; with ``parts > 1`` only every ``parts``-th sample from
    ``part`` (several readers sharing one shard). A broken shard is counted once, by part 0."""
    path = local_path(url)
    classes = read_classes(path) if path is not None else None
    try:
        for index, sample in enumerate(iter_tar_samples(url)):
            if index % parts != part:
                continue
            try:
                yield sample_to_record(sample, classes, default_lang)
            except RecordError as err:
                if skips is None:
                    raise
                skips.add(err.reason, str(err))
    except ShardReadError as err:
        if skips is None:
            raise
        if part == 0:
            skips.add("unreadable shard", str(err))
