"""Readers and writers for the on-disk forms a dataset takes.

* WebDataset tar shards: ``<key>.<image_ext>`` + ``<key>.json`` (``Record.to_json()``) + optional
  ``<key>.mask.png``. Shards written by others in the plain WebDataset style (e.g. CIFAR-10 as
  ``NNNNNN.jpg`` + ``NNNNNN.cls``, captions as ``<key>.txt``) are read too.
* CSV / JSONL caption files: ``image,caption[,lang]``, image paths relative to the file.
* Image folders: one sub-folder per class.
* LLaVA-style conversation JSON: ``[{"id", "image", "conversations": [{"from", "value"}]}]``.

Readers never decode images (that is the loader's job, with ``open_image``); they hand out
``Record``s holding the encoded bytes. Problems with one item raise ``RecordError`` (with a
short ``reason`` used for counting) or are counted in a ``SkipCounter`` and skipped.
"""

from __future__ import annotations

import csv
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

from imagefm.data.records import Caption, Record, Turn

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)
MASK_EXT = "mask.png"
CLASSES_FILE = "classes.json"


class RecordError(ValueError):
    """One sample cannot be turned into a Record; ``reason`` is a short label for skip counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ShardReadError(OSError):
    """A shard file is unreadable (truncated or not a tar); the samples before the damage stand."""


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
    """Shard paths from a directory (all ``*.tar`` below it), one file, a glob, or a list."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return sorted(p for p in path.rglob("*.tar") if p.is_file())
        if path.is_file():
            return [path]
        matches = sorted(Path(p) for p in _glob(str(source)))
        if not matches:
            raise FileNotFoundError(f"no shards found at {source}")
        return matches
    return [p for item in source for p in list_shards(item)]


def _glob(pattern: str) -> list[str]:
    import glob

    return glob.glob(pattern)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.mask.png`` → (``dir/abc``, ``mask.png``): keys end at the basename's first dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as dicts ``{"__key__", "__url__", ext: bytes...}``.

    Members of one sample are consecutive in a WebDataset tar. A truncated or broken tar raises
    ``ShardReadError`` after the complete samples before the damage.
    """
    path = Path(path)
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if not ext or key.startswith(".") or "/." in key:
                    continue  # hidden files and extension-less members are not samples
                if current is not None and current["__key__"] != key:
                    yield current  # a new key: the previous sample is complete
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": str(path)}
                handle = tar.extractfile(info)
                current[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        # The sample being read when the damage hit may lack members: it is dropped.
        raise ShardReadError(f"{path}: unreadable shard ({err})") from err
    if current is not None:
        yield current


def _image_member(sample: dict[str, Any]) -> tuple[str | None, bytes | None]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None, None


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("invalid utf-8", f"{where}: invalid UTF-8 ({err})") from err


def sample_to_record(sample: dict[str, Any], classes: list[str] | None = None) -> Record:
    """A Record from one tar sample: our ``.json`` layout, or plain ``.cls``/``.txt`` members."""
    key = sample["__key__"].replace("/", "_")
    where = f"{sample.get('__url__', '?')}:{sample['__key__']}"
    ext, image = _image_member(sample)
    if "json" in sample:
        text = _utf8(sample["json"], where + ".json")
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return Record.from_json(key, data, image=image, image_ext=ext or data.get("image_ext"),
                                    mask=sample.get(MASK_EXT))
        except (ValueError, TypeError) as err:
            raise RecordError("bad json", f"{where}.json: not a record ({err})") from err
    record = Record(key=key, image=image, image_ext=ext or "png", mask=sample.get(MASK_EXT))
    if "cls" in sample:
        text = _utf8(sample["cls"], where + ".cls").strip()
        try:
            record.label = int(text)
        except ValueError as err:
            raise RecordError("bad label", f"{where}.cls: not a class index: {text!r}") from err
        if classes is not None and 0 <= record.label < len(classes):
            record.label_name = classes[record.label]
    for name in ("txt", "caption"):
        if name in sample:
            record.captions.append(Caption(_utf8(sample[name], f"{where}.{name}")))
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
    """All records of the shards in ``source`` in order (images stay encoded).

    With ``skips`` bad samples and broken shards are counted and skipped; without it they raise.
    """
    for shard in list_shards(source):
        classes = read_classes(shard)
        try:
            for sample in iter_tar_samples(shard):
                try:
                    yield sample_to_record(sample, classes)
                except RecordError as err:
                    if skips is None:
                        raise
                    skips.add(err.reason, str(err))
        except ShardReadError as err:
            if skips is None:
                raise
            skips.add("unreadable shard", str(err))


# ---------------------------------------------------------------- local files


def _read_bytes(path: Path, skips: SkipCounter | None) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as err:
        if skips is None:
            raise
        skips.add("missing image", f"{path}: {err.strerror or err}")
        return None


def _relative_key(path: Path, root: Path) -> str:
    return safe_key(path.relative_to(root).with_suffix("").as_posix().replace("/", "-"),
                    unique=True)


def read_image_folder(root: str | Path, skips: SkipCounter | None = None,
                      split: str = "train") -> Iterator[Record]:
    """Images under ``root``, one sub-folder per class (labels in sorted folder order).

    Images directly in ``root`` (no class folders) come without a label.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups: list[tuple[int | None, str | None, Path]] = [(None, None, root)]
    groups += [(i, name, root / name) for i, name in enumerate(classes)]
    for label, name, folder in groups:
        files = folder.glob("*") if label is None else folder.rglob("*")
        for path in sorted(files):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = _read_bytes(path, skips)
            if data is None:
                continue
            yield Record(key=_relative_key(path, root), image=data,
                         image_ext=path.suffix.lower().lstrip("."), label=label, label_name=name,
                         split=split, meta={"path": str(path.relative_to(root))})


def _caption_rows(path: Path) -> Iterator[dict[str, str]]:
    raw = path.read_bytes()
    text = _utf8(raw, str(path)).lstrip("\ufeff")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise RecordError("bad json", f"{path}:{number}: {err}") from err
                yield {k: ("" if v is None else str(v)) for k, v in row.items()}
    else:
        for row in csv.DictReader(io.StringIO(text)):
            yield {k.strip(): (v or "") for k, v in row.items() if k is not None}


def read_caption_file(path: str | Path, skips: SkipCounter | None = None,
                      default_lang: str = "en", split: str = "train") -> Iterator[Record]:
    """Records from a CSV or JSONL file of ``image,caption[,lang]`` rows.

    Image paths are relative to the file. Several rows for one image become one record with
    several captions (first-seen order). Rows with an empty caption add nothing; images left
    without captions still come out (the loader decides whether that matters).
    """
    path = Path(path)
    base = path.parent
    order: list[str] = []
    captions: dict[str, list[Caption]] = {}
    for number, row in enumerate(_caption_rows(path), 1):
        image = row.get("image", "").strip()
        if not image:
            if skips is None:
                raise RecordError("no image", f"{path}:{number}: row has no 'image' column value")
            skips.add("no image", f"{path}:{number}: row has no image")
            continue
        if image not in captions:
            order.append(image)
            captions[image] = []
        text = row.get("caption", "")
        if text.strip():
            captions[image].append(Caption(text.strip(), row.get("lang", "").strip()
                                           or default_lang))
    for image in order:
        image_path = base / image
        data = _read_bytes(image_path, skips)
        if data is None:
            continue
        key = safe_key(Path(image).with_suffix("").as_posix().replace("/", "-"), unique=True)
        yield Record(key=key, image=data,
                     image_ext=image_path.suffix.lower().lstrip(".") or "png",
                     captions=captions[image], split=split, meta={"path": image})


def _export_image(record: Record, image_dir: Path) -> str:
    image_dir.mkdir(parents=True, exist_ok=True)
    name = f"{record.key}.{record.image_ext}"
    (image_dir / name).write_bytes(record.image or b"")
    return name


def write_caption_file(records: Iterable[Record], path: str | Path,
                       image_dir: str | Path | None = None) -> Path:
    """Write records as a CSV (or ``.jsonl``) caption file plus their images.

    Images go to ``image_dir`` (default ``images/`` beside the file); one row per caption.
    """
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    rows = []
    for record in records:
        name = _export_image(record, image_dir)
        relative = os.path.relpath(image_dir / name, path.parent)
        for caption in record.captions:
            rows.append({"image": relative, "caption": caption.text, "lang": caption.lang})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=["image", "caption", "lang"])
            writer.writeheader()
            writer.writerows(rows)
    return path


# ---------------------------------------------------------------- LLaVA conversations

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
LLAVA_NAMES = {v: k for k, v in LLAVA_ROLES.items()}


def read_llava_json(path: str | Path, image_root: str | Path | None = None,
                    skips: SkipCounter | None = None, split: str = "train") -> Iterator[Record]:
    """Records from a LLaVA conversation file (human → user, gpt → assistant).

    ``image`` paths are relative to ``image_root`` (default: the file's folder); entries without
    an image give text-only records.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    entries = json.loads(_utf8(path.read_bytes(), str(path)))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        try:
            turns = [Turn(LLAVA_ROLES[m["from"]], m["value"]) for m in entry["conversations"]]
        except (KeyError, TypeError, ValueError) as err:
            if skips is None:
                raise RecordError("bad conversation", f"{where}: {err!r}") from err
            skips.add("bad conversation", f"{where}: {err!r}")
            continue
        record = Record(key=safe_key(str(entry.get("id", index)), unique=True), conversation=turns,
                        split=split)
        image = entry.get("image")
        if isinstance(image, list):  # some sets list images; a Record holds one
            if len(image) != 1:
                if skips is None:
                    raise RecordError("several images", f"{where}: {len(image)} images")
                skips.add("several images", f"{where}: {len(image)} images")
                continue
            image = image[0]
        if image:
            data = _read_bytes(root / image, skips)
            if data is None:
                continue
            record.image = data
            record.image_ext = Path(image).suffix.lower().lstrip(".") or "png"
            record.meta["path"] = image
        yield record


def write_llava_json(records: Iterable[Record], path: str | Path,
                     image_dir: str | Path | None = None) -> Path:
    """Write conversation records as LLaVA JSON; images go to ``image_dir`` (default images/)."""
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    entries = []
    for record in records:
        entry: dict[str, Any] = {"id": record.key}
        if record.image is not None:
            entry["image"] = os.path.relpath(image_dir / _export_image(record, image_dir),
                                             path.parent)
        entry["conversations"] = [{"from": LLAVA_NAMES[t.role], "value": t.content}
                                  for t in record.conversation]
        entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
