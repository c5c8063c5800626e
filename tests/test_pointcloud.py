"""Point clouds from 3D files (PLY / OBJ / STL / OFF) and the synthetic 3D shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trimesh")
import trimesh  # noqa: E402

from imagefm.data.formats import SkipCounter  # noqa: E402
from imagefm.data.pointcloud import (  # noqa: E402
    PointCloudError,
    augment,
    iter_point_clouds,
    load_point_cloud,
    mesh_files,
    random_rotation,
)
from imagefm.data.synthetic.shapes3d import (  # noqa: E402
    HELD_OUT3D,
    SHAPES3D,
    Object3D,
    Shape3DSpec,
    build_mesh,
    read_shapes3d,
    render_mesh,
    sample_shape3d,
    shape3d_captions,
    write_shapes3d,
)

ASSIMP = Path("/usr/share/assimp/models")  # Debian assimp-testmodels (BSD-3-clause)
needs_assimp = pytest.mark.skipif(not ASSIMP.is_dir(),
                                  reason="apt-get install assimp-testmodels")


def on_cube_surface(points: np.ndarray) -> np.ndarray:
    """For a centred axis-aligned cube every surface point has the same largest |coordinate|
    (half the side): the spread of that value over the points."""
    largest = np.abs(points).max(axis=1)
    return np.abs(largest - largest.max())


@pytest.mark.parametrize("suffix", ["ply", "obj", "stl", "off"])
def test_written_cube_reads_back_as_surface_points(tmp_path, suffix):
    path = tmp_path / f"box.{suffix}"
    data = trimesh.creation.box((2.0, 2.0, 2.0)).export(file_type=suffix)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    cloud = load_point_cloud(path, 500, seed=1)
    assert cloud.points.shape == (500, 3) and cloud.points.dtype == np.float32
    assert np.linalg.norm(cloud.points, axis=1).max() == pytest.approx(1.0, abs=1e-5)
    assert on_cube_surface(cloud.points).max() < 1e-5
    # Surface sampling covers all six faces, not only the vertices.
    half = np.abs(cloud.points).max()
    faces = {(axis, sign) for p in cloud.points for axis in range(3)
             for sign in (-1, 1) if abs(p[axis] - sign * half) < 1e-5}
    assert len(faces) == 6
    again = load_point_cloud(path.read_bytes(), 500, seed=1, file_type=suffix)  # from bytes
    np.testing.assert_allclose(again.points, cloud.points)


@needs_assimp
@pytest.mark.parametrize("name", ["PLY/cube.ply", "PLY/cube_binary.ply", "OBJ/box.obj",
                                  "OFF/Cube.off"])
def test_real_cube_files(name):
    cloud = load_point_cloud(ASSIMP / name, 300)
    assert cloud.points.shape == (300, 3)
    assert on_cube_surface(cloud.points).max() < 1e-4


@needs_assimp
def test_real_stl_colours_and_point_only_files():
    spider = load_point_cloud(ASSIMP / "STL/Spider_binary.stl", 256)
    ascii_spider = load_point_cloud(ASSIMP / "STL/Spider_ascii.stl", 256)
    # The same spider in binary and ASCII STL: the same bounding box once normalised.
    np.testing.assert_allclose(np.ptp(spider.points, axis=0), np.ptp(ascii_spider.points, axis=0),
                               atol=0.05)
    coloured = load_point_cloud(ASSIMP / "OBJ/cube_with_vertexcolors.obj", 200)
    assert coloured.colours is not None and coloured.colours.shape == (200, 3)
    assert coloured.colours.min() >= 0 and coloured.colours.max() <= 1
    assert load_point_cloud(ASSIMP / "STL/Spider_binary.stl", 10).colours is None


@needs_assimp
@pytest.mark.parametrize("name", ["invalid/empty.ply", "invalid/malformed.obj",
                                  "invalid/OutOfMemory.off", "invalid/empty.obj",
                                  "invalid/empty.off"])
def test_real_bad_files_raise_one_clear_error(name):
    with pytest.raises(PointCloudError, match=Path(name).name):
        load_point_cloud(ASSIMP / name, 64)


def test_bad_files_are_skipped_and_counted(tmp_path):
    good = tmp_path / "good.stl"
    good.write_bytes(trimesh.creation.icosphere().export(file_type="stl"))
    (tmp_path / "truncated.stl").write_bytes(good.read_bytes()[:150])
    (tmp_path / "garbage.off").write_text("OFF\n3 1 0\n0 0 0\n1 x 0\n")
    (tmp_path / "text.ply").write_text("this is not a ply file\n")
    (tmp_path / "empty.obj").write_text("# nothing\n")
    (tmp_path / "notes.txt").write_text("ignored: not a 3D suffix")
    files = mesh_files(tmp_path)
    assert [f.name for f in files] == ["empty.obj", "garbage.off", "good.stl", "text.ply",
                                       "truncated.stl"]
    skips = SkipCounter()
    read = list(iter_point_clouds(files, 128, skips=skips))
    assert [p.name for p, _ in read] == ["good.stl"]
    assert skips.seen == 5 and skips.skipped == {"unreadable 3D file": 4}
    with pytest.raises(PointCloudError, match="unsupported 3D format"):
        load_point_cloud(tmp_path / "notes.txt")


def test_rotation_and_augmentation():
    rng = np.random.default_rng(0)
    for axis in (None, "z"):
        r = random_rotation(rng, axis)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-5)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-5)
    points = np.random.default_rng(1).normal(size=(100, 6)).astype(np.float32)
    out = augment(points, rng, rotate="z", scale=(1.0, 1.0), jitter=0.0)
    np.testing.assert_allclose(out[:, 2], points[:, 2], atol=1e-6)  # the up axis is kept
    np.testing.assert_allclose(np.linalg.norm(out[:, :2], axis=1),
                               np.linalg.norm(points[:, :2], axis=1), atol=1e-5)
    np.testing.assert_array_equal(out[:, 3:], points[:, 3:])  # colours pass through


def test_held_out_split_is_by_colour_shape_combination():
    rng = np.random.default_rng(0)
    train = [sample_shape3d(rng, split="train") for _ in range(200)]
    test = [sample_shape3d(rng, split="test") for _ in range(50)]
    seen = {(o.colour, o.shape) for s in train for o in s.objects}
    assert not seen & HELD_OUT3D
    assert all(s.is_held_out() for s in test)
    # Every held-out colour and shape still appears in training with other partners.
    assert {c for c, _ in HELD_OUT3D} <= {c for c, _ in seen}
    assert {s for _, s in HELD_OUT3D} <= {s for _, s in seen}


def test_captions_name_the_objects_in_both_languages():
    rng = np.random.default_rng(3)
    spec = Shape3DSpec((Object3D("cone", "red", "small"), Object3D("cube", "blue")), "on")
    for _ in range(10):
        en = shape3d_captions(spec, "en", rng, k=3)
        assert len(en) == 3 and all("red cone" in c and "blue cube" in c for c in en)
        ko = shape3d_captions(spec, "ko", rng, k=3)
        assert all("원뿔" in c and ("정육면체" in c or "상자" in c) for c in ko)
        assert all("위" in c for c in ko)
    texts = [c for _ in range(20) for c in shape3d_captions(spec, "ko", rng, k=3)]
    assert any("원뿔이 " in c for c in texts)  # the particle after a consonant-final word
    single = Shape3DSpec((Object3D("sphere", "green"),))
    assert any("구" in c for c in shape3d_captions(single, "ko", rng, k=4))
    assert set(SHAPES3D) == {"cube", "sphere", "cylinder", "cone", "torus", "pyramid",
                             "capsule"}


def test_meshes_renderings_and_dataset_on_disk(tmp_path):
    rng = np.random.default_rng(0)
    spec = Shape3DSpec((Object3D("sphere", "red", "small"), Object3D("cube", "blue")), "on")
    mesh = build_mesh(spec, rng)
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(int)
    top = np.asarray(mesh.vertices)[:, 2] > np.asarray(mesh.vertices)[:, 2].mean() + 0.3
    assert colours[top, 0].mean() > 150 and colours[top, 2].mean() < 100  # the red sphere sits
    picture = render_mesh(mesh, 48)
    pixels = np.asarray(picture)
    assert picture.size == (48, 48) and pixels.std() > 10
    meta = write_shapes3d(tmp_path, 6, seed=0, image_size=32)
    records = read_shapes3d(tmp_path)
    assert len(records) == 6 == sum(meta["splits"].values())
    for record in records:
        assert (tmp_path / record["image"]).is_file()
        cloud = load_point_cloud(tmp_path / record["mesh"], 64)
        assert cloud.colours is not None  # the PLY keeps the vertex colours
        assert record["captions"]["en"] and record["captions"]["ko"]


def test_cli_read_reports_skipped_files(tmp_path):
    import typer
    from typer.testing import CliRunner

    from imagefm.cli.points import register

    app = typer.Typer()
    register(app)
    (tmp_path / "a.off").write_bytes(trimesh.creation.box().export(file_type="off").encode())
    (tmp_path / "b.stl").write_text("solid broken\nfacet normal 0 0\n")
    result = CliRunner().invoke(app, ["points", "read", str(tmp_path), "--num-points", "32"])
    assert result.exit_code == 0, result.output
    assert "a.off: 32 points, no colours" in result.output
    assert "read 1 of 2 files; skipped 1" in result.output
