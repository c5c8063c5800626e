"""The inputs of a stream, cut into UNITS: pieces one reader reads from start to end.

Every input becomes a list of units, and the stream (``imagefm.data.stream``) only ever sees
units, so splitting, shuffling and resuming are written once for all of them:

* tar shards (``imagefm.data.shards`` specs): one unit per shard;
* CSV/TSV files in open_clip's convention (``--csv-img-key filepath --csv-caption-key title
  --csv-separator "\\t"``; image paths relative to the file) and JSONL files: one unit per
  ``rows_per_unit`` rows, found by one pass over the file that keeps only the byte offset where
  each unit starts;
* Hugging Face datasets: an ``imagefolder`` directory with ``metadata.jsonl``/``metadata.csv``
  (``file_name`` + text columns), parquet files (one unit per row group) and a dataset saved
  with ``save_to_disk`` (Arrow, memory-mapped; one unit per ``rows_per_unit`` rows).

A row becomes a ``Record`` through the unit's ``RowReader``: ``Columns`` (an image column and a
caption column) for the inputs above; other readers make rows of other shapes into records
(``jsonl_units``: the conversation files of ``imagefm.train.conversation_stream``).

Nothing is held in memory beyond the rows being read. A unit's ``records(skips, part, parts)``
yields ``Record``s with the image still encoded; with ``parts > 1`` it keeps every ``parts``-th
row from ``part`` (several streams sharing one unit when there are fewer units than streams).
Bad rows are counted in ``skips``; a unit that cannot be read at all counts once (by part 0).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from imagefm.config import ConfigError
from imagefm.data.formats import (
    RecordError,
    SkipCounter,
    expand_shard_spec,
    parse_captions,
    read_shard,
    safe_key,
    text_captions,
)
from imagefm.data.records import Record
from imagefm.data.shards import SPLIT_NAMES, is_remote

FORMATS = ("auto", "shards", "csv", "hf")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # HF imagefolder
ROWS_PER_UNIT = 1000


class Unit(Protocol):
    name: str

    def records(self, skips: SkipCounter, part: int = 0, parts: int = 1) -> Iterator[Record]: ...


@dataclass(frozen=True)
class InputOptions:
    """How to read an input (the ``data.options`` of the stream source that concern reading)."""

    format: str = "auto"
    split: str | None = "train"  # shard folders named by split, imagefolder/DatasetDict splits
    csv_img_key: str = "filepath"  # open_clip's defaults
    csv_caption_key: str = "title"
    csv_separator: str | None = None  # None: a tab when the header has one, else a comma
    hf_image_column: str = "image"
    hf_text_column: str = "text"
    lang: str = "en"  # the language of captions that do not say theirs
    rows_per_unit: int = ROWS_PER_UNIT

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format = {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.rows_per_unit < 1:
            raise ConfigError(f"rows_per_unit must be >= 1, got {self.rows_per_unit}")


def input_units(spec: str | Path, options: InputOptions | None = None) -> list[Unit]:
    """The units of one input: a shard spec, a CSV/TSV/JSONL file or a HF dataset (see above)."""
    options = options or InputOptions()
    fmt = options.format if options.format != "auto" else detect_format(str(spec))
    if fmt == "shards":
        return [ShardUnit(url, options.lang) for url in expand_shard_spec(spec, options.split)]
    if fmt == "csv":
        path = Path(spec)
        return text_table_units(path, options.csv_img_key, options.csv_caption_key,
                                options.csv_separator, options, base=path.parent)
    return hf_units(Path(spec), options)


def detect_format(spec: str) -> str:
    """``shards``, ``csv`` or ``hf`` from what ``spec`` names."""
    if "::" in spec or is_remote(spec) or "{" in spec:
        return "shards"
    path = Path(spec).expanduser()
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "csv"
    if path.suffix.lower() == ".parquet":
        return "hf"
    if path.is_dir():
        if _saved_dataset(path) or _metadata_file(path, None) is not None or (
                any(path.rglob("*.parquet")) and not any(path.rglob("*.tar"))):
            return "hf"
        splits = [d for d in path.iterdir() if d.is_dir() and _metadata_file(d, None)]
        if splits:
            return "hf"
    return "shards"


# --- tar shards ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardUnit:
    """One tar shard (any URL webdataset can open)."""

    name: str
    lang: str = "en"

    def records(self, skips: SkipCounter, part: int = 0, parts: int = 1) -> Iterator[Record]:
        return read_shard(self.name, skips, part=part, parts=parts, default_lang=self.lang)


# --- rows of a table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Columns:
    """Which columns hold the image (bytes, ``{"bytes", "path"}`` or a path) and the caption(s),
    and the folder relative image paths start from."""

    image: str
    text: str
    base: str
    lang: str = "en"

    def to_record(self, row: dict[str, Any], key: str, where: str) -> Record:
        return row_to_record(row, self, key, where)


class RowReader(Protocol):
    """Makes one row of a table a Record (``key`` is unique, ``where`` locates the row for
    messages); raises ``RecordError`` for a row that is not usable (skipped and counted).
    Picklable: it travels to DataLoader workers."""

    def to_record(self, row: dict[str, Any], key: str, where: str) -> Record: ...


def row_to_record(row: dict[str, Any], columns: Columns, key: str, where: str) -> Record:
    """A Record from one table row; a caption cell may hold a list (several captions or
    languages: strings or ``{"text", "lang"}``), also as JSON text."""
    image, path = _image_of(row.get(columns.image), Path(columns.base), where)
    text = row.get(columns.text)
    if isinstance(text, str):
        captions = text_captions(text, columns.lang, where)
    else:
        captions = parse_captions(text, columns.lang, where) if text is not None else []
    meta = {k: v for k, v in row.items() if k not in (columns.image, columns.text)
            and isinstance(v, (str, int, float, bool))}
    if path:
        meta["path"] = path
    return Record(key=key, image=image, image_ext=_image_ext(image, path), captions=captions,
                  meta=meta)


def _image_of(value: Any, base: Path, where: str) -> tuple[bytes, str]:
    """(encoded bytes, path or "") of an image cell."""
    if isinstance(value, dict):  # HF's Image feature: {"bytes", "path"}
        if value.get("bytes"):
            return bytes(value["bytes"]), str(value.get("path") or "")
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    if not isinstance(value, str) or not value.strip():
        raise RecordError("no image", f"{where}: no image in the row")
    path = value.strip()
    try:
        return (base / path).read_bytes(), path
    except OSError as err:
        raise RecordError("missing image", f"{where}: {base / path}: "
                          f"{err.strerror or err}") from err


def _image_ext(data: bytes, path: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix:
        return suffix
    for magic, ext in ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"),
                       (b"BM", "bmp")):
        if data.startswith(magic):
            return ext
    return "webp" if data[8:12] == b"WEBP" else "png"


class Table(Protocol):
    """What a RowsUnit reads its rows from: one per kind of table (picklable: it travels to
    DataLoader workers)."""

    path: str

    def rows(self, unit: RowsUnit) -> Iterator[dict[str, Any] | RecordError]: ...


@dataclass(frozen=True)
class RowsUnit:
    """Rows ``[start, start + count)`` of a table; ``where`` locates them for the table's
    reader (a byte offset, a row group); ``columns`` makes each row a Record."""

    name: str
    table: Table
    columns: RowReader
    start: int
    count: int
    where: int

    def records(self, skips: SkipCounter, part: int = 0, parts: int = 1) -> Iterator[Record]:
        stem = safe_key(Path(self.table.path).stem.split(".")[0] or "row", unique=True)
        try:
            for index, row in enumerate(self.table.rows(self)):
                if index % parts != part:
                    continue
                number = self.start + index
                try:
                    if isinstance(row, RecordError):
                        raise row
                    yield self.columns.to_record(row, f"{stem}-{number}",
                                                 f"{self.table.path}:{number}")
                except RecordError as err:
                    skips.add(err.reason, str(err))
        except (OSError, ValueError, csv.Error) as err:  # the file itself (pyarrow's errors too)
            if part == 0:
                skips.add("unreadable file", f"{self.name}: {err}")


# --- CSV / TSV / JSONL ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TextTable:
    """A CSV/TSV file (``separator``, ``fieldnames`` from its header) or a JSONL file."""

    path: str
    jsonl: bool
    separator: str = ","
    fieldnames: tuple[str, ...] = ()

    def _lines(self, offset: int, end: list[int] | None = None) -> Iterator[str]:
        """Lines from byte ``offset``; ``end[0]`` follows the byte after the last line given."""
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            position = offset
            for raw in handle:
                text = raw.decode("utf-8", errors="replace")
                if position == 0:
                    text = text.lstrip("\ufeff")
                position += len(raw)
                if end is not None:
                    end[0] = position  # before the line is handed out: the row ends here
                yield text

    def parse(self, offset: int, end: list[int] | None = None
              ) -> Iterator[dict[str, Any] | RecordError]:
        """Rows from ``offset``: dicts, or a RecordError for a bad row; blank lines are none.
        Lines are read only as rows need them, so ``end`` marks where the next row starts."""
        lines = self._lines(offset, end)
        if self.jsonl:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    yield RecordError("bad json", f"{err}: {line[:80]!r}")
                    continue
                yield row if isinstance(row, dict) else RecordError(
                    "bad json", f"not a JSON object: {line[:80]!r}")
            return
        for cells in csv.reader(lines, delimiter=self.separator):
            if not cells:
                continue
            if len(cells) != len(self.fieldnames):
                yield RecordError("bad row", f"{len(cells)} cells for {len(self.fieldnames)} "
                                  f"columns: {self.separator.join(cells)[:80]!r}")
            else:
                yield dict(zip(self.fieldnames, cells, strict=True))

    def rows(self, unit: RowsUnit) -> Iterator[dict[str, Any] | RecordError]:
        return islice(self.parse(unit.where), unit.count)


def text_table_units(path: Path, image_key: str, text_key: str, separator: str | None,
                     options: InputOptions, base: Path | None = None,
                     option_names: tuple[str, str] = ("csv_img_key", "csv_caption_key")
                     ) -> list[Unit]:
    """Units of ``options.rows_per_unit`` rows of a CSV/TSV/JSONL file (image paths relative to
    ``base``, default the file's folder). One pass over the file notes where each unit starts
    (a byte offset); nothing else is kept."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    table = TextTable(str(path), jsonl=path.suffix.lower() == ".jsonl")
    start = 0
    if not table.jsonl:
        with open(path, "rb") as handle:
            first = handle.readline()
        start = len(first)
        header = first.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
        if separator is None:
            separator = "\t" if "\t" in header else ","
        fieldnames = tuple(next(csv.reader([header], delimiter=separator), []))
        _check_columns(path, fieldnames, image_key, text_key, option_names)
        table = TextTable(str(path), False, separator, fieldnames)
    columns = Columns(image_key, text_key, str(base or path.parent), options.lang)
    return _offset_units(path, table, start, columns, options.rows_per_unit)


def jsonl_units(path: Path, reader: RowReader, rows_per_unit: int = ROWS_PER_UNIT
                ) -> list[Unit]:
    """Units of ``rows_per_unit`` rows of a JSONL file whose rows ``reader`` makes records
    (a row that is not a JSON object is counted as ``bad json``)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if rows_per_unit < 1:
        raise ConfigError(f"rows_per_unit must be >= 1, got {rows_per_unit}")
    return _offset_units(path, TextTable(str(path), jsonl=True), 0, reader, rows_per_unit)


def _offset_units(path: Path, table: TextTable, start: int, reader: RowReader,
                  rows_per_unit: int) -> list[Unit]:
    """The pass over a text table from byte ``start`` that notes where each unit starts."""
    units: list[Unit] = []
    end = [start]
    first_row, count, offset, row_start = 0, 0, start, start
    for _row in table.parse(start, end):
        if count == 0:
            offset = row_start
        count += 1
        if count == rows_per_unit:
            units.append(RowsUnit(f"{path}:{first_row}", table, reader, first_row, count,
                                  offset))
            first_row, count = first_row + count, 0
        row_start = end[0]  # the row just read ended here: the next one starts here
    if count:
        units.append(RowsUnit(f"{path}:{first_row}", table, reader, first_row, count, offset))
    return units


def _check_columns(path: Path | str, names: Any, image_key: str, text_key: str,
                   option_names: tuple[str, str]) -> None:
    for key, what, option in ((image_key, "image", option_names[0]),
                              (text_key, "caption", option_names[1])):
        if key not in names:
            raise ConfigError(f"{path}: no {what} column {key!r} (columns: "
                              f"{', '.join(names)}); name it with {option}")


# --- Hugging Face datasets -----------------------------------------------------------------------

HF_OPTIONS = ("hf_image_column", "hf_text_column")


def hf_units(path: Path, options: InputOptions) -> list[Unit]:
    """Units of a HF dataset: a ``save_to_disk`` folder, parquet files (a file, a folder or a
    glob) or an ``imagefolder`` with ``metadata.jsonl``/``metadata.csv``."""
    path = path.expanduser()
    if path.is_dir() and _saved_dataset(path):
        return arrow_units(path, options)
    metadata = _metadata_file(path, options.split) if path.is_dir() else None
    if metadata is not None:  # HF's imagefolder: images named in the file_name column
        return text_table_units(metadata, "file_name", options.hf_text_column, None, options,
                                base=metadata.parent, option_names=("(file_name)",
                                                                    "hf_text_column"))
    files = _parquet_files(path, options.split)
    if files:
        return parquet_units(files, options)
    raise FileNotFoundError(f"{path}: not a Hugging Face dataset (a save_to_disk folder, "
                            f"parquet files or an imagefolder with {' or '.join(METADATA_FILES)})")


def _saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _metadata_file(directory: Path, split: str | None) -> Path | None:
    for folder in ([directory / split] if split else []) + [directory]:
        for name in METADATA_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.rglob("*.parquet"))
        named = [f for f in found if split and _split_of(f.relative_to(path)) == split]
        if named or not any(_split_of(f.relative_to(path)) for f in found):
            return named or found  # files named by split: only this one's
        raise FileNotFoundError(f"no {split!r} parquet files in {path} (found "
                                f"{', '.join(str(f.relative_to(path)) for f in found[:5])})")
    import glob

    return sorted(Path(p) for p in glob.glob(str(path)) if p.endswith(".parquet"))


def _split_of(relative: Path) -> str | None:
    """The split a parquet file's path names, as the Hub lays them out: ``train/x.parquet``,
    ``data/train-00000-of-00002.parquet``."""

    for name in (*relative.parent.parts, relative.name):
        for split in SPLIT_NAMES:
            if name == split or name.startswith((f"{split}-", f"{split}.")):
                return split
    return None


@dataclass(frozen=True)
class ParquetTable:
    """A parquet file, read one row group (a unit) at a time in small record batches."""

    path: str
    columns: tuple[str, ...]

    def rows(self, unit: RowsUnit) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        handle = pq.ParquetFile(self.path)
        for batch in handle.iter_batches(batch_size=256, row_groups=[unit.where],
                                         columns=list(self.columns)):
            yield from batch.to_pylist()


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"reading this Hugging Face dataset needs {module.split('.')[0]}: "
                          "pip install 'imagefm[hf]'") from None


def parquet_units(files: list[Path], options: InputOptions) -> list[Unit]:
    """One unit per row group of each parquet file."""
    pq = _require("pyarrow.parquet")

    image, text = options.hf_image_column, options.hf_text_column
    units: list[Unit] = []
    for path in files:
        handle = pq.ParquetFile(path)
        metadata = handle.metadata
        _check_columns(path, handle.schema_arrow.names, image, text, HF_OPTIONS)
        table = ParquetTable(str(path), (image, text))
        columns = Columns(image, text, str(path.parent), options.lang)
        start = 0
        for group in range(metadata.num_row_groups):
            count = metadata.row_group(group).num_rows
            if count:
                units.append(RowsUnit(f"{path}:group{group}", table, columns, start, count,
                                      group))
            start += count
    return units


_OPENED: dict[str, Any] = {}  # datasets opened by this process (memory-mapped, not in RAM)


@dataclass(frozen=True)
class ArrowTable:
    """A dataset saved with ``save_to_disk`` (memory-mapped Arrow), read in slices."""

    path: str
    columns: tuple[str, ...]

    def dataset(self) -> Any:
        if self.path not in _OPENED:
            import datasets

            data = datasets.load_from_disk(self.path)
            _OPENED[self.path] = data.select_columns(list(self.columns)).with_format("arrow")
        return _OPENED[self.path]

    def rows(self, unit: RowsUnit) -> Iterator[dict[str, Any]]:
        data = self.dataset()
        for first in range(unit.where, unit.where + unit.count, 256):
            yield from data[first:min(first + 256, unit.where + unit.count)].to_pylist()


def arrow_units(path: Path, options: InputOptions) -> list[Unit]:
    """Units of ``options.rows_per_unit`` rows of a saved dataset (the ``split`` of a saved
    DatasetDict)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if options.split not in splits:
            raise ConfigError(f"{path}: no split {options.split!r} in this DatasetDict (splits: "
                              f"{', '.join(splits)}); choose one with the split option")
        path = path / str(options.split)
    image, text = options.hf_image_column, options.hf_text_column
    table = ArrowTable(str(path), (image, text))
    data = _require("datasets").load_from_disk(str(path))
    _check_columns(path, data.column_names, image, text, HF_OPTIONS)
    columns = Columns(image, text, str(path), options.lang)
    step = options.rows_per_unit
    return [RowsUnit(f"{path}:{first}", table, columns, first, min(step, data.num_rows - first),
                     first) for first in range(0, data.num_rows, step)]
