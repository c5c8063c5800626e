"""The index's source of truth: one SQLite file with every image's metadata *and* its vector.

Each indexing batch is one transaction (rows, vectors and a bumped ``generation`` together), so a
run killed at any moment loses at most the batch in flight, and the next run sees exactly which
files are done. The FAISS index is a cache derived from this table: its sidecar records the
generation it was saved at, and a mismatch means "rebuild from SQLite".

Row ids come from ``AUTOINCREMENT`` and are never reused, so a stale id (in a FAISS cache, a
result page, a thumbnail URL) can never point at a different file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,      -- relative to the root, '/' separators
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    added REAL NOT NULL,
    vector BLOB NOT NULL            -- float32, little-endian, unit length
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ImageRow:
    """An indexed image (without its vector)."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class NewImage:
    """An image to insert, with its vector."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    vector: np.ndarray


@dataclass(frozen=True)
class Commit:
    """What a transaction changed: ids inserted and removed, and the generation after it."""

    new_ids: list[int]
    removed_ids: list[int]
    generation: int


class StoreError(RuntimeError):
    """The SQLite file is missing, from a newer imagefm, or not an index."""


class Store:
    """Metadata and vectors of one index in SQLite (WAL mode; safe to read while indexing)."""

    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path} not found: not an image index (build one with "
                             "`imagefm index DIR --model M --out INDEX`)")
        if readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL is safe
        # The server reads from several threads; one connection behind a lock is plenty.
        self._lock = threading.RLock()
        if create:
            with self._lock, self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                 (str(SCHEMA_VERSION),))
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
        version = self.get_meta("schema_version")
        if version is None:
            raise StoreError(f"{self.path} is not an imagefm image index")
        if int(version) > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer imagefm (schema {version})")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, values: dict[str, str]) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    @property
    def generation(self) -> int:
        """Bumped by every change to the vectors; the FAISS cache is valid at one generation."""
        return int(self.get_meta("generation") or 0)

    # --- reads --------------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def file_states(self) -> dict[str, tuple[int, int, int, str]]:
        """``path → (id, size, mtime_ns, sha256)`` of every indexed image."""
        with self._lock:
            rows = self._db.execute("SELECT path, id, size, mtime_ns, sha256 FROM images")
            return {path: (id_, size, mtime, sha) for path, id_, size, mtime, sha in rows}

    def failure_states(self) -> dict[str, tuple[int, int]]:
        """``path → (size, mtime_ns)`` of files that failed to decode last time."""
        with self._lock:
            rows = self._db.execute("SELECT path, size, mtime_ns FROM failures")
            return {path: (size, mtime) for path, size, mtime in rows}

    def failures(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every file that could not be indexed."""
        with self._lock:
            return list(self._db.execute("SELECT path, reason FROM failures ORDER BY path"))

    def rows(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        """Rows by id (ids no longer present are simply absent)."""
        wanted = [int(i) for i in ids]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        with self._lock:
            found = self._db.execute(
                f"SELECT id, path, size, mtime_ns, sha256, width, height FROM images "
                f"WHERE id IN ({marks})", wanted).fetchall()
        return {row[0]: ImageRow(*row) for row in found}

    def row_by_path(self, path: str) -> ImageRow | None:
        with self._lock:
            row = self._db.execute("SELECT id, path, size, mtime_ns, sha256, width, height "
                                   "FROM images WHERE path = ?", (path,)).fetchone()
        return ImageRow(*row) if row else None

    def vector_by_hash(self, sha256: str) -> np.ndarray | None:
        """The vector of any image with this content (a copy or a moved file)."""
        with self._lock:
            row = self._db.execute("SELECT vector FROM images WHERE sha256 = ? LIMIT 1",
                                   (sha256,)).fetchone()
        return np.frombuffer(row[0], dtype="<f4").copy() if row else None

    def iter_vectors(self, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids [n], vectors [n, D])`` chunks of the whole table, by id."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute("SELECT id, vector FROM images WHERE id > ? ORDER BY id "
                                        "LIMIT ?", (last, chunk)).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])
            last = int(ids[-1])
            yield ids, vectors

    # --- writes -------------------------------------------------------------------------------

    def commit_batch(self, new: list[NewImage], *, replaced: Iterable[str] = (),
                     touched: Iterable[tuple[str, int, int]] = (),
                     failed: Iterable[tuple[str, int, int, str]] = ()) -> Commit:
        """One transaction: drop the rows of ``replaced`` paths, insert ``new``, update the stat
        of ``touched`` ``(path, size, mtime_ns)`` (content unchanged) and record ``failed``
        ``(path, size, mtime_ns, reason)``. A path inserted or touched stops being a failure."""
        replaced = list(replaced)
        touched = list(touched)
        now = time.time()
        new_ids: list[int] = []
        with self._lock, self._db:
            db = self._db
            removed_ids = self._ids_of(replaced)
            db.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in replaced])
            for image in new:
                db.execute("DELETE FROM failures WHERE path = ?", (image.path,))
                cursor = db.execute(
                    "INSERT INTO images (path, size, mtime_ns, sha256, width, height, added, "
                    "vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (image.path, image.size, image.mtime_ns, image.sha256, image.width,
                     image.height, now, _vector_blob(image.vector)))
                new_ids.append(int(cursor.lastrowid))
            db.executemany("UPDATE images SET size = ?, mtime_ns = ? WHERE path = ?",
                           [(size, mtime, path) for path, size, mtime in touched])
            db.executemany("DELETE FROM failures WHERE path = ?", [(t[0],) for t in touched])
            db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", list(failed))
            if new_ids or removed_ids:
                self._bump_generation()
            generation = int(self.get_meta("generation") or 0)
        return Commit(new_ids, removed_ids, generation)

    def delete_paths(self, paths: Iterable[str]) -> Commit:
        """Forget images (and failures) by path in one transaction."""
        paths = list(paths)
        with self._lock, self._db:
            removed = self._ids_of(paths)
            self._db.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in paths])
            self._db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in paths])
            if removed:
                self._bump_generation()
            generation = int(self.get_meta("generation") or 0)
        return Commit([], removed, generation)

    def _ids_of(self, paths: list[str]) -> list[int]:
        ids = []
        for path in paths:
            row = self._db.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
            if row:
                ids.append(int(row[0]))
        return ids

    def _bump_generation(self) -> None:
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                         "WHERE key = 'generation'")


def _vector_blob(vector: Any) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").reshape(-1).tobytes()
