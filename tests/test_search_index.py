"""Index build, search quality, incremental updates, deletion, interruption and safety checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from test_search_fixtures import (  # noqa: E402
    COLOURS,
    NAMES,
    ColourModel,
    colour_vector,
    image_bytes,
    make_colour_folder,
    tiny_checkpoint,
)

from imagefm.apps.search import Index, SearchIndexError  # noqa: E402
from imagefm.apps.search.index import VECTORS_FILE  # noqa: E402
from imagefm.apps.search.vectors import sidecar_path  # noqa: E402


@pytest.fixture
def photos(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "photos"
    return root, make_colour_folder(root)


def build(root: Path, out: Path, model: ColourModel | None = None, **kw) -> Index:
    kw.setdefault("workers", 0)
    return Index.build(root, out, model or ColourModel(), **kw)


def test_search_finds_the_known_answer_in_english_and_korean(photos, tmp_path) -> None:
    root, paths = photos
    index = build(root, tmp_path / "idx")
    assert len(index) == len(NAMES)  # png, jpg, webp, gif, bmp, tiff, nested folders
    for name in NAMES:
        english, korean = index.search(name, k=3), index.search(_ko(name), k=3)
        assert english[0].path == paths[name], name
        assert korean[0].path == paths[name], name
        assert english[0].score > 0.99
        assert english[0].score >= english[1].score >= english[2].score
    # Query by example image (bytes, a Path) and by embedding.
    assert index.search(image_bytes("green", seed=5), k=1)[0].path == paths["green"]
    assert index.search(root / paths["blue"], k=1)[0].path == paths["blue"]
    assert index.search(colour_vector("purple"), k=1)[0].path == paths["purple"]
    hit = index.search("yellow", k=1)[0]
    assert hit.full_path == (root / paths["yellow"]).resolve()
    assert (hit.width, hit.height) == (24, 20)


def _ko(name: str) -> str:
    return COLOURS[name][1][1] + " 사진"  # e.g. "빨간색 사진"


def test_scores_match_brute_force_cosine(photos, tmp_path) -> None:
    root, _ = photos
    index = build(root, tmp_path / "idx")
    query = colour_vector("red") + colour_vector("blue")
    hits = index.search(query.astype(np.float32), k=len(NAMES))
    vectors = index.embed_images([root / h.path for h in hits])
    expected = vectors @ (query / np.linalg.norm(query))
    np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-5)
    assert np.all(np.diff(expected) <= 1e-6)


def test_incremental_update_embeds_only_new_and_changed_files(photos, tmp_path) -> None:
    root, paths = photos
    model = ColourModel()
    build(root, tmp_path / "idx", model).close()
    assert sum(model.image_calls) == len(NAMES)

    (root / "new_red.png").write_bytes(image_bytes("red", seed=1))  # new
    (root / paths["green"]).write_bytes(image_bytes("blue", "JPEG", seed=2))  # changed content
    touched = root / paths["yellow"]
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))  # mtime only
    (root / paths["black"]).unlink()  # deleted
    model.image_calls.clear()
    index = build(root, tmp_path / "idx", model)
    report = index.last_report
    assert (report.added, report.changed, report.deleted, report.touched) == (1, 1, 1, 1)
    assert report.unchanged == len(NAMES) - 3
    assert sum(model.image_calls) == 2  # only the new and the changed file went through the model
    assert len(index) == len(NAMES)
    found = [h.path for h in index.search("black", k=len(NAMES))]
    assert paths["black"] not in found
    assert index.search("blue", k=2)[1].path == paths["green"]  # now holds a blue image

    model.image_calls.clear()
    again = build(root, tmp_path / "idx", model).last_report
    assert (again.added, again.changed, again.deleted, again.embedded) == (0, 0, 0, 0)
    assert again.unchanged == len(NAMES)


def test_a_copy_or_move_reuses_the_stored_vector(photos, tmp_path) -> None:
    root, paths = photos
    model = ColourModel()
    build(root, tmp_path / "idx", model).close()
    shutil.copy(root / paths["red"], root / "copy_of_red.png")
    (root / paths["blue"]).rename(root / "moved_blue.webp")
    model.image_calls.clear()
    index = build(root, tmp_path / "idx", model)
    assert index.last_report.reused == 2 and index.last_report.deleted == 1
    assert model.image_calls == []
    assert {h.path for h in index.search("red", k=2)} == {paths["red"], "copy_of_red.png"}
    assert index.search("blue", k=1)[0].path == "moved_blue.webp"


def test_bad_files_are_skipped_named_and_not_retried_until_changed(photos, tmp_path) -> None:
    root, _ = photos
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image name: never read")
    (root / ".hidden.png").write_bytes(image_bytes("red"))
    index = build(root, tmp_path / "idx")
    report = index.last_report
    assert report.failed == 2 and len(index) == len(NAMES)
    assert any("broken.jpg" in e for e in report.errors)
    assert {p for p, _ in index.failures()} == {"broken.jpg", "empty.png"}
    index.close()
    again = build(root, tmp_path / "idx").last_report
    assert (again.failed, again.failed_before) == (0, 2)
    (root / "broken.jpg").write_bytes(image_bytes("green"))  # fixed: indexed next time
    index = build(root, tmp_path / "idx")
    assert index.last_report.added == 1
    assert [p for p, _ in index.failures()] == ["empty.png"]


def test_file_that_turns_corrupt_leaves_the_index(photos, tmp_path) -> None:
    root, paths = photos
    build(root, tmp_path / "idx").close()
    (root / paths["red"]).write_bytes(b"garbage")
    index = build(root, tmp_path / "idx")
    assert paths["red"] not in [h.path for h in index.search("red", k=len(NAMES))]
    assert len(index) == len(NAMES) - 1


def test_remove_and_add_by_path(photos, tmp_path) -> None:
    root, paths = photos
    index = build(root, tmp_path / "idx")
    assert index.remove([paths["red"], "not/indexed.png"]) == 1
    assert paths["red"] not in [h.path for h in index.search("red", k=len(NAMES))]
    index.add([root / paths["red"]])
    assert index.search("red", k=1)[0].path == paths["red"]
    with pytest.raises(ValueError, match="not inside"):
        index.add([tmp_path / "elsewhere.png"])


def test_paths_relative_to_the_working_folder_are_understood_too(photos, tmp_path, monkeypatch,
                                                                caplog) -> None:
    root, paths = photos
    index = build(root, tmp_path / "idx")
    monkeypatch.chdir(tmp_path)  # "photos/<file>" from here is "<file>" inside the index
    assert index.remove([f"photos/{paths['red']}"]) == 1
    index.add([f"photos/{paths['red']}"])
    assert index.search("red", k=1)[0].path == paths["red"]
    with caplog.at_level("WARNING"):
        assert index.remove(["photos/not-indexed.png"]) == 0
    assert "1 of 1 paths were not in the index" in caplog.text


def test_stale_or_missing_search_structure_is_rebuilt_from_sqlite(photos, tmp_path) -> None:
    root, paths = photos
    build(root, tmp_path / "idx").close()
    side = sidecar_path(tmp_path / "idx" / VECTORS_FILE)
    side.write_text(side.read_text().replace('"generation": ', '"generation": 99'))
    index = Index.open(tmp_path / "idx", ColourModel())
    assert index.search("blue", k=1)[0].path == paths["blue"]
    index.close()
    (tmp_path / "idx" / VECTORS_FILE).unlink()
    index = Index.open(tmp_path / "idx", ColourModel())
    assert len(index) == len(NAMES) and index.search("red", k=1)[0].path == paths["red"]


class FailingModel(ColourModel):
    """Raises on the image batch number ``fail_on`` (1-based): a crash in the middle of a run."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fail_on = fail_on

    def encode_image(self, pixel_values):
        if len(self.image_calls) + 1 == self.fail_on:
            raise RuntimeError("simulated crash")
        return super().encode_image(pixel_values)


def test_a_crash_keeps_committed_batches_and_the_next_run_continues(tmp_path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(10):
        (root / f"img{i:02d}.png").write_bytes(image_bytes(NAMES[i % len(NAMES)], seed=i))
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(root, tmp_path / "idx", FailingModel(fail_on=3), batch_size=3)
    model = ColourModel()
    index = build(root, tmp_path / "idx", model, batch_size=3)
    assert index.last_report.unchanged == 6  # two batches of 3 were committed before the crash
    assert sum(model.image_calls) == 4  # only the rest was embedded
    assert len(index) == 10
    ids = [h.id for h in index.search("red", k=10)]
    assert len(ids) == len(set(ids)) == 10


def test_killing_the_indexer_loses_at_most_one_batch(tmp_path) -> None:
    """SIGKILL a real indexing process after its first commits; the next run completes."""
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(40):
        (root / f"img{i:02d}.png").write_bytes(image_bytes(NAMES[i % len(NAMES)], seed=i))
    tests_dir = Path(__file__).resolve().parent
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(tests_dir)!r})
        from test_search_fixtures import ColourModel
        from imagefm.apps.search import Index

        class Slow(ColourModel):
            def encode_image(self, pixels):
                time.sleep(0.3)
                return super().encode_image(pixels)

        Index.build({str(root)!r}, {str(tmp_path / "idx")!r}, Slow(), batch_size=4, workers=0)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tests_dir.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    store = tmp_path / "idx" / "index.sqlite"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if store.is_file() and _count_rows(store) >= 8:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the indexer committed nothing in 60 s")
        process.kill()
    finally:
        process.wait(timeout=30)
    done = _count_rows(store)
    assert 8 <= done < 40
    model = ColourModel()
    index = build(root, tmp_path / "idx", model, batch_size=4)
    assert index.last_report.unchanged == done
    assert sum(model.image_calls) == 40 - done
    assert len(index) == 40


def _count_rows(store: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(store) as db:
            return int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def test_worker_processes_give_the_same_vectors(photos, tmp_path) -> None:
    root, paths = photos
    serial = build(root, tmp_path / "a", workers=0)
    parallel = build(root, tmp_path / "b", workers=2)
    for name in NAMES:
        a, b = serial.search(name, k=3), parallel.search(name, k=3)
        assert [h.path for h in a] == [h.path for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)


def test_another_model_is_refused(photos, tmp_path) -> None:
    root, _ = photos
    build(root, tmp_path / "idx").close()
    other = ColourModel()
    with np.errstate(all="ignore"):
        other.colour_table.data *= 2
    with pytest.raises(SearchIndexError, match="another model"):
        Index.open(tmp_path / "idx", other)
    with pytest.raises(SearchIndexError, match="indexes"):
        build(tmp_path, tmp_path / "idx")  # same index, another folder


def test_one_writer_at_a_time(photos, tmp_path) -> None:
    import fcntl

    root, _ = photos
    build(root, tmp_path / "idx").close()
    with open(tmp_path / "idx" / ".lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(SearchIndexError, match="another process"):
            build(root, tmp_path / "idx")


def test_links_out_of_the_folder_are_not_indexed(photos, tmp_path) -> None:
    root, _ = photos
    outside = tmp_path / "secret.png"
    outside.write_bytes(image_bytes("red"))
    (root / "link_out.png").symlink_to(outside)
    (root / "link_in.png").symlink_to(root / "red.png")
    (root / "dir_link").symlink_to(tmp_path, target_is_directory=True)  # not followed: no loop
    index = build(root, tmp_path / "idx")
    assert index.last_report.skipped == 1
    paths = {h.path for h in index.search("red", k=20)}
    assert "link_in.png" in paths and "link_out.png" not in paths
    assert not any(p.startswith("dir_link") for p in paths)


def test_image_path_refuses_files_swapped_for_links_after_indexing(photos, tmp_path) -> None:
    root, paths = photos
    index = build(root, tmp_path / "idx")
    hit = index.search("red", k=1)[0]
    assert index.image_path(hit.id) == root.resolve() / paths["red"]
    (root / paths["red"]).unlink()
    (root / paths["red"]).symlink_to("/etc/passwd")
    assert index.image_path(hit.id) is None
    assert index.image_path(10**9) is None


def test_auto_kind_switches_to_hnsw_past_the_threshold(tmp_path) -> None:
    from imagefm.apps.search import VectorIndexConfig

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(12):
        (root / f"{i}.png").write_bytes(image_bytes(NAMES[i % len(NAMES)], seed=i))
    index = build(root, tmp_path / "idx", config=VectorIndexConfig(exact_threshold=20))
    assert index.kind == "flat"
    for i in range(12, 24):
        (root / f"{i}.png").write_bytes(image_bytes(NAMES[i % len(NAMES)], seed=i))
    index = build(root, tmp_path / "idx")
    assert index.kind == "hnsw" and len(index) == 24
    assert Index.open(tmp_path / "idx", ColourModel()).kind == "hnsw"
    assert {h.path for h in index.search("red", k=4)} == {"0.png", "6.png", "12.png", "18.png"}


def test_ivfpq_on_a_small_folder_is_exact_and_says_so(photos, tmp_path, caplog) -> None:
    from imagefm.apps.search import VectorIndexConfig

    root, _ = photos
    with caplog.at_level("WARNING"):
        index = build(root, tmp_path / "idx", config=VectorIndexConfig(kind="ivfpq"))
    assert index.kind == "flat" and "at least 256 images" in caplog.text


def test_a_real_tiny_model_from_its_checkpoint(tmp_path) -> None:
    """The whole path with a real (random) tiny CLIP: an image query finds itself first, and a
    reopened index reloads the model from the recorded checkpoint path."""
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    root = tmp_path / "photos"
    make_colour_folder(root)
    index = Index.build(root, tmp_path / "idx", checkpoint, workers=0)
    assert len(index) == len(NAMES) and index.dim == 128
    for rel in ("red.png", "sub/deeper/blue.webp"):
        hit = index.search(root / rel, k=1)[0]
        assert hit.path == rel and hit.score > 0.999
    index.close()
    reopened = Index.open(tmp_path / "idx")
    hits = reopened.search("빨간 자동차", k=3)
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    assert reopened.search(root / "red.png", k=1)[0].path == "red.png"


def test_an_emptied_folder_does_not_wipe_the_index(photos, tmp_path) -> None:
    root, _ = photos
    build(root, tmp_path / "idx").close()
    for path in sorted(root.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    with pytest.raises(SearchIndexError, match="mounted"):
        build(root, tmp_path / "idx")
    assert len(Index.open(tmp_path / "idx", ColourModel())) == len(NAMES)


def test_an_unguarded_script_still_indexes_when_the_workers_break(tmp_path) -> None:
    """With spawn, workers re-import the main script; an unguarded one breaks the pool. The
    files are then read in the main process, with a warning saying why."""
    root = tmp_path / "photos"
    make_colour_folder(root)
    tests_dir = Path(__file__).resolve().parent
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tests_dir)!r})
        from test_search_fixtures import ColourModel
        from imagefm.apps.search import Index
        index = Index.build({str(root)!r}, {str(tmp_path / "idx")!r}, ColourModel(), workers=1)
        print("indexed", len(index))
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tests_dir.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"indexed {len(NAMES)}" in result.stdout
    assert "__main__" in result.stderr  # the warning names the fix
