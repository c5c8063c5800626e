"""Synthetic 3D shapes: coloured primitives and two-object arrangements, captioned in English and
Korean, with a rendered picture of the same shape (for point ↔ image alignment, as ULIP).

    spec = sample_shape3d(rng)                       # Shape3DSpec: objects, relation
    mesh = build_mesh(spec, rng)                     # trimesh.Trimesh with vertex colours
    captions = shape3d_captions(spec, "ko", rng)     # ["파란 구 위에 있는 빨간 정육면체", ...]
    picture = render_mesh(mesh, 96)                  # PIL image, a fixed 3/4 view
    write_shapes3d("data/shapes3d", 1200, seed=0)    # meshes/*.ply, images/*.png, records.jsonl

Colours and the Korean grammar come from the 2D synthetic engine (``vocab.COLOURS``,
``korean.attach``), so a word means the same in every synthetic set. The held-out split is by
(colour, shape) combination: each shape has one colour that never appears on it in training,
while every colour and every shape is seen with other partners.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imagefm.checkpoint import atomic_write, atomic_write_text
from imagefm.data.pointcloud import sample_surface
from imagefm.data.synthetic.korean import attach
from imagefm.data.synthetic.vocab import COLOURS, SIZES, article


@dataclass(frozen=True)
class Shape3D:
    """A 3D primitive's names: English, Korean (canonical) and a Korean alternative."""

    name: str
    en: str
    ko: str
    ko_alternatives: tuple[str, ...] = ()


SHAPES3D: dict[str, Shape3D] = {s.name: s for s in (
    Shape3D("cube", "cube", "정육면체", ("상자",)),
    Shape3D("sphere", "sphere", "구", ("공",)),
    Shape3D("cylinder", "cylinder", "원기둥"),
    Shape3D("cone", "cone", "원뿔"),
    Shape3D("torus", "torus", "도넛", ("토러스",)),
    Shape3D("pyramid", "pyramid", "사각뿔", ("피라미드",)),
    Shape3D("capsule", "capsule", "캡슐"),
)}
SHAPE3D_NAMES: tuple[str, ...] = tuple(SHAPES3D)
# Colours far apart in RGB that stay visible on a light background (the 2D engine's palette
# without white, grey and pink, which blur with the background and with each other when shaded).
COLOUR3D_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange",
                                   "black", "brown")
HELD_OUT3D: frozenset[tuple[str, str]] = frozenset({
    ("red", "cube"), ("green", "sphere"), ("blue", "cylinder"), ("yellow", "cone"),
    ("purple", "torus"), ("orange", "pyramid"), ("brown", "capsule"),
})
RELATIONS3D = {"on": ("on top of", "위"), "next": ("next to", "옆")}
SIZE_SCALE = {"small": 0.6, "large": 1.0}


@dataclass(frozen=True)
class Object3D:
    shape: str
    colour: str
    size: str = "large"


@dataclass(frozen=True)
class Shape3DSpec:
    """One object, or two with a relation: objects[0] is ``relation`` objects[1]."""

    objects: tuple[Object3D, ...]
    relation: str | None = None  # on | next (two objects only)

    @property
    def layout(self) -> str:
        return "single" if len(self.objects) == 1 else "pair"

    def is_held_out(self, held_out: frozenset[tuple[str, str]] = HELD_OUT3D) -> bool:
        return any((o.colour, o.shape) in held_out for o in self.objects)

    def to_json(self) -> dict[str, Any]:
        return {"objects": [o.__dict__ for o in self.objects], "relation": self.relation}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Shape3DSpec:
        return cls(tuple(Object3D(**o) for o in data["objects"]), data.get("relation"))


# ---------------------------------------------------------------- sampling
def sample_shape3d(rng: np.random.Generator, *, split: str = "train", pair_fraction: float = 0.3,
                   held_out: frozenset[tuple[str, str]] = HELD_OUT3D) -> Shape3DSpec:
    """A random spec of ``split``: "train" never uses a held-out (colour, shape) combination;
    "test" always does (in at least one object)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def draw() -> Object3D:
        return Object3D(SHAPE3D_NAMES[rng.integers(len(SHAPE3D_NAMES))],
                        COLOUR3D_NAMES[rng.integers(len(COLOUR3D_NAMES))],
                        ("small", "large")[rng.integers(2)])

    while True:
        if rng.random() < pair_fraction:
            spec = Shape3DSpec((draw(), draw()), ("on", "next")[rng.integers(2)])
            if spec.objects[0].shape == spec.objects[1].shape:
                continue  # "a cube next to a cube" says little about either
        else:
            spec = Shape3DSpec((draw(),))
        if spec.is_held_out(held_out) == (split == "test"):
            return spec


# ---------------------------------------------------------------- geometry
def primitive(shape: str):
    """A watertight unit-sized mesh of ``shape`` (about 1 across), resting on z = 0."""
    import trimesh

    creation = trimesh.creation
    if shape == "cube":
        mesh = creation.box((0.9, 0.9, 0.9))
    elif shape == "sphere":
        mesh = creation.icosphere(subdivisions=2, radius=0.5)
    elif shape == "cylinder":
        mesh = creation.cylinder(radius=0.4, height=1.0, sections=24)
    elif shape == "cone":
        mesh = creation.cone(radius=0.5, height=1.0, sections=24)
    elif shape == "torus":
        mesh = creation.torus(major_radius=0.4, minor_radius=0.13, major_sections=24,
                              minor_sections=12)
    elif shape == "pyramid":
        mesh = creation.cone(radius=0.6, height=0.9, sections=4)
    elif shape == "capsule":
        mesh = creation.capsule(height=0.7, radius=0.25, count=[12, 12])
    else:
        raise ValueError(f"unknown 3D shape {shape!r}; known: {', '.join(SHAPE3D_NAMES)}")
    mesh.apply_translation([0, 0, -mesh.bounds[0][2]])
    return mesh


def build_mesh(spec: Shape3DSpec, rng: np.random.Generator):
    """The spec as one mesh with per-vertex colours: objects scaled by size, turned about the
    vertical axis at random, then stacked (``on``) or placed side by side (``next``)."""
    import trimesh

    from imagefm.data.pointcloud import random_rotation

    parts = []
    for obj in spec.objects:
        mesh = primitive(obj.shape)
        mesh.apply_scale(SIZE_SCALE[obj.size])
        turn = np.eye(4)
        turn[:3, :3] = random_rotation(rng, "z")
        mesh.apply_transform(turn)
        mesh.apply_translation([-mesh.centroid[0], -mesh.centroid[1], -mesh.bounds[0][2]])
        rgb = np.array(COLOURS[obj.colour].rgb, dtype=np.float64)
        shade = np.clip(rgb + rng.normal(0, 8, size=3), 0, 255)
        rgba = np.append(shade, 255).astype(np.uint8)
        mesh.visual = trimesh.visual.ColorVisuals(
            mesh, vertex_colors=np.tile(rgba, (len(mesh.vertices), 1)))
        parts.append(mesh)
    if spec.relation == "on":
        parts[0].apply_translation([0, 0, parts[1].bounds[1][2]])
    elif spec.relation == "next":
        gap = 0.1
        parts[0].apply_translation([-parts[0].bounds[1][0] - gap / 2, 0, 0])
        parts[1].apply_translation([-parts[1].bounds[0][0] + gap / 2, 0, 0])
    return trimesh.util.concatenate(parts) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------- captions
def _noun_en(obj: Object3D, rng: np.random.Generator, size: bool) -> str:
    words = ([SIZES[obj.size][0]] if size and rng.random() < 0.5 else [])
    return " ".join([*words, COLOURS[obj.colour].en, SHAPES3D[obj.shape].en])


def _noun_ko(obj: Object3D, rng: np.random.Generator, size: bool) -> str:
    forms = COLOURS[obj.colour].ko_attributive
    shape = SHAPES3D[obj.shape]
    name = shape.ko
    if shape.ko_alternatives and rng.random() < 0.15:
        name = shape.ko_alternatives[rng.integers(len(shape.ko_alternatives))]
    words = ([SIZES[obj.size][1]] if size and rng.random() < 0.5 else [])
    return " ".join([*words, forms[rng.integers(len(forms))], name])


def shape3d_captions(spec: Shape3DSpec, lang: str, rng: np.random.Generator, k: int = 2
                     ) -> list[str]:
    """``k`` captions (distinct templates) of ``spec`` in ``lang`` ("en" | "ko").

    Sizes are mentioned only for pairs: a single object is normalised to the unit sphere, so its
    size is not in the point cloud."""
    if lang not in ("en", "ko"):
        raise ValueError(f"captions are in 'en' or 'ko', got {lang!r}")
    pair = spec.layout == "pair"

    def a(i: int) -> str:
        fn = _noun_en if lang == "en" else _noun_ko
        return fn(spec.objects[i], rng, pair)

    if lang == "en":
        def an(i: int) -> str:
            phrase = a(i)
            return f"{article(phrase)} {phrase}"
        if not pair:
            templates = [lambda: an(0), lambda: f"a 3D model of {an(0)}",
                         lambda: f"a point cloud of {an(0)}", lambda: f"{an(0)} shape"]
        elif spec.relation == "on":
            templates = [lambda: f"{an(0)} on top of {an(1)}",
                         lambda: f"{an(1)} with {an(0)} on top",
                         lambda: f"a 3D model of {an(0)} stacked on {an(1)}"]
        else:
            templates = [lambda: f"{an(0)} next to {an(1)}",
                         lambda: f"{an(0)} and {an(1)} side by side",
                         lambda: f"a 3D model of {an(1)} beside {an(0)}"]
    else:
        if not pair:
            templates = [lambda: a(0), lambda: f"{a(0)}의 3D 모델", lambda: f"{a(0)} 모양",
                         lambda: f"{a(0)} 포인트 클라우드"]
        else:
            where = RELATIONS3D[spec.relation][1]
            if spec.relation == "on":
                templates = [lambda: f"{a(1)} {where}에 있는 {a(0)}",
                             lambda: f"{attach(a(0), '이/가')} {a(1)} {where}에 놓여 있다",
                             lambda: f"{a(1)} {where}에 올려진 {a(0)}"]
            else:
                templates = [lambda: f"{a(1)} {where}에 있는 {a(0)}",
                             lambda: f"{attach(a(0), '와/과')} {attach(a(1), '이/가')} "
                                     f"나란히 있다",
                             lambda: f"{a(0)} {where}의 {a(1)}"]
    captions: list[str] = []
    for index in rng.permutation(len(templates))[:k].tolist():
        text = templates[index]()
        if text not in captions:
            captions.append(text)
    return captions


def class_prompts(lang: str) -> dict[str, list[str]]:
    """Zero-shot prompts per shape class: the caption templates of a single object, without
    colour (the class is the shape)."""
    if lang == "en":
        return {n: [f"a {s.en}", f"a 3D model of a {s.en}", f"a point cloud of a {s.en}"]
                for n, s in SHAPES3D.items()}
    if lang == "ko":
        return {n: [s.ko, f"{s.ko}의 3D 모델", f"{s.ko} 모양"] for n, s in SHAPES3D.items()}
    raise ValueError(f"prompts are in 'en' or 'ko', got {lang!r}")


# ---------------------------------------------------------------- rendering
def render_mesh(mesh, size: int = 96, *, samples: int = 12000, azimuth: float = 35.0,
                elevation: float = 25.0, seed: int = 0) -> Image.Image:
    """A shaded picture of ``mesh`` from a fixed 3/4 view: dense surface samples projected
    orthographically, nearest point per pixel (a z-buffer), Lambert shading from the faces'
    normals, on a light grey background. Small and dependency-free (numpy + Pillow)."""
    rng = np.random.default_rng(seed)
    points, colours, face = sample_surface(mesh, samples, rng)
    normals = (np.asarray(mesh.face_normals)[face] if face is not None
               else np.zeros_like(points))
    colours = colours if colours is not None else np.full_like(points, 0.7)
    az, el = np.radians(azimuth), np.radians(elevation)
    # Camera basis: right, up, and the direction towards the viewer.
    toward = np.array([np.sin(az) * np.cos(el), -np.cos(az) * np.cos(el), np.sin(el)])
    right = np.array([np.cos(az), np.sin(az), 0.0])
    up = np.cross(toward, right)
    centred = points - (points.max(0) + points.min(0)) / 2
    scale = np.abs(centred).max() * 1.15 or 1.0
    u = ((centred @ right) / scale * 0.5 + 0.5) * (size - 1)
    v = (0.5 - (centred @ up) / scale * 0.5) * (size - 1)
    depth = centred @ toward
    light = np.array([0.4, -0.5, 0.77])
    shade = 0.35 + 0.65 * np.clip(normals @ (light / np.linalg.norm(light)), 0, 1)
    rgb = np.clip(colours * shade[:, None], 0, 1)
    image = np.tile(np.linspace(0.92, 0.8, size)[:, None, None], (1, size, 3))
    order = np.argsort(depth)  # far first: nearer points overwrite them
    for du, dv in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cols = np.clip(np.round(u[order]).astype(int) + du, 0, size - 1)
        rows = np.clip(np.round(v[order]).astype(int) + dv, 0, size - 1)
        image[rows, cols] = rgb[order]  # numpy assigns repeated indices in order
    return Image.fromarray((image * 255).astype(np.uint8))


# ---------------------------------------------------------------- a dataset on disk
def generate_shapes3d(count: int, *, seed: int = 0, test_fraction: float = 0.2,
                      captions_per_lang: int = 2) -> Iterator[tuple[dict, Any]]:
    """``(record, mesh)`` pairs; record = {"id", "split", "spec", "captions": {en, ko}}. Item
    ``i`` depends only on (seed, i)."""
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        split = "test" if rng.random() < test_fraction else "train"
        spec = sample_shape3d(rng, split=split)
        mesh = build_mesh(spec, rng)
        captions = {lang: shape3d_captions(spec, lang, rng, captions_per_lang)
                    for lang in ("en", "ko")}
        yield {"id": f"{index:06d}", "split": split, "spec": spec.to_json(),
               "captions": captions}, mesh


def write_shapes3d(out_dir: str | Path, count: int, *, seed: int = 0, image_size: int = 96,
                   test_fraction: float = 0.2) -> dict[str, Any]:
    """Write ``meshes/<id>.ply`` (coloured mesh), ``images/<id>.png`` (its rendering) and
    ``records.jsonl`` (one record per line), then ``meta.json``; returns the meta. Feature
    caches a data source left in ``cache/`` are removed (they describe the old set)."""
    out = Path(out_dir)
    for stale in (out / "cache").glob("*.npy"):  # features of a previous set in this folder
        stale.unlink()
    (out / "meshes").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines, splits = [], {"train": 0, "test": 0}
    for record, mesh in generate_shapes3d(count, seed=seed, test_fraction=test_fraction):
        key = record["id"]
        data = mesh.export(file_type="ply")
        atomic_write(out / "meshes" / f"{key}.ply", lambda p, d=data: p.write_bytes(d))
        picture = render_mesh(mesh, image_size, seed=int(key))
        atomic_write(out / "images" / f"{key}.png", lambda p, im=picture: im.save(p, "PNG"))
        record = {**record, "mesh": f"meshes/{key}.ply", "image": f"images/{key}.png"}
        lines.append(json.dumps(record, ensure_ascii=False))
        splits[record["split"]] += 1
    atomic_write_text(out / "records.jsonl", "\n".join(lines) + "\n")
    meta = {"kind": "shapes3d", "count": count, "seed": seed, "image_size": image_size,
            "splits": splits, "held_out": sorted(map(list, HELD_OUT3D)),
            "shapes": list(SHAPE3D_NAMES), "colours": list(COLOUR3D_NAMES)}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def read_shapes3d(root: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The records of a dataset ``write_shapes3d`` wrote (of one split, or all)."""
    path = Path(root) / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write the set with `imagefm points prepare`")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    return [r for r in records if split is None or r["split"] == split]
