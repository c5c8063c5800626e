"""An image index: a folder of photos, searchable by text (any language the model reads) or image.

    from imagefm.apps.search import Index

    index = Index.build("photos/", "photos.index", model="my-clip/")   # or update it
    for hit in index.search("빨간 자동차", k=5):
        print(f"{hit.score:.3f} {hit.path}")
    index.search(Path("query.jpg"))          # a Path, bytes or PIL image is an image query

On disk an index is a folder: ``index.sqlite`` (paths, sizes, mtimes, content hashes *and*
vectors; the source of truth, see ``store``) and ``vectors.faiss`` (+ ``.json``), the search
structure derived from it (see ``vectors``). Building is incremental: files whose size and
mtime are unchanged are not read; changed files are hashed and re-embedded only if their
content changed; a file whose content is already indexed (a copy, a move) reuses that vector;
deleted files are dropped. Each batch is committed on its own, so killing a run loses at most
the batch in flight; the next run (or the next ``open``) repairs the FAISS cache from SQLite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagefm.apps.search.store import Commit, NewImage, Store
from imagefm.apps.search.vectors import VectorIndex, VectorIndexConfig
from imagefm.apps.search.walker import LoadedFile, is_inside, walk_images

logger = logging.getLogger(__name__)

STORE_FILE = "index.sqlite"
VECTORS_FILE = "vectors.faiss"
LOCK_FILE = ".lock"


class SearchIndexError(RuntimeError):
    """A problem with an index as a whole (wrong model, wrong folder, busy, read-only)."""


@dataclass
class SearchHit:
    """One result: row id, path relative to the index root, cosine similarity, image size."""

    id: int
    path: str
    score: float
    width: int
    height: int
    root: Path | None = None

    @property
    def full_path(self) -> Path:
        """The file on disk (root / path)."""
        return (self.root or Path(".")) / self.path


@dataclass
class IndexReport:
    """What one indexing run did."""

    added: int = 0  # new files embedded
    changed: int = 0  # files whose content changed, re-embedded
    reused: int = 0  # new/changed files whose content was already indexed (vector copied)
    touched: int = 0  # mtime changed, content identical: nothing embedded
    unchanged: int = 0  # same size and mtime: not even read
    deleted: int = 0
    failed: int = 0  # could not be decoded this run
    failed_before: int = 0  # failed before and unchanged since: not retried
    skipped: int = 0  # left out by the walk (undecodable names, links outside the folder)
    embedded: int = 0  # images that went through the model
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few failure messages

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [f"{self.added} added", f"{self.changed} changed", f"{self.deleted} deleted",
                 f"{self.unchanged + self.touched} unchanged"]
        if self.reused:
            parts.append(f"{self.reused} reused by content")
        if self.failed or self.failed_before:
            parts.append(f"{self.failed + self.failed_before} failed")
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        rate = f", {self.images_per_second:.1f} images/s" if self.embedded else ""
        return ", ".join(parts) + f" in {self.seconds:.1f} s{rate}"


def model_fingerprint(model: Any) -> str:
    """A short hash identifying a model's weights, to refuse searching with the wrong model.

    Per tensor: name, shape and sums rounded to 5 significant digits, so the same weights
    loaded on another device or in another dtype still match, but other weights do not.
    """
    import torch

    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    with torch.no_grad():
        for name, tensor in sorted(state.items()):
            # numpy sums on one thread: torch's threaded float64 reductions crawl on a busy CPU.
            values = tensor.detach().to("cpu", torch.float32).numpy()
            total = float(values.sum(dtype=np.float64))
            magnitude = float(np.abs(values).sum(dtype=np.float64))
            digest.update(f"{name}{tuple(values.shape)}{total:.5g}{magnitude:.5g}".encode())
    return digest.hexdigest()[:16]


def pick_device(device: str | None) -> str:
    """``auto``/None → ``cuda`` when available, else ``cpu``; anything else as given."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Index:
    """An image index (see the module docstring); create with :meth:`build`, reopen with
    :meth:`open`."""

    def __init__(self, directory: Path, store: Store, model: Any = None, processor: Any = None,
                 *, device: str | None = None, readonly: bool = False,
                 fingerprint: str | None = None, precision: str = "fp32") -> None:
        from imagefm.apps.zeroshot import check_precision

        self.directory = directory
        self.store = store
        self.readonly = readonly
        self.device = pick_device(device)
        check_precision(precision, self.device)
        self.precision = precision  # of the model's forward passes: fp32, or bf16 autocast
        self._model = model
        self._processor = processor
        self.root = Path(store.get_meta("root") or ".")
        self.model_path = store.get_meta("model_path") or None
        self.dim = int(store.get_meta("embed_dim") or 0)
        self.config = VectorIndexConfig.from_dict(json.loads(store.get_meta("config") or "{}"))
        self._vectors: VectorIndex | None = None
        self._synced_generation = -1  # the store generation the vectors reflect
        self._said_flat_for_ivfpq = False
        self.last_report: IndexReport | None = None
        if model is not None:
            self._check_model(model, fingerprint)
            self._model = self._to_device(model)

    # --- opening and building -----------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | Path, model: Any = None, processor: Any = None, *,
             device: str | None = None, readonly: bool = True, precision: str = "fp32"
             ) -> Index:
        """Open an existing index; the model is loaded from the recorded path when first needed
        (or pass ``model``, which must be the one the index was built with)."""
        directory = Path(directory)
        store = Store(directory / STORE_FILE, readonly=readonly)
        if isinstance(model, (str, Path)):
            model = _load_model(model)
        index = cls(directory, store, model, processor, device=device, readonly=readonly,
                    precision=precision)
        index._load_vectors()
        return index

    @classmethod
    def build(cls, root: str | Path, out: str | Path, model: Any = None, *,
              processor: Any = None, model_path: str | Path | None = None,
              config: VectorIndexConfig | None = None, kind: str | None = None,
              batch_size: int = 64, workers: int | None = None, device: str | None = None,
              progress: bool = False, rebuild: bool = False,
              max_pixels: int | None = None, precision: str = "fp32") -> Index:
        """Index the images under ``root`` into the folder ``out``, or bring an existing index
        there up to date (incremental). ``model`` is a checkpoint path or a loaded model
        (``model_path`` then records where it lives, so searches can reload it). ``kind``
        overrides ``config.kind`` (``auto``, ``flat``, ``hnsw``, ``ivfpq``); ``precision``
        ``"bf16"`` embeds under bfloat16 autocast (see ``imagefm.apps.zeroshot.inference``).
        ``index.last_report`` tells what the run did."""
        from imagefm.apps.zeroshot import check_precision

        check_precision(precision, pick_device(device))  # before anything is written
        root, out = Path(root), Path(out)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        if isinstance(model, (str, Path)):
            model_path, model = model, _load_model(model)
        store_path = out / STORE_FILE
        if rebuild:
            for name in (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm", VECTORS_FILE,
                         VECTORS_FILE + ".json"):
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        if store_path.is_file():
            index = cls.open(out, model, processor, device=device, readonly=False,
                             precision=precision)
            if os.path.realpath(index.root) != os.path.realpath(root):
                raise SearchIndexError(f"{out} indexes {index.root}, not {root}; pick another "
                                       "--out or pass --rebuild")
            if config is not None or kind is not None:
                index.config = config or index.config
                if kind is not None:
                    index.config = VectorIndexConfig.from_dict({**index.config.to_dict(),
                                                                "kind": kind})
                index.store.set_meta({"config": json.dumps(index.config.to_dict())})
        else:
            if model is None:
                raise SearchIndexError(f"no index at {out} yet: a model is needed to build one")
            config = config or VectorIndexConfig()
            if kind is not None:
                config = VectorIndexConfig.from_dict({**config.to_dict(), "kind": kind})
            out.mkdir(parents=True, exist_ok=True)
            store = Store(store_path, create=True)
            fingerprint = model_fingerprint(model)
            store.set_meta({
                "root": str(root.resolve()),
                "model_path": str(Path(model_path).resolve()) if model_path else "",
                "model_fingerprint": fingerprint,
                "embed_dim": str(_embedding_dim(model, processor)),
                "config": json.dumps(config.to_dict()),
                "created": str(time.time()),
            })
            index = cls(out, store, model, processor, device=device, fingerprint=fingerprint,
                        precision=precision)
        index.update(batch_size=batch_size, workers=workers, progress=progress,
                     max_pixels=max_pixels)
        return index

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.count()

    @property
    def kind(self) -> str:
        """The kind of the vector index in use (``flat``, ``hnsw`` or ``ivfpq``)."""
        return self._vectors.kind if self._vectors is not None else self.config.resolve_kind(0)

    # --- the model ----------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The model the index was built with (loaded from ``model_path`` on first use)."""
        if self._model is None:
            if not self.model_path:
                raise SearchIndexError(f"{self.directory} records no model path: pass model= "
                                       "to Index.open (the model the index was built with)")
            model = _load_model(self.model_path)
            self._check_model(model)
            self._model = self._to_device(model)
        return self._model

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from imagefm.processor import Processor

            self._processor = Processor.for_model(self.model)
        return self._processor

    def _check_model(self, model: Any, fingerprint: str | None = None) -> None:
        recorded = self.store.get_meta("model_fingerprint")
        actual = fingerprint or model_fingerprint(model)
        if recorded and recorded != actual:
            raise SearchIndexError(
                f"{self.directory} was built with another model ({self.model_path or 'unknown'}"
                f", fingerprint {recorded}; this one is {actual}): vectors of different models "
                "are not comparable. Use that model, or rebuild the index (--rebuild)")

    def _to_device(self, model: Any) -> Any:
        if hasattr(model, "to"):
            model = model.to(self.device)
        if hasattr(model, "eval"):
            model.eval()
        return model

    # --- embedding ----------------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit text embeddings ``[N, D]`` (texts are NFC-normalised by the tokenizer)."""
        from imagefm.apps.zeroshot import embed_texts

        return embed_texts(self.model, self.processor, list(texts),
                           precision=self.precision).numpy()

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Unit image embeddings ``[N, D]`` of paths, bytes, PIL images or uint8 arrays."""
        from imagefm.apps.zeroshot import embed_pixels

        pixels = self.processor(images=list(images))["pixel_values"]
        return embed_pixels(self.model, pixels, self.precision).numpy()

    # --- search -------------------------------------------------------------------------------

    def search(self, query: Any, k: int = 10) -> list[SearchHit]:
        """The ``k`` images closest to ``query``: a text (``str``), an image (``Path``, bytes,
        PIL image, uint8 array) or an embedding (1-D float array)."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[Any], k: int = 10) -> list[list[SearchHit]]:
        """:meth:`search` for several queries, texts and images embedded in one batch each."""
        if not queries:
            return []
        vectors: list[np.ndarray | None] = [None] * len(queries)
        texts = [i for i, q in enumerate(queries) if isinstance(q, str)]
        arrays = [i for i, q in enumerate(queries) if _is_embedding(q)]
        images = [i for i in range(len(queries)) if i not in set(texts) | set(arrays)]
        if texts:
            for i, row in zip(texts, self.embed_texts([queries[i] for i in texts]), strict=True):
                vectors[i] = row
        if images:
            embedded = self.embed_images([queries[i] for i in images])
            for i, row in zip(images, embedded, strict=True):
                vectors[i] = row
        for i in arrays:
            vectors[i] = _unit(np.asarray(queries[i], dtype=np.float32))
        return self.search_vectors(np.stack(vectors), k)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """Results for query embeddings ``[Q, D]`` (unit length), best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if self._vectors is None or self._vectors.ntotal == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = self._vectors.search(queries, k)
        rows = self.store.rows(int(i) for i in np.unique(ids) if i >= 0)
        results = []
        for score_row, id_row in zip(scores, ids, strict=True):
            hits = []
            for score, id_ in zip(score_row.tolist(), id_row.tolist(), strict=True):
                row = rows.get(id_)
                if row is not None:  # -1 (fewer than k) or deleted since the search structure
                    hits.append(SearchHit(row.id, row.path, float(score), row.width, row.height,
                                          self.root))
            results.append(hits)
        return results

    def image_path(self, image_id: int) -> Path | None:
        """The file of an indexed image, only if it still exists inside the root (links
        resolved): the one check that stands between a request and an arbitrary file read."""
        row = self.store.rows([image_id]).get(int(image_id))
        if row is None:
            return None
        path = self.root / row.path
        if not is_inside(path, self.root) or not path.is_file():
            return None
        return path

    # --- updating -----------------------------------------------------------------------------

    def update(self, *, batch_size: int = 64, workers: int | None = None,
               progress: bool = False, max_pixels: int | None = None) -> IndexReport:
        """Bring the index up to date with its folder: embed new and changed files, drop
        deleted ones. Returns (and keeps as ``last_report``) what was done."""
        report = IndexReport()
        started = time.perf_counter()

        def skipped(path: str, reason: str) -> None:
            report.skipped += 1
            logger.warning("skipping %s: %s", path, reason)

        with self._writing():
            found = walk_images(self.root, skip=[self.directory], on_skip=skipped)
            states = self.store.file_states()
            failing = self.store.failure_states()
            todo, seen = [], set()
            found = list(found)
            if not found and states:
                # An unmounted drive looks like an empty folder: never wipe an index for that.
                raise SearchIndexError(
                    f"found no images under {self.root}, but the index holds {len(states)}: is "
                    "the folder mounted? To really empty the index, rebuild it (--rebuild)")
            for item in found:
                seen.add(item.rel_path)
                state = states.get(item.rel_path)
                if state is not None and state[1:3] == (item.size, item.mtime_ns):
                    report.unchanged += 1
                elif failing.get(item.rel_path) == (item.size, item.mtime_ns):
                    report.failed_before += 1
                else:
                    todo.append(item.rel_path)
            self._ingest(todo, states, report, batch_size=batch_size, workers=workers,
                         progress=progress, max_pixels=max_pixels)
            gone = [p for p in states if p not in seen] + [p for p in failing if p not in seen]
            commit = self.store.delete_paths(gone)
            report.deleted = len(commit.removed_ids)
            self._apply(commit, None)
            self._finish()
        report.seconds = time.perf_counter() - started
        self.last_report = report
        return report

    def add(self, paths: Sequence[str | Path], *, batch_size: int = 64,
            workers: int | None = 0, progress: bool = False) -> IndexReport:
        """Index these files (inside the root; new or changed ones are embedded)."""
        report = IndexReport()
        started = time.perf_counter()
        with self._writing():
            rels = [self._relative(p) for p in paths]
            states = self.store.file_states()
            self._ingest(rels, states, report, batch_size=batch_size, workers=workers,
                         progress=progress, max_pixels=None)
            self._finish()
        report.seconds = time.perf_counter() - started
        self.last_report = report
        return report

    def remove(self, paths: Sequence[str | Path]) -> int:
        """Drop these files from the index (whether or not they still exist); returns how many
        were indexed."""
        with self._writing():
            commit = self.store.delete_paths([self._relative(p) for p in paths])
            self._apply(commit, None)
            self._finish()
        if len(commit.removed_ids) < len(paths):
            logger.warning("%d of %d paths were not in the index (paths are relative to the "
                           "indexed folder %s)", len(paths) - len(commit.removed_ids), len(paths),
                           self.root)
        return len(commit.removed_ids)

    def failures(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of the files that could not be indexed."""
        return self.store.failures()

    def _relative(self, path: str | Path) -> str:
        path = Path(path)
        full = path if path.is_absolute() else self.root / path
        if not path.is_absolute() and not full.exists() and is_inside(path, self.root):
            full = path.resolve()  # "photos/new.png" meant from here, not photos/photos/...
        if not is_inside(full, self.root):
            raise ValueError(f"{path} is not inside the indexed folder {self.root}")
        return os.path.relpath(os.path.realpath(full), os.path.realpath(self.root)).replace(
            os.sep, "/")

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Exclusive write access, across processes (a lock file in the index folder)."""
        if self.readonly:
            raise SearchIndexError(f"{self.directory} was opened read-only")
        handle = open(self.directory / LOCK_FILE, "a+")  # noqa: SIM115 - held for the block
        try:
            try:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # not POSIX: no cross-process lock
                pass
            except BlockingIOError:
                raise SearchIndexError(
                    f"{self.directory} is being updated by another process") from None
            try:
                yield
            finally:
                # Interrupted or not, save the search structure when it matches the store, so
                # the next open does not have to rebuild it.
                if self._vectors is not None and self._synced_generation == self.store.generation:
                    self._save_vectors()
        finally:
            handle.close()

    def _ingest(self, rel_paths: list[str], states: dict[str, tuple[int, int, int, str]],
                report: IndexReport, *, batch_size: int, workers: int | None, progress: bool,
                max_pixels: int | None) -> None:
        """Read the files, embed what needs it in batches, commit each batch."""
        if not rel_paths:
            return
        from tqdm import tqdm

        pending: list[LoadedFile] = []
        new: list[NewImage] = []
        replaced: list[str] = []
        touched: list[tuple[str, int, int]] = []
        failed: list[tuple[str, int, int, str]] = []

        def flush() -> None:
            if pending:
                vectors = self._embed_loaded(pending)
                report.embedded += len(pending)
                new.extend(_new_image(item, vector) for item, vector in zip(pending, vectors,
                                                                            strict=True))
            commit = self.store.commit_batch(new, replaced=replaced, touched=touched,
                                             failed=failed)
            self._apply(commit, np.stack([n.vector for n in new]) if new else None)
            for items in (pending, new, replaced, touched, failed):
                items.clear()

        bar = tqdm(total=len(rel_paths), unit="img", desc="indexing", disable=not progress,
                   dynamic_ncols=True)
        with bar:
            for loaded in self._load_all(rel_paths, workers, batch_size, max_pixels):
                bar.update(1)
                old = states.get(loaded.rel_path)
                if loaded.error is not None:
                    report.failed += 1
                    if len(report.errors) < 20:
                        report.errors.append(loaded.error)
                    logger.warning("%s", loaded.error)
                    failed.append((loaded.rel_path, loaded.size, loaded.mtime_ns, loaded.error))
                    if old is not None:
                        replaced.append(loaded.rel_path)  # was fine, now broken: drop it
                    continue
                if old is not None and old[3] == loaded.sha256:
                    report.touched += 1
                    touched.append((loaded.rel_path, loaded.size, loaded.mtime_ns))
                    continue
                if old is not None:
                    report.changed += 1
                    replaced.append(loaded.rel_path)
                else:
                    report.added += 1
                # Vectors are a function of content: any row with this hash has the right one.
                vector = self.store.vector_by_hash(loaded.sha256)
                if vector is not None:
                    report.reused += 1
                    new.append(_new_image(loaded, vector))
                else:
                    pending.append(loaded)
                if len(pending) >= batch_size or len(new) >= 4 * batch_size:
                    flush()
            flush()

    def _load_all(self, rel_paths: list[str], workers: int | None, batch_size: int,
                  max_pixels: int | None) -> Iterator[LoadedFile]:
        """Read files in order, in worker processes when ``workers`` > 0 (a bounded window of
        chunks in flight, so a slow model never lets decoded images pile up in memory).

        Workers are started with ``spawn`` (the parent holds torch threads, maybe CUDA: forking
        that is unsafe), so a script calling this must guard its entry point with
        ``if __name__ == "__main__":``. If the pool breaks anyway (a worker killed, an unguarded
        script), the remaining files are read in this process instead.
        """
        from imagefm.apps.search import walker
        from imagefm.data.image import DEFAULT_MAX_PIXELS, ImageProcessor

        card = self.processor.image_processor.card
        max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        if workers is None:
            workers = min(4, os.cpu_count() or 1) if len(rel_paths) >= 64 else 0
        root = str(self.root)
        done = 0  # files yielded so far
        if workers > 0:
            chunk = max(1, min(16, batch_size // 2))
            chunks = [rel_paths[i:i + chunk] for i in range(0, len(rel_paths), chunk)]
            try:
                for loaded in _read_in_workers(root, chunks, workers, card, max_pixels):
                    done += 1
                    yield loaded
                return
            except BrokenProcessPool as err:
                logger.warning("decoding workers failed (%s); reading the remaining %d files "
                               "in this process. Scripts must guard their entry point with "
                               "`if __name__ == \"__main__\":`", err, len(rel_paths) - done)
        processor = ImageProcessor(card, max_pixels=max_pixels)
        for rel in rel_paths[done:]:
            yield walker.load_file(root, rel, processor)

    def _embed_loaded(self, items: list[LoadedFile]) -> np.ndarray:
        from imagefm.apps.zeroshot import embed_pixels

        # uint8 crops of the card's size take the processor's fast path: normalisation only.
        pixels = self.processor.image_processor([item.pixels for item in items])
        return embed_pixels(self.model, pixels, self.precision).numpy()

    # --- the search structure -----------------------------------------------------------------

    def _apply(self, commit: Commit, new_vectors: np.ndarray | None) -> None:
        """Mirror a committed transaction in the in-memory search structure."""
        if self._vectors is not None and self._synced_generation >= 0:
            if commit.removed_ids:
                self._vectors.remove(commit.removed_ids)
            if commit.new_ids:
                self._vectors.add(new_vectors, commit.new_ids)
            self._synced_generation = commit.generation

    def _finish(self) -> None:
        """Rebuild the search structure when stale, of the wrong kind or full of tombstones."""
        count = self.store.count()
        kind = self._choose_kind(count)
        vectors = self._vectors
        if (vectors is None or self._synced_generation != self.store.generation
                or vectors.kind != kind or vectors.needs_compaction):
            self._rebuild(kind)

    def _choose_kind(self, count: int) -> str:
        kind = self.config.resolve_kind(count)
        if kind == "ivfpq" and count < 256:
            if not self._said_flat_for_ivfpq:
                logger.warning("ivfpq trains its codebooks on at least 256 images; with %d the "
                               "index is exact (flat) until there are more", count)
                self._said_flat_for_ivfpq = True
            return "flat"  # exact search over so few vectors is instant anyway
        return kind

    def _rebuild(self, kind: str) -> None:
        generation = self.store.generation
        chunks = list(self.store.iter_vectors())
        if chunks:
            ids = np.concatenate([c[0] for c in chunks])
            matrix = np.concatenate([c[1] for c in chunks])
            self._vectors = VectorIndex.build(matrix, ids, self.config, kind=kind)
        else:
            self._vectors = VectorIndex.empty(self.dim, self.config, kind="flat")
        self._synced_generation = generation

    def _load_vectors(self) -> None:
        path = self.directory / VECTORS_FILE
        try:
            vectors, sidecar = VectorIndex.load(path)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            if self.store.count() or path.exists():
                logger.info("rebuilding the search structure of %s (%s)", self.directory, err)
            vectors, sidecar = None, {}
        if vectors is not None and sidecar.get("generation") == self.store.generation:
            vectors.config = self.config
            self._vectors = vectors
            self._synced_generation = self.store.generation
            return
        # Stale (an interrupted run) or missing: SQLite has everything needed.
        self._rebuild(self._choose_kind(self.store.count()))
        if not self.readonly:
            self._save_vectors()

    def _save_vectors(self) -> None:
        assert self._vectors is not None
        self._vectors.save(self.directory / VECTORS_FILE,
                           extra={"generation": self._synced_generation})


def _read_in_workers(root: str, chunks: list[list[str]], workers: int, card: Any,
                     max_pixels: int) -> Iterator[LoadedFile]:
    import multiprocessing

    from imagefm.apps.search import walker

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=walker.init_worker,
                             initargs=(card, max_pixels)) as pool:
        window: deque[Any] = deque()
        try:
            for part in chunks:
                window.append(pool.submit(walker.load_files, root, part))
                if len(window) >= 2 * workers + 2:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def _new_image(item: LoadedFile, vector: np.ndarray) -> NewImage:
    return NewImage(item.rel_path, item.size, item.mtime_ns, item.sha256, item.width,
                    item.height, np.asarray(vector, dtype=np.float32))


def _is_embedding(query: Any) -> bool:
    return (isinstance(query, np.ndarray) and query.ndim == 1
            and np.issubdtype(query.dtype, np.floating))


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _load_model(path: str | Path) -> Any:
    import imagefm

    return imagefm.load(path)


def _embedding_dim(model: Any, processor: Any) -> int:
    dim = getattr(getattr(model, "config", None), "embed_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    # A model without a config: embed one blank image and look.
    import torch

    from imagefm.apps.zeroshot import embed_pixels

    size = (processor.image_processor.card if processor is not None else model.card).image_size
    return int(embed_pixels(model, torch.zeros(1, 3, size, size)).shape[-1])
