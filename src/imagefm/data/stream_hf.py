"""Hugging Face datasets as stream units (``imagefm.data.stream_units``): a dataset saved with
``save_to_disk`` (Arrow, memory-mapped; one unit per ``rows_per_unit`` rows), parquet files (one
unit per row group; a file, a folder or a glob, split-named as the Hub lays them out) and an
``imagefolder`` with ``metadata.jsonl``/``metadata.csv`` (``file_name`` + text columns, read as a
text table). ``datasets``/``pyarrow`` are imported only when such data is read
(``pip install 'imagefm[hf]'``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefm.config import ConfigError
from imagefm.data.shards import SPLIT_NAMES
from imagefm.data.stream_units import (
    METADATA_FILES,
    Columns,
    InputOptions,
    RowsUnit,
    Unit,
    check_columns,
    text_table_units,
)

HF_OPTIONS = ("hf_image_column", "hf_text_column")


def hf_units(path: Path, options: InputOptions) -> list[Unit]:
    """Units of a HF dataset: a ``save_to_disk`` folder, parquet files (a file, a folder or a
    glob) or an ``imagefolder`` with ``metadata.jsonl``/``metadata.csv``."""
    path = path.expanduser()
    if path.is_dir() and saved_dataset(path):
        return arrow_units(path, options)
    metadata = metadata_file(path, options.split) if path.is_dir() else None
    if metadata is not None:  # HF's imagefolder: images named in the file_name column
        return text_table_units(metadata, "file_name", options.hf_text_column, None, options,
                                base=metadata.parent, option_names=("(file_name)",
                                                                    "hf_text_column"))
    files = _parquet_files(path, options.split)
    if files:
        return parquet_units(files, options)
    raise FileNotFoundError(f"{path}: not a Hugging Face dataset (a save_to_disk folder, "
                            f"parquet files or an imagefolder with {' or '.join(METADATA_FILES)})")


def saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def metadata_file(directory: Path, split: str | None) -> Path | None:
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
        check_columns(path, handle.schema_arrow.names, image, text, HF_OPTIONS)
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
    check_columns(path, data.column_names, image, text, HF_OPTIONS)
    columns = Columns(image, text, str(path), options.lang)
    step = options.rows_per_unit
    return [RowsUnit(f"{path}:{first}", table, columns, first, min(step, data.num_rows - first),
                     first) for first in range(0, data.num_rows, step)]
