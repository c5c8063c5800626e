"""A 2-D tabletop: coloured shapes, coloured target zones and a top-down gripper.

Everything lives in the unit square (x right, y down, as in images). One step::

    action (dx, dy, grip) ─► gripper moves by (dx, dy) (clipped to the table); a carried object
    moves with it and pushes the objects it meets out of its way (blocked at the walls: the move
    is undone) ─► grip: closing grasps the object under the gripper, if any (only when touching,
    only at the moment of closing: a closed gripper sweeps over objects); opening drops it.

No two objects ever overlap, every object stays on the table, and the episode succeeds when the
instruction's object lies (released) with its centre inside the instruction's zone. A scene is a
pure function of its seed and split, and a step a pure function of the state and the action, so
whole rollouts are reproducible. Images are drawn with the synthetic-data renderer's shapes and
colours (``imagefm.data.synthetic``), so the words of instructions are the words of captions.

Layer: data (numpy + PIL + imagefm.data.synthetic); knows no model or training loop.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from imagefm.data.synthetic.drawing import shade, shape_mask
from imagefm.data.synthetic.vocab import COLOURS

OBJECT_RADIUS = 0.09  # fraction of the table side
ZONE_HALF = 0.14  # zones are squares of side 2 * ZONE_HALF
GRIPPER_RADIUS = 0.07  # drawn size only; grasping needs the gripper centre over the object
MAX_STEP = 0.12  # largest move per axis in one step
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
OBJECT_SHAPES = ("circle", "square", "triangle", "cross")
ZONE_COLOURS = ("red", "green", "blue", "yellow")
# Colour–shape pairs that never appear in training scenes (one per colour it affects, one per
# shape): the "held_out" split makes one of them the target, so evaluation measures whether a
# policy composes words it has only seen apart.
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square")})
SPLITS = ("train", "held_out", "all")
TABLE_RGB = (214, 200, 170)


@dataclass
class Body:
    """An object on the table: what it is and where its centre lies."""

    shape: str
    colour: str
    x: float
    y: float

    @property
    def combo(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Zone:
    """A square target area of a named colour."""

    colour: str
    x: float
    y: float
    half: float = ZONE_HALF

    def contains(self, x: float, y: float, margin: float = 0.0) -> bool:
        """True when (x, y) lies inside the zone shrunk by ``margin`` on every side."""
        reach = self.half - margin
        return abs(x - self.x) <= reach and abs(y - self.y) <= reach


@dataclass(frozen=True)
class Action:
    """A move of the gripper (table fractions per step) and the gripper state wanted
    (True = closed). Grip is absolute rather than a toggle, so the right grip is always a
    function of what the image shows."""

    dx: float
    dy: float
    grip: bool


@dataclass
class TableState:
    objects: list[Body]
    zones: list[Zone]
    target: int  # index into objects
    goal: int  # index into zones
    gripper: tuple[float, float]
    closed: bool = False
    held: int | None = None
    steps: int = 0
    blocked: int = 0  # moves undone because a pushed object met a wall


def _dist(ax: float, ay: float, bx: float, by: float) -> float:
    return math.hypot(ax - bx, ay - by)


def allowed_combos(split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs objects of ``split`` may be: train excludes HELD_OUT_COMBOS."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    combos = [(c, s) for c in OBJECT_COLOURS for s in OBJECT_SHAPES]
    if split == "all":
        return combos
    return [combo for combo in combos if combo not in HELD_OUT_COMBOS]


class Tabletop:
    """One episode: ``Tabletop.reset(seed)``, then ``step(action)`` until ``done``."""

    def __init__(self, state: TableState, max_steps: int = 40) -> None:
        self.state = state
        self.max_steps = max_steps

    # --- scenes -------------------------------------------------------------------------------

    @classmethod
    def reset(cls, seed: int, split: str = "train", *, num_objects: int = 3,
              num_zones: int = 2, max_steps: int = 40) -> Tabletop:
        """A random scene of ``split``: ``train`` uses only training pairs; ``held_out`` makes
        the target a held-out pair (distractors are training pairs); ``all`` uses any pair."""
        if not 1 <= num_objects <= 5 or not 1 <= num_zones <= len(ZONE_COLOURS):
            raise ValueError(f"num_objects must be 1..5 and num_zones 1..{len(ZONE_COLOURS)}")
        rng = np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else 99])
        train_combos = allowed_combos(split)
        zone_colours = rng.permutation(len(ZONE_COLOURS))[:num_zones]
        zones: list[Zone] = []
        while len(zones) < num_zones:
            x, y = rng.uniform(ZONE_HALF + 0.02, 1 - ZONE_HALF - 0.02, 2)
            if all(max(abs(x - z.x), abs(y - z.y)) > 2 * ZONE_HALF + 0.06 for z in zones):
                zones.append(Zone(ZONE_COLOURS[zone_colours[len(zones)]], float(x), float(y)))
        if split == "held_out":
            first = sorted(HELD_OUT_COMBOS)[int(rng.integers(len(HELD_OUT_COMBOS)))]
        else:
            first = train_combos[int(rng.integers(len(train_combos)))]
        others = [c for c in train_combos if c != first]
        picks = [first] + [others[i] for i in rng.permutation(len(others))[:num_objects - 1]]
        objects: list[Body] = []
        for colour, shape in picks:
            for _ in range(1000):
                x, y = rng.uniform(OBJECT_RADIUS + 0.01, 1 - OBJECT_RADIUS - 0.01, 2)
                clear_of_zones = all(not z.contains(x, y, margin=-OBJECT_RADIUS) for z in zones)
                apart = all(_dist(x, y, o.x, o.y) > 2 * OBJECT_RADIUS + 0.04 for o in objects)
                if clear_of_zones and apart:
                    objects.append(Body(shape, colour, float(x), float(y)))
                    break
            else:  # no room left: a new seed draws a new layout
                return cls.reset(seed + 7919, split, num_objects=num_objects,
                                 num_zones=num_zones, max_steps=max_steps)
        order = rng.permutation(num_objects)  # the target is not always drawn first
        objects = [objects[i] for i in order]
        target = int(np.flatnonzero(order == 0)[0])
        gripper = tuple(float(v) for v in rng.uniform(0.05, 0.95, 2))
        state = TableState(objects, zones, target, int(rng.integers(num_zones)), gripper)
        return cls(state, max_steps)

    def copy(self) -> Tabletop:
        return Tabletop(copy.deepcopy(self.state), self.max_steps)

    @property
    def target(self) -> Body:
        return self.state.objects[self.state.target]

    @property
    def goal(self) -> Zone:
        return self.state.zones[self.state.goal]

    @property
    def success(self) -> bool:
        """The target lies released with its centre inside the goal zone."""
        t = self.target
        return self.state.held != self.state.target and self.goal.contains(t.x, t.y)

    @property
    def done(self) -> bool:
        return self.success or self.state.steps >= self.max_steps

    # --- physics ------------------------------------------------------------------------------

    def step(self, action: Action) -> bool:
        """Apply ``action``; returns ``success`` afterwards."""
        s = self.state
        dx = float(np.clip(action.dx, -MAX_STEP, MAX_STEP))
        dy = float(np.clip(action.dy, -MAX_STEP, MAX_STEP))
        gx = float(np.clip(s.gripper[0] + dx, 0.0, 1.0))
        gy = float(np.clip(s.gripper[1] + dy, 0.0, 1.0))
        self._move_gripper(gx, gy)
        if action.grip and not s.closed:
            touching = [(i, _dist(s.gripper[0], s.gripper[1], o.x, o.y))
                        for i, o in enumerate(s.objects)]
            touching = [(i, d) for i, d in touching if d <= OBJECT_RADIUS]
            if touching:
                s.held = min(touching, key=lambda pair: pair[1])[0]
        elif not action.grip:
            s.held = None  # opening drops what it holds where it is
        s.closed = bool(action.grip)
        s.steps += 1
        return self.success

    def _move_gripper(self, gx: float, gy: float) -> None:
        s = self.state
        if s.held is None:
            s.gripper = (gx, gy)
            return
        held = s.objects[s.held]
        saved = [(o.x, o.y) for o in s.objects]
        # The carried object follows the gripper but never leaves the table; where a wall stops
        # it, it stops the gripper too (they move as one body).
        hx = float(np.clip(held.x + gx - s.gripper[0], OBJECT_RADIUS, 1 - OBJECT_RADIUS))
        hy = float(np.clip(held.y + gy - s.gripper[1], OBJECT_RADIUS, 1 - OBJECT_RADIUS))
        moved = (hx - held.x, hy - held.y)
        held.x, held.y = hx, hy
        if self._resolve_pushes(s.held):
            s.gripper = (s.gripper[0] + moved[0], s.gripper[1] + moved[1])
        else:  # a pushed object is stuck against a wall: nothing moves
            for o, (x, y) in zip(s.objects, saved, strict=True):
                o.x, o.y = x, y
            s.blocked += 1

    def _resolve_pushes(self, fixed: int, rounds: int = 50) -> bool:
        """Push overlapping objects apart along their centre line (the carried one stays);
        True when no overlap is left."""
        objects = self.state.objects
        low, high = OBJECT_RADIUS, 1 - OBJECT_RADIUS
        for _ in range(rounds):
            moved = False
            for i, a in enumerate(objects):
                for j, b in enumerate(objects):
                    if j <= i:
                        continue
                    gap = _dist(a.x, a.y, b.x, b.y) - 2 * OBJECT_RADIUS
                    if gap >= -1e-9:
                        continue
                    moved = True
                    ux, uy = b.x - a.x, b.y - a.y
                    norm = math.hypot(ux, uy) or 1.0
                    ux, uy = ux / norm, uy / norm
                    push = -gap + 1e-6
                    share_a = 0.0 if i == fixed else (1.0 if j == fixed else 0.5)
                    share_b = 1.0 - share_a
                    a.x = float(np.clip(a.x - ux * push * share_a, low, high))
                    a.y = float(np.clip(a.y - uy * push * share_a, low, high))
                    b.x = float(np.clip(b.x + ux * push * share_b, low, high))
                    b.y = float(np.clip(b.y + uy * push * share_b, low, high))
            if not moved:
                return True
        return self.min_gap() >= -1e-6

    def min_gap(self) -> float:
        """The smallest distance between two objects' outlines (negative = overlap)."""
        objects = self.state.objects
        gaps = [_dist(a.x, a.y, b.x, b.y) - 2 * OBJECT_RADIUS
                for i, a in enumerate(objects) for b in objects[i + 1:]]
        return min(gaps, default=math.inf)

    # --- pictures -----------------------------------------------------------------------------

    def render(self, size: int = 48) -> Image.Image:
        """The table seen from above: zones, objects, then the gripper (a ring when open, a
        filled disc when closed) drawn over them."""
        s = self.state
        canvas = Image.new("RGB", (size, size), TABLE_RGB)
        draw = ImageDraw.Draw(canvas)
        line = max(1, size // 48)
        for zone in s.zones:
            rgb = COLOURS[zone.colour].rgb
            box = [(zone.x - zone.half) * size, (zone.y - zone.half) * size,
                   (zone.x + zone.half) * size - 1, (zone.y + zone.half) * size - 1]
            draw.rectangle(box, fill=shade(rgb, 0.55), outline=rgb, width=line)
        radius = OBJECT_RADIUS * size
        supersample = 4 if size <= 96 else 2
        for obj in s.objects:
            cx, cy = obj.x * size, obj.y * size
            x0, y0 = math.floor(cx - radius) - 1, math.floor(cy - radius) - 1
            box_size = (math.ceil(cx + radius) + 2 - x0, math.ceil(cy + radius) + 2 - y0)
            mask = shape_mask(obj.shape, box_size, (cx - x0, cy - y0), radius, supersample)
            canvas.paste(Image.new("RGB", box_size, COLOURS[obj.colour].rgb), (x0, y0), mask)
        gx, gy, r = s.gripper[0] * size, s.gripper[1] * size, GRIPPER_RADIUS * size
        if s.closed:  # smaller than the objects, so the colour of what it holds shows around it
            draw.ellipse([gx - r * 0.65, gy - r * 0.65, gx + r * 0.65, gy + r * 0.65],
                         fill=(15, 15, 15))
        else:
            draw.ellipse([gx - r, gy - r, gx + r, gy + r], outline=(15, 15, 15),
                         width=max(1, round(size / 24)))
        return canvas

    def observe(self, size: int = 48) -> np.ndarray:
        """The rendered image as uint8 [size, size, 3]."""
        return np.asarray(self.render(size), dtype=np.uint8)
