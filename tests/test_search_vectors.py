"""The FAISS layer: exact search equals brute force; approximate kinds keep their recall."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss")

from imagefm.apps.search.vectors import (  # noqa: E402
    VectorIndex,
    VectorIndexConfig,
    default_nlist,
    sidecar_path,
)


def clustered(n: int, dim: int = 32, seed: int = 0, clusters: int = 20) -> np.ndarray:
    """Unit vectors around a few centres, like real embeddings (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(data: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ data.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth,
                                                                        strict=True)]))


def test_flat_equals_brute_force() -> None:
    data, queries = clustered(500), clustered(20, seed=1)
    ids = np.arange(1000, 1500)
    index = VectorIndex.build(data, ids, kind="flat")
    scores, found = index.search(queries, 10)
    want_scores, want_ids = brute_force(data, ids, queries, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert recall_at_k(found, want_ids) == 1.0


def test_hnsw_recall_and_tombstones() -> None:
    data, queries = clustered(3000), clustered(50, seed=1)
    ids = np.arange(3000) * 7 + 3  # sparse, non-contiguous ids as SQLite gives after deletions
    index = VectorIndex.build(data, ids, kind="hnsw")  # the default M / ef settings
    _, found = index.search(queries, 10)
    _, truth = brute_force(data, ids, queries, 10)
    assert recall_at_k(found, truth) >= 0.95
    # Remove every query's best hit: it must never come back, and the next best must.
    removed = truth[:, 0]
    index.remove(removed)
    assert index.ntotal == 3000 - len(set(removed.tolist()))
    _, found = index.search(queries, 10)
    assert not set(found.ravel().tolist()) & set(removed.tolist())
    keep = ~np.isin(ids, removed)
    _, truth = brute_force(data[keep], ids[keep], queries, 10)
    assert recall_at_k(found, truth) >= 0.9
    assert not index.needs_compaction  # 50 of 3000 removed: below 10 %
    index.remove(ids[:400])
    assert index.needs_compaction


def test_ivfpq_compresses_and_keeps_useful_recall() -> None:
    data, queries = clustered(2000, dim=16), clustered(50, dim=16, seed=1)
    ids = np.arange(2000)
    index = VectorIndex.build(data, ids, VectorIndexConfig(ivf_nprobe=16), kind="ivfpq")
    _, found = index.search(queries, 10)
    _, truth = brute_force(data, ids, queries, 10)
    assert recall_at_k(found, truth) >= 0.5  # codes of 4 bytes instead of 64: approximate
    index.remove(ids[:100])
    assert index.ntotal == 1900
    _, found = index.search(queries, 10)
    assert found.min() >= 100
    with pytest.raises(ValueError, match="at least 256"):
        VectorIndex.build(data[:100], ids[:100], kind="ivfpq")


def test_auto_kind_follows_the_threshold() -> None:
    config = VectorIndexConfig(exact_threshold=1000)
    assert config.resolve_kind(999) == "flat" and config.resolve_kind(1000) == "hnsw"
    assert VectorIndexConfig(kind="ivfpq").resolve_kind(5) == "ivfpq"
    with pytest.raises(ValueError, match="unknown index kind"):
        VectorIndexConfig(kind="lsh")
    assert 1 <= default_nlist(100) <= 100 // 39 + 1
    assert default_nlist(1_000_000) == 4000


def test_save_load_roundtrip_keeps_kind_tombstones_and_extra(tmp_path) -> None:
    data = clustered(600)
    ids = np.arange(600)
    index = VectorIndex.build(data, ids, kind="hnsw")
    index.remove([5, 6])
    path = tmp_path / "v.faiss"
    index.save(path, extra={"generation": 7})
    loaded, sidecar = VectorIndex.load(path)
    assert (loaded.kind, loaded.tombstones, sidecar["generation"]) == ("hnsw", {5, 6}, 7)
    before, after = index.search(data[:5], 5), loaded.search(data[:5], 5)
    np.testing.assert_array_equal(before[1], after[1])
    side = json.loads(sidecar_path(path).read_text())
    side["ntotal"] = 1
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(ValueError, match="interrupted"):
        VectorIndex.load(path)


def test_search_checks_its_inputs() -> None:
    index = VectorIndex.build(clustered(50), np.arange(50), kind="flat")
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros((1, 8), np.float32), 5)
    with pytest.raises(ValueError, match="k must be"):
        index.search(clustered(1), 0)
    scores, found = index.search(clustered(1), 80)  # more than there are: padded with -1
    assert (found[0, 50:] == -1).all() and (found[0, :50] >= 0).all()
