"""Nearest-neighbour search over L2-normalised embeddings with FAISS: exact or approximate.

Three kinds, all scoring by inner product (= cosine similarity for unit vectors):

* ``flat``: exact brute force. Best below ~100k vectors, where a scan takes a few milliseconds;
* ``hnsw``: a graph index (HNSW). Milliseconds per query at millions of vectors with recall@10
  above 0.95 at the default ``ef_search``; costs the full vectors plus ~``2·M`` ids per vector;
* ``ivfpq``: inverted lists of product-quantised codes. ``pq_m`` bytes per vector instead of
  ``4·dim``, for collections that do not fit in memory otherwise; lower recall (see the
  benchmark) because scores come from compressed codes.

``auto`` picks ``flat`` below ``exact_threshold`` vectors and ``hnsw`` from there on.

Every kind keeps our own 64-bit ids (the SQLite row ids), so a search answers row ids directly.
HNSW cannot delete: removed ids become *tombstones* filtered out at search time, and the owner
rebuilds the graph once they pass ``compact_fraction`` of the index (``needs_compaction``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("auto", "flat", "hnsw", "ivfpq")


@dataclass
class VectorIndexConfig:
    """How to build the vector index; ``kind="auto"`` chooses by size (see the module doc)."""

    kind: str = "auto"
    exact_threshold: int = 100_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None  # default: about 4·sqrt(n) lists
    ivf_nprobe: int = 32
    pq_m: int | None = None  # bytes per vector; default: dim // 4 rounded to a divisor of dim
    compact_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.exact_threshold < 0:
            raise ValueError("exact_threshold must be >= 0")

    def resolve_kind(self, count: int) -> str:
        """The concrete kind for an index of ``count`` vectors."""
        if self.kind != "auto":
            return self.kind
        return "flat" if count < self.exact_threshold else "hnsw"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VectorIndexConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # the search extra is optional
        raise ImportError("image search needs FAISS: pip install faiss-cpu "
                          "(or pip install 'imagefm[search]')") from err
    return faiss


def _as_matrix(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise ValueError(f"expected vectors [N, D], got shape {vectors.shape}")
    if dim is not None and matrix.shape[1] != dim:
        raise ValueError(f"vectors have dimension {matrix.shape[1]}, the index has {dim}")
    return matrix


def _as_ids(ids: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _pq_bytes(dim: int, requested: int | None) -> int:
    """Sub-quantizer count: must divide ``dim``; default about ``dim / 4`` (4 dims per byte)."""
    if requested is not None:
        if dim % requested:
            raise ValueError(f"pq_m={requested} must divide the dimension {dim}")
        return requested
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


@dataclass
class VectorIndex:
    """A FAISS index of unit vectors under 64-bit ids; build with :meth:`build`."""

    dim: int
    kind: str
    config: VectorIndexConfig
    index: Any  # the FAISS index object
    tombstones: set[int] = field(default_factory=set)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def empty(cls, dim: int, config: VectorIndexConfig | None = None,
              kind: str | None = None) -> VectorIndex:
        """An empty index to :meth:`add` to (``ivfpq`` needs training data: use :meth:`build`)."""
        config = config or VectorIndexConfig()
        kind = kind or config.resolve_kind(0)
        if kind == "ivfpq":
            raise ValueError("an ivfpq index is trained on its vectors: use VectorIndex.build")
        return cls(dim, kind, config, _new_faiss_index(dim, kind, config))

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Any, config: VectorIndexConfig | None = None,
              kind: str | None = None) -> VectorIndex:
        """Index ``vectors [N, D]`` (unit length) under ``ids [N]``; the kind follows ``N``."""
        config = config or VectorIndexConfig()
        matrix = _as_matrix(vectors)
        ids = _as_ids(ids)
        if len(ids) != len(matrix):
            raise ValueError(f"{len(ids)} ids for {len(matrix)} vectors")
        kind = kind or config.resolve_kind(len(matrix))
        dim = matrix.shape[1]
        if kind == "ivfpq":
            index = _trained_ivfpq(matrix, config)
        else:
            index = _new_faiss_index(dim, kind, config)
        built = cls(dim, kind, config, index)
        built.add(matrix, ids)
        return built

    # --- updates ------------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: Any) -> None:
        """Add vectors under ids (ids must not be in the index already)."""
        matrix = _as_matrix(vectors, self.dim)
        ids = _as_ids(ids)
        if len(matrix):
            self.index.add_with_ids(matrix, ids)
            self.tombstones.difference_update(ids.tolist())

    def remove(self, ids: Any) -> None:
        """Remove ids (unknown ones are ignored); HNSW records them as tombstones."""
        ids = _as_ids(ids)
        if not len(ids):
            return
        if self.kind == "hnsw":
            self.tombstones.update(ids.tolist())
        else:
            self.index.remove_ids(ids)

    @property
    def ntotal(self) -> int:
        """Vectors searchable (tombstones excluded)."""
        return int(self.index.ntotal) - len(self.tombstones)

    @property
    def needs_compaction(self) -> bool:
        """True when tombstones are a large enough share of an HNSW graph to rebuild it."""
        total = int(self.index.ntotal)
        return bool(self.tombstones) and len(self.tombstones) > self.config.compact_fraction * total

    # --- search -------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k], ids [Q, k])``, best first; missing neighbours have id ``-1``."""
        faiss = _faiss()
        matrix = _as_matrix(queries, self.dim)
        k = int(k)
        if k < 1:
            raise ValueError("k must be >= 1")
        params = None
        if self.kind == "hnsw":
            selector = None
            if self.tombstones:
                dead = faiss.IDSelectorBatch(_as_ids(sorted(self.tombstones)))
                selector = faiss.IDSelectorNot(dead)
            params = faiss.SearchParametersHNSW(efSearch=max(self.config.hnsw_ef_search, k))
            if selector is not None:
                params.sel = selector
                params._keep = dead  # the Not-selector only points at it: keep it alive
        elif self.kind == "ivfpq":
            params = faiss.SearchParametersIVF(nprobe=self.config.ivf_nprobe)
        with _few_threads(faiss, len(matrix)):
            if params is None:
                return self.index.search(matrix, k)
            return self.index.search(matrix, k, params=params)

    # --- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``path`` (FAISS) and ``path.json`` (kind, config, tombstones, ``extra``).

        Both are written to temporary names and renamed, FAISS file first: a crash leaves
        either the old pair or a new FAISS file with the old sidecar, which :meth:`load`'s
        caller detects by the sidecar's ``extra`` (e.g. a generation number) not matching.
        """
        faiss = _faiss()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        sidecar = {"dim": self.dim, "kind": self.kind, "config": self.config.to_dict(),
                   "ntotal": int(self.index.ntotal), "tombstones": sorted(self.tombstones),
                   **(extra or {})}
        side = sidecar_path(path)
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(json.dumps(sidecar), encoding="utf-8")
        os.replace(side_tmp, side)

    @classmethod
    def load(cls, path: str | Path) -> tuple[VectorIndex, dict[str, Any]]:
        """The index at ``path`` and its sidecar data."""
        faiss = _faiss()
        path = Path(path)
        sidecar = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        index = faiss.read_index(str(path))
        if int(index.ntotal) != sidecar["ntotal"]:
            raise ValueError(f"{path}: holds {index.ntotal} vectors, its sidecar says "
                             f"{sidecar['ntotal']} (written by an interrupted run?)")
        config = VectorIndexConfig.from_dict(sidecar["config"])
        loaded = cls(sidecar["dim"], sidecar["kind"], config, index,
                     set(int(i) for i in sidecar.get("tombstones", ())))
        return loaded, sidecar


# Below this many queries a search runs on the calling thread only. FAISS parallelises over
# queries (HNSW) or splits one scan (flat); for a single query the OpenMP hand-off costs more
# than it saves, and on a busy machine waiting for a second core can take milliseconds
# (measured: flat 10k x 512, one query, 2 busy cores: 16 ms with 2 threads, 0.5 ms with 1).
# A server gets its parallelism from concurrent requests instead.
_SERIAL_BELOW = 16


@contextlib.contextmanager
def _few_threads(faiss: Any, queries: int) -> Iterator[None]:
    if queries >= _SERIAL_BELOW:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # OpenMP keeps this per calling thread
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def _new_faiss_index(dim: int, kind: str, config: VectorIndexConfig) -> Any:
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = config.hnsw_ef_construction
        graph.hnsw.efSearch = config.hnsw_ef_search
        # faiss's Python layer keeps `graph` alive as long as the wrapper is referenced.
        return faiss.IndexIDMap2(graph)
    raise ValueError(f"cannot create an empty {kind!r} index")


def default_nlist(count: int) -> int:
    """About 4·sqrt(n) inverted lists, with at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(max(count, 1))), count // 39 or 1))


def _trained_ivfpq(matrix: np.ndarray, config: VectorIndexConfig) -> Any:
    faiss = _faiss()
    count, dim = matrix.shape
    if count < 256:
        raise ValueError(f"an ivfpq index needs at least 256 vectors to train its codebooks, "
                         f"got {count}: use kind='flat'")
    nlist = config.ivf_nlist or default_nlist(count)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, _pq_bytes(dim, config.pq_m), 8,
                             faiss.METRIC_INNER_PRODUCT)
    # Training on more than ~256 points per centroid buys nothing but time.
    rng = np.random.default_rng(0)
    sample_size = min(count, max(256 * 64, nlist * 256))
    sample = matrix if sample_size >= count else matrix[rng.choice(count, sample_size, False)]
    index.cp.min_points_per_centroid = 1  # small collections: train anyway, without warnings
    index.pq.cp.min_points_per_centroid = 1
    index.train(sample)
    index.nprobe = config.ivf_nprobe
    return index
