"""Low-level drawing shared by the generators: shape outlines, fills, backgrounds, PNG encoding.

Shapes are drawn as binary masks at ``supersample`` times the target resolution and reduced with
a box filter, which gives antialiased edges at a fraction of the cost of drawing a whole image
large and resizing it.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]


def _regular_polygon(vertices: int, start_deg: float,
                     radius: float = 1.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360 * i / vertices)),
             radius * math.sin(math.radians(start_deg + 360 * i / vertices)))
            for i in range(vertices)]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    outline = []
    for i in range(points * 2):
        radius = 1.0 if i % 2 == 0 else inner
        angle = math.radians(-90 + 180 * i / points)
        outline.append((radius * math.cos(angle), radius * math.sin(angle) + 0.08))
    return outline


def _heart(steps: int = 48) -> list[tuple[float, float]]:
    # The classic parametric heart, scaled to fit [-1, 1] and flipped so it points down.
    outline = []
    for i in range(steps):
        t = 2 * math.pi * i / steps
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        outline.append((x / 17, -y / 17 - 0.1))
    return outline


def _cross(arm: float = 0.32) -> list[tuple[float, float]]:
    a, e = arm, 0.95
    return [(-a, -e), (a, -e), (a, -a), (e, -a), (e, a), (a, a), (a, e), (-a, e), (-a, a),
            (-e, a), (-e, -a), (-a, -a)]


# Outlines in unit coordinates (centre 0, roughly filling [-1, 1]^2; y grows downwards).
# Circle and crescent are drawn with ellipses instead.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(x, y + 0.22) for x, y in _regular_polygon(3, -90, 1.1)],
    "star": _star(),
    "heart": _heart(),
    "hexagon": _regular_polygon(6, 0),
    "cross": _cross(),
    "pentagon": [(x, y + 0.1) for x, y in _regular_polygon(5, -90)],
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
}
DRAWABLE_SHAPES = (*_OUTLINES, "circle", "crescent")


def shape_mask(shape: str, box_size: tuple[int, int], centre: tuple[float, float], radius: float,
               supersample: int = 4) -> Image.Image:
    """An antialiased 'L' mask of ``box_size`` with ``shape`` of ``radius`` pixels at ``centre``.

    ``centre`` is in pixel coordinates of the box and may be fractional (sub-pixel placement).
    """
    s = supersample
    mask = Image.new("L", (box_size[0] * s, box_size[1] * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = centre[0] * s, centre[1] * s, radius * s
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, inner = cx + 0.45 * r, 0.85 * r
        draw.ellipse((ox - inner, cy - 1.05 * inner, ox + inner, cy + 0.95 * inner), fill=0)
    elif shape in _OUTLINES:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _OUTLINES[shape]], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; drawable shapes: {DRAWABLE_SHAPES}")
    return mask.reduce(s) if s > 1 else mask


def luminance(rgb: RGB) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def shade(rgb: RGB, amount: float) -> RGB:
    """Mix towards white (amount > 0) or black (amount < 0)."""
    target = 255.0 if amount > 0 else 0.0
    a = abs(amount)
    return tuple(int(round(c + (target - c) * a)) for c in rgb)  # type: ignore[return-value]


def contrast_shade(rgb: RGB, amount: float = 0.45) -> RGB:
    """A darker version of a light colour or a lighter version of a dark one."""
    return shade(rgb, -amount if luminance(rgb) > 70 else amount * 0.7)


def pattern_fill(size: tuple[int, int], rgb: RGB, texture: str, period: float, angle: float,
                 phase: float = 0.0) -> np.ndarray:
    """An (h, w, 3) uint8 fill: solid colour, stripes or dots of a contrasting shade.

    The base colour covers most of the area so the object's colour class stays unambiguous.
    """
    w, h = size
    base = np.empty((h, w, 3), dtype=np.uint8)
    base[:] = rgb
    if texture == "solid":
        return base
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = max(period, 3.0)
    if texture == "striped":
        u = xx * math.cos(angle) + yy * math.sin(angle) + phase
        marked = np.mod(u, period) < period * 0.35
    elif texture == "dotted":
        u = np.mod(xx + phase, period) - period / 2
        v = np.mod(yy + phase, period) - period / 2
        marked = u * u + v * v < (period * 0.27) ** 2
    else:
        raise ValueError(f"unknown texture {texture!r}; expected solid, striped or dotted")
    base[marked] = contrast_shade(rgb)
    return base


def background(size: int, kind: str, rgb: RGB, rng: np.random.Generator) -> Image.Image:
    """A square RGB background: ``plain`` colour, a ``gradient`` to a shade of it, or ``noise``."""
    if kind == "plain":
        return Image.new("RGB", (size, size), rgb)
    if kind == "gradient":
        far = np.array(shade(rgb, 0.35) if luminance(rgb) < 150 else shade(rgb, -0.3), np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        pixels = np.asarray(rgb, np.float32) + t[..., None] * (far - np.asarray(rgb, np.float32))
        return Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    if kind == "noise":
        # Fine per-pixel grain plus soft blotches (coarse noise upsampled) around the colour.
        coarse = rng.normal(0, 14, (6, 6, 3)).astype(np.float32)
        blotches = np.asarray(Image.fromarray(coarse[..., 0]).resize((size, size), Image.BILINEAR))
        grain = rng.normal(0, 9, (size, size, 3)).astype(np.float32)
        pixels = np.asarray(rgb, np.float32) + grain + blotches[..., None]
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    raise ValueError(f"unknown background kind {kind!r}; expected plain, gradient or noise")


def encode_png(image: Image.Image, compress_level: int = 1) -> bytes:
    """PNG bytes; low compression because generation speed matters more than a few bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
