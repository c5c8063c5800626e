"""The inputs of a stream, cut into UNITS: pieces one reader reads from start to end.

Every input becomes a list of units, and the stream (``imagefm.data.stream``) only ever sees
units, so splitting, shuffling and resuming are written once for all of them:

* tar shards (``imagefm.data.shards`` specs): one unit per shard;
* CSV/TSV files in open_clip's convention (``--csv-img-key filepath --csv-caption-key title
  --csv-separator "\\t"``; image paths relative to the file) and JSONL files: one unit per
  ``rows_per_unit`` rows, found by one pass over the file that keeps only the byte offset where
  each unit starts;
* Hugging Face datasets (imagefolder, parquet, ``save_to_disk``): ``imagefm.data.stream_hf``,
  on the table rows of this module.

``imagefm.data.stream.input_units`` picks the kind of an input and returns its units.

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
    parse_captions,
    read_shard,
    safe_key,
    text_captions,
)
from imagefm.data.records import Record

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
        check_columns(path, fieldnames, image_key, text_key, option_names)
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


def check_columns(path: Path | str, names: Any, image_key: str, text_key: str,
                   option_names: tuple[str, str]) -> None:
    for key, what, option in ((image_key, "image", option_names[0]),
                              (text_key, "caption", option_names[1])):
        if key not in names:
            raise ConfigError(f"{path}: no {what} column {key!r} (columns: "
                              f"{', '.join(names)}); name it with {option}")
