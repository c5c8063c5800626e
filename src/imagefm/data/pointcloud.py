"""3D shapes as point clouds: read PLY / OBJ / STL / OFF, sample surface points, normalise.

    cloud = load_point_cloud("bunny.ply", num_points=1024, seed=0)   # PointCloud
    cloud.points   # [N, 3] float32, centred, inside the unit sphere
    cloud.colours  # [N, 3] float32 in [0, 1], or None when the file has none

Meshes (faces) are sampled uniformly over their surface, area-weighted, so a cloud describes the
shape whatever its triangulation; files holding only vertices (a scanned point cloud saved as PLY
or OBJ) are subsampled. Every cloud is then centred on its bounding-box centre and scaled into
the unit sphere, as PointNet++ / Point-BERT / ULIP prepare ModelNet and ShapeNet.

A file that cannot be read (truncated, not the format its name says, no vertices) raises
``PointCloudError`` with one line naming the file; ``iter_point_clouds`` skips such files and
counts them in a ``SkipCounter`` so a long job never stops for one bad mesh.

Reading uses ``trimesh`` (the ``pointcloud`` extra).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagefm.data.formats import SkipCounter

MESH_SUFFIXES = (".ply", ".obj", ".stl", ".off")


class PointCloudError(ValueError):
    """A 3D file could not be turned into a point cloud; the message says which and why."""


@dataclass
class PointCloud:
    """Points [N, 3] (float32) and their colours [N, 3] in [0, 1] (or None)."""

    points: np.ndarray
    colours: np.ndarray | None = None

    def features(self, with_colour: bool) -> np.ndarray:
        """[N, 3] xyz, or [N, 6] xyz + rgb (grey 0.5 where the file had no colours)."""
        if not with_colour:
            return self.points
        colours = self.colours if self.colours is not None else np.full_like(self.points, 0.5)
        return np.concatenate([self.points, colours], axis=1).astype(np.float32)


def _trimesh():
    try:
        import trimesh
    except ImportError as err:  # pragma: no cover - the extra is installed in dev
        raise PointCloudError("reading 3D files needs trimesh: pip install 'imagefm[pointcloud]'"
                              ) from err
    logging.getLogger("trimesh").setLevel(logging.ERROR)  # it warns on every odd file
    return trimesh


def _colours(visual, count: int) -> np.ndarray | None:
    """Per-vertex RGB in [0, 1] when the file stored colours (not textures or a default)."""
    if visual is None or getattr(visual, "kind", None) != "vertex":
        return None
    rgba = np.asarray(visual.vertex_colors)
    if rgba.ndim != 2 or len(rgba) != count:
        return None
    return rgba[:, :3].astype(np.float32) / 255.0


def read_mesh(source: str | Path | bytes, file_type: str | None = None):
    """A ``trimesh.Trimesh`` or ``trimesh.PointCloud`` from a file path or its bytes.

    ``file_type`` ("ply", "obj", "stl", "off") is needed for bytes and otherwise taken from the
    suffix. Scenes (several meshes in one file) are merged into one mesh.
    """
    trimesh = _trimesh()
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if file_type is None and not isinstance(source, bytes):
        file_type = Path(source).suffix.lower().lstrip(".")
    if file_type is None or f".{file_type.lower()}" not in MESH_SUFFIXES:
        raise PointCloudError(f"{name}: unsupported 3D format {file_type!r}; reads "
                              f"{', '.join(MESH_SUFFIXES)}")
    try:
        if isinstance(source, bytes):
            loaded = trimesh.load(io.BytesIO(source), file_type=file_type, process=False)
        else:
            loaded = trimesh.load(str(source), file_type=file_type, process=False)
        if isinstance(loaded, trimesh.Scene):
            geometries = [g for g in loaded.dump() if len(getattr(g, "vertices", ())) > 0]
            if not geometries:
                raise PointCloudError(f"{name}: the file holds no vertices")
            meshes = [g for g in geometries if isinstance(g, trimesh.Trimesh)]
            loaded = trimesh.util.concatenate(meshes) if meshes else geometries[0]
    except PointCloudError:
        raise
    except Exception as err:  # trimesh raises anything from ValueError to IndexError
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise PointCloudError(f"{name}: not a readable {file_type.upper()} file ({first})"
                              ) from None
    vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64)
    if len(vertices) == 0:
        raise PointCloudError(f"{name}: the file holds no vertices")
    if not np.isfinite(vertices).all():
        raise PointCloudError(f"{name}: the file has non-finite vertex coordinates")
    return loaded


def sample_surface(mesh, num_points: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(points [N, 3], colours [N, 3] or None, face index [N] or None)``: area-weighted points
    on the faces of ``mesh`` (colours interpolated), or drawn from its vertices when it has no
    faces of any area (with repeats when there are too few; face index None)."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    colours = _colours(getattr(mesh, "visual", None), len(vertices))
    if colours is None and len(getattr(mesh, "colors", ())):
        colours = np.asarray(mesh.colors)[:, :3].astype(np.float32) / 255.0  # a PointCloud
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    if len(faces):
        corners = vertices[faces]  # [F, 3, 3]
        areas = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0],
                                              corners[:, 2] - corners[:, 0]), axis=1)
        if areas.sum() > 0:
            face = rng.choice(len(faces), size=num_points, p=areas / areas.sum())
            # Uniform barycentric coordinates: fold the unit square onto the triangle.
            u, v = rng.random(num_points), rng.random(num_points)
            flip = u + v > 1
            u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
            weights = np.stack([1 - u - v, u, v], axis=1)  # [N, 3]
            points = np.einsum("nk,nkd->nd", weights, corners[face]).astype(np.float32)
            rgb = (np.einsum("nk,nkd->nd", weights, colours[faces[face]]).astype(np.float32)
                   if colours is not None else None)
            return points, rgb, face
    index = rng.choice(len(vertices), size=num_points, replace=len(vertices) < num_points)
    return (vertices[index].astype(np.float32), None if colours is None else colours[index],
            None)


def sample_points(mesh, num_points: int, rng: np.random.Generator) -> PointCloud:
    """``num_points`` points on the surface of ``mesh`` (see ``sample_surface``)."""
    points, colours, _ = sample_surface(mesh, num_points, rng)
    return PointCloud(points, colours)


def normalise(points: np.ndarray) -> np.ndarray:
    """Centre on the bounding-box centre and scale so the farthest point is at radius 1."""
    points = np.asarray(points, dtype=np.float32)
    centred = points - (points.max(axis=0) + points.min(axis=0)) / 2
    radius = float(np.linalg.norm(centred, axis=1).max())
    return centred / radius if radius > 0 else centred


def load_point_cloud(source: str | Path | bytes, num_points: int = 1024, *, seed: int = 0,
                     file_type: str | None = None) -> PointCloud:
    """Read a PLY / OBJ / STL / OFF file and return ``num_points`` normalised surface points."""
    cloud = sample_points(read_mesh(source, file_type), num_points, np.random.default_rng(seed))
    return PointCloud(normalise(cloud.points), cloud.colours)


def mesh_files(root: str | Path) -> list[Path]:
    """The PLY / OBJ / STL / OFF files under ``root`` (recursively, sorted; any case)."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)


def iter_point_clouds(paths: Iterable[str | Path], num_points: int = 1024, *, seed: int = 0,
                      skips: SkipCounter | None = None) -> Iterator[tuple[Path, PointCloud]]:
    """``(path, cloud)`` for every readable file; unreadable ones are counted in ``skips``
    (reason ``"unreadable 3D file"``) and left out."""
    for path in paths:
        try:
            cloud = load_point_cloud(path, num_points, seed=seed)
        except PointCloudError as err:
            if skips is not None:
                skips.add("unreadable 3D file", str(err))
            continue
        if skips is not None:
            skips.ok()
        yield Path(path), cloud


# ---------------------------------------------------------------- augmentation
def random_rotation(rng: np.random.Generator, axis: str | None = None) -> np.ndarray:
    """A random rotation matrix [3, 3]: uniform over SO(3) (``axis=None``, from a QR of a
    Gaussian matrix with the sign fixed), or about one axis ("x", "y", "z") by a uniform angle."""
    if axis is None:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))  # Haar-uniform orthogonal matrix
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]  # a rotation, not a reflection
        return q.astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    matrix = np.eye(3, dtype=np.float32)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def augment(points: np.ndarray, rng: np.random.Generator, *, rotate: str | None = "z",
            scale: tuple[float, float] = (0.85, 1.15), jitter: float = 0.01,
            clip: float = 0.03) -> np.ndarray:
    """Training augmentation of xyz (the first 3 columns; colours pass through): a random
    rotation ("z": about the up axis, "so3": any, None: none), an anisotropic scale, and
    clipped Gaussian jitter per point (PointNet++'s recipe)."""
    out = np.array(points, dtype=np.float32, copy=True)
    xyz = out[:, :3]
    if rotate is not None:
        xyz = xyz @ random_rotation(rng, None if rotate == "so3" else rotate).T
    xyz = xyz * rng.uniform(*scale, size=3).astype(np.float32)
    if jitter > 0:
        xyz = xyz + np.clip(jitter * rng.standard_normal(xyz.shape), -clip, clip)
    out[:, :3] = xyz
    return out
