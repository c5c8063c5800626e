"""Scenes of coloured shapes: a small spec (what is where) and a renderer (spec → image).

A ``SceneSpec`` says everything the captions and questions may talk about, so text can never
disagree with the picture. Evaluation code can build specs directly, e.g. one object whose
colour varies and nothing else::

    specs = [SceneSpec.single("circle", colour) for colour in COLOUR_NAMES]
    images = [render_scene(spec, 64) for spec in specs]

Three layouts: ``single`` (one object in a named region), ``count`` (n identical objects) and
``pair`` (two different objects in a left/right or above/below relation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from imagefm.data.synthetic.drawing import background, pattern_fill, shape_mask
from imagefm.data.synthetic.vocab import (
    BACKGROUND_KINDS,
    COLOUR_NAMES,
    COLOURS,
    DEFAULT_HELD_OUT,
    POSITIONS,
    RELATIONS,
    SHAPE_NAMES,
    SIZES,
    TEXTURES,
)

LAYOUTS = ("single", "count", "pair")
# Object radius as a fraction of the image side.
SIZE_RADIUS = {"small": 0.11, "large": 0.2}
# Centre of each named region (fractions of the image side).
REGION_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
                  "bottom": (0.5, 0.73), "centre": (0.5, 0.5)}


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is and where its centre lies (fractions of the image side)."""

    shape: str
    colour: str
    size: str = "large"
    texture: str = "solid"
    x: float = 0.5
    y: float = 0.5

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.shape, SHAPE_NAMES, "shape"),
                                     (self.colour, COLOUR_NAMES, "colour"),
                                     (self.size, tuple(SIZES), "size"),
                                     (self.texture, tuple(TEXTURES), "texture")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")

    @property
    def combo(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Background:
    """Background fill kind (plain, gradient, noise) and its named colour."""

    kind: str = "plain"
    colour: str = "white"

    def __post_init__(self) -> None:
        if self.kind not in BACKGROUND_KINDS:
            raise ValueError(f"unknown background kind {self.kind!r}; expected {BACKGROUND_KINDS}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown background colour {self.colour!r}")


@dataclass(frozen=True)
class SceneSpec:
    """Everything about a scene that text may mention, plus a seed for unmentioned detail.

    ``region`` names where a ``single`` object sits; ``relation`` says where ``objects[0]`` is
    relative to ``objects[1]`` in a ``pair``. ``detail_seed`` drives things no caption mentions
    (gradient direction, noise grain, stripe angle), so rendering a spec is deterministic.
    """

    layout: str
    objects: tuple[SceneObject, ...]
    background: Background = field(default_factory=Background)
    region: str | None = None
    relation: str | None = None
    detail_seed: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected {LAYOUTS}")
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        if self.background.colour in {o.colour for o in self.objects}:
            raise ValueError(f"background colour {self.background.colour!r} equals an object "
                             "colour; the object would be invisible")
        looks = {(o.combo, o.size, o.texture) for o in self.objects}
        if self.layout == "count" and len(looks) != 1:
            raise ValueError("a 'count' scene repeats one identical object")
        if self.layout == "pair":
            if len(self.objects) != 2 or self.relation not in RELATIONS:
                raise ValueError("a 'pair' scene has two objects and a relation "
                                 f"in {tuple(RELATIONS)}")
            if self.objects[0].combo == self.objects[1].combo:
                raise ValueError("the two objects of a pair must differ in colour or shape")
        if self.layout == "single" and self.region not in POSITIONS:
            raise ValueError(f"a 'single' scene needs a region in {tuple(POSITIONS)}")

    @property
    def combos(self) -> set[tuple[str, str]]:
        """The (colour, shape) pairs present in the scene."""
        return {o.combo for o in self.objects}

    @classmethod
    def single(cls, shape: str, colour: str, *, size: str = "large", texture: str = "solid",
               region: str = "centre", background: Background | None = None,
               detail_seed: int = 0) -> SceneSpec:
        """One object in a named region; the background defaults to white (black for white)."""
        if background is None:
            background = Background("plain", "black" if colour == "white" else "white")
        x, y = REGION_CENTRES[region]
        obj = SceneObject(shape, colour, size, texture, x, y)
        return cls("single", (obj,), background, region=region, detail_seed=detail_seed)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (lists, not tuples) so a record survives a trip through a shard."""
        data = asdict(self)
        data["objects"] = list(data["objects"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneSpec:
        data = dict(data)
        objects = tuple(SceneObject(**o) for o in data.pop("objects"))
        return cls(objects=objects, background=Background(**data.pop("background")), **data)


@dataclass(frozen=True)
class SceneConfig:
    """What ``sample_scene`` may draw from.

    ``split="train"`` never produces a (colour, shape) pair in ``held_out``; ``split="eval"``
    produces only those pairs; ``split="all"`` ignores the held-out set.
    """

    split: str = "train"
    held_out: frozenset[tuple[str, str]] = DEFAULT_HELD_OUT
    colours: tuple[str, ...] = COLOUR_NAMES
    shapes: tuple[str, ...] = SHAPE_NAMES
    layouts: tuple[str, ...] = LAYOUTS
    textures: tuple[str, ...] = tuple(TEXTURES)
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    background_colours: tuple[str, ...] = COLOUR_NAMES
    max_count: int = 5
    # Random offset of objects from their region centre, as a fraction of the image side. A
    # small ViT learns shapes far more slowly when their alignment to the patch grid varies.
    jitter: float = 0.05

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval", "all"):
            raise ValueError(f"split must be 'train', 'eval' or 'all', got {self.split!r}")
        if not 0 <= self.jitter <= 0.1:
            raise ValueError(f"jitter must be in [0, 0.1] of the image side, got {self.jitter}")
        if not 1 <= self.max_count <= 6:
            raise ValueError(f"max_count must be in 1..6 (small objects on a 3x3 grid), "
                             f"got {self.max_count}")
        object.__setattr__(self, "held_out", frozenset(tuple(c) for c in self.held_out))
        unknown = [c for c in self.held_out
                   if len(c) != 2 or c[0] not in COLOURS or c[1] not in SHAPE_NAMES]
        if unknown:
            raise ValueError(f"held-out pairs must be (colour, shape) from the vocabulary; "
                             f"unknown: {sorted(unknown)}")
        for name, values, known in (("colours", self.colours, COLOUR_NAMES),
                                    ("shapes", self.shapes, SHAPE_NAMES),
                                    ("layouts", self.layouts, LAYOUTS),
                                    ("textures", self.textures, tuple(TEXTURES)),
                                    ("backgrounds", self.backgrounds, BACKGROUND_KINDS),
                                    ("background_colours", self.background_colours,
                                     COLOUR_NAMES)):
            if not values or any(v not in known for v in values):
                raise ValueError(f"{name} must be a non-empty subset of {known}, got {values}")
        if not self.allowed_combos():
            raise ValueError(f"no (colour, shape) combination is allowed for split "
                             f"{self.split!r} with held_out={sorted(self.held_out)}")

    def allowed_combos(self) -> list[tuple[str, str]]:
        """The (colour, shape) pairs this split may draw, in a fixed order."""
        combos = [(c, s) for c in self.colours for s in self.shapes]
        if self.split == "train":
            return [combo for combo in combos if combo not in self.held_out]
        if self.split == "eval":
            return [combo for combo in combos if combo in self.held_out]
        return combos


def _pick(rng: np.random.Generator, options: tuple | list) -> Any:
    return options[int(rng.integers(len(options)))]


def _background_for(rng: np.random.Generator, config: SceneConfig,
                    object_colours: set[str]) -> Background:
    # An object never sits on its own colour; with too few background colours left, any other.
    choices = ([c for c in config.background_colours if c not in object_colours]
               or [c for c in COLOUR_NAMES if c not in object_colours])
    return Background(_pick(rng, config.backgrounds), _pick(rng, choices))


def sample_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> SceneSpec:
    """Draw a random scene allowed by ``config`` (layout, objects, placement, background)."""
    combos = config.allowed_combos()
    layout = _pick(rng, config.layouts)
    if layout == "pair" and len(combos) < 2:
        layout = "single"
    detail_seed = int(rng.integers(2**31))
    jitter = lambda: float(rng.uniform(-config.jitter, config.jitter))  # noqa: E731

    if layout == "single":
        colour, shape = _pick(rng, combos)
        region = _pick(rng, tuple(POSITIONS))
        cx, cy = REGION_CENTRES[region]
        obj = SceneObject(shape, colour, _pick(rng, tuple(SIZES)), _pick(rng, config.textures),
                          cx + jitter(), cy + jitter())
        return SceneSpec("single", (obj,), _background_for(rng, config, {colour}),
                         region=region, detail_seed=detail_seed)

    if layout == "count":
        colour, shape = _pick(rng, combos)
        count = int(rng.integers(1, config.max_count + 1))
        # Large objects fit a 2x2 grid, small ones a 3x3 grid; one object per cell, no overlap.
        size = "small" if count > 4 else _pick(rng, tuple(SIZES))
        grid = 2 if size == "large" else 3
        cells = rng.permutation(grid * grid)[:count]
        texture = _pick(rng, config.textures)
        objects = tuple(
            SceneObject(shape, colour, size, texture,
                        (cell % grid + 0.5) / grid + jitter() * 0.6,
                        (cell // grid + 0.5) / grid + jitter() * 0.6)
            for cell in sorted(cells.tolist()))
        return SceneSpec("count", objects, _background_for(rng, config, {colour}),
                         detail_seed=detail_seed)

    # pair: objects[0] is `relation` of objects[1]; they sit on opposite halves of one axis.
    first = _pick(rng, combos)
    second = _pick(rng, [c for c in combos if c != first])
    relation = _pick(rng, tuple(RELATIONS))
    near, far = float(rng.uniform(0.21, 0.27)), float(rng.uniform(0.73, 0.79))
    across = [float(rng.uniform(0.38, 0.62)) for _ in range(2)]
    first_along, second_along = (near, far) if relation in ("left", "above") else (far, near)
    horizontal = relation in ("left", "right")
    objects = []
    for (colour, shape), along, other in ((first, first_along, across[0]),
                                          (second, second_along, across[1])):
        x, y = (along, other) if horizontal else (other, along)
        objects.append(SceneObject(shape, colour, _pick(rng, tuple(SIZES)),
                                   _pick(rng, config.textures), x, y))
    return SceneSpec("pair", tuple(objects), _background_for(rng, config, {first[0], second[0]}),
                     relation=relation, detail_seed=detail_seed)


def default_supersample(image_size: int) -> int:
    """Edge quality matters most in small images; 4x there costs ~5%, at 224 px 2x suffices."""
    return 4 if image_size <= 96 else 2


def render_scene(spec: SceneSpec, image_size: int = 64,
                 supersample: int | None = None, height: int | None = None) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``image_size`` pixels square (shapes antialiased by
    drawing their masks ``supersample`` times larger; default from the image size).

    ``height`` (default ``image_size``) draws it ``image_size`` wide and ``height`` high instead:
    centres stay at the same fractions of each side (relations and regions keep their meaning)
    and radii are fractions of the shorter side, so shapes are never stretched."""
    width, height = image_size, height or image_size
    supersample = supersample or default_supersample(max(width, height))
    rng = np.random.default_rng(spec.detail_seed)
    canvas = background(max(width, height), spec.background.kind,
                        COLOURS[spec.background.colour].rgb, rng)
    if width != height:
        canvas = canvas.crop((0, 0, width, height))
    stripe_angle = float(rng.uniform(0, math.pi))
    for obj in spec.objects:
        radius = SIZE_RADIUS[obj.size] * min(width, height)
        cx, cy = obj.x * width, obj.y * height
        x0, y0 = math.floor(cx - radius) - 1, math.floor(cy - radius) - 1
        box = (math.ceil(cx + radius) + 2 - x0, math.ceil(cy + radius) + 2 - y0)
        mask = shape_mask(obj.shape, box, (cx - x0, cy - y0), radius, supersample)
        fill = pattern_fill(box, COLOURS[obj.colour].rgb, obj.texture,
                            period=max(radius / 2.2, 3.0), angle=stripe_angle,
                            phase=float(rng.uniform(0, 8)))
        canvas.paste(Image.fromarray(fill, "RGB"), (x0, y0), mask)
    return canvas
