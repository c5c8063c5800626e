"""Manufacturing-style inspection images: textured surfaces, some with a defect and its mask.

Every sample is a surface (brushed metal, woven fabric, wood, concrete, plastic). A defect
sample adds one scratch, hole, stain or crack; its pixels are returned as a binary mask so the
same data serves classification (normal 0 / defect 1), segmentation and anomaly detection.
Normal samples carry an all-zero mask of the same size, so every record has one.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from imagefm.data.records import Box, Caption, Record
from imagefm.data.synthetic.drawing import encode_png
from imagefm.data.synthetic.vqa import QA, conversation, pick_questions, yes_no_qa

# Surface id: (English noun phrase, Korean noun phrase, English material, Korean material).
SURFACES = {
    "metal": ("metal surface", "금속 표면", "metal", "금속"),
    "fabric": ("piece of fabric", "천", "fabric", "천"),
    "wood": ("wooden surface", "나무 표면", "wood", "나무"),
    "concrete": ("concrete surface", "콘크리트 표면", "concrete", "콘크리트"),
    "plastic": ("plastic surface", "플라스틱 표면", "plastic", "플라스틱"),
}
# Defect id: (English name, Korean name); label_name is the id, "normal" for no defect.
DEFECTS = {
    "scratch": ("scratch", "긁힌 자국"),
    "hole": ("hole", "구멍"),
    "stain": ("stain", "얼룩"),
    "crack": ("crack", "균열"),
}
_CAPTIONS_EN = {
    "normal": ("a {s} with no defects", "a clean {s}", "a flawless {s}"),
    "scratch": ("a {s} with a scratch", "a scratched {s}"),
    "hole": ("a {s} with a hole", "a {s} with a small hole in it"),
    "stain": ("a {s} with a stain", "a stained {s}"),
    "crack": ("a {s} with a crack", "a cracked {s}"),
}
_CAPTIONS_KO = {
    "normal": ("결함이 없는 {s}", "깨끗한 {s}", "흠집 하나 없는 {s}"),
    "scratch": ("긁힌 자국이 있는 {s}", "흠집이 난 {s}"),
    "hole": ("구멍이 난 {s}", "구멍이 있는 {s}"),
    "stain": ("얼룩이 있는 {s}", "얼룩진 {s}"),
    "crack": ("금이 간 {s}", "균열이 있는 {s}"),
}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, sigma: float) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled bilinearly to ``size``."""
    coarse = rng.normal(0, sigma, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def render_surface(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An (size, size, 3) float32 image in 0..255 of a ``kind`` surface."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "metal":
        # Brushing leaves streaks along one direction: noise stretched along x.
        streaks = rng.normal(0, 10, (size, max(size // 12, 2))).astype(np.float32)
        streaks = np.asarray(Image.fromarray(streaks).resize((size, size), Image.BILINEAR))
        tone = rng.uniform(140, 190) + streaks + rng.normal(0, 3, (size, size))
        tone += _smooth_noise(rng, size, 3, 10)
        if rng.random() < 0.5:
            tone = tone.T
        pixels = np.stack([tone, tone, tone * 1.03], axis=-1)
    elif kind == "fabric":
        period = max(size / rng.uniform(10, 18), 3.0)
        warp = np.cos(np.pi * np.mod(yy, period) / period - np.pi / 2) ** 2
        weft = np.cos(np.pi * np.mod(xx, period) / period - np.pi / 2) ** 2
        over = np.mod(np.floor(xx / period) + np.floor(yy / period), 2) == 0
        threads = np.where(over, warp, weft)
        base = np.array(rng.choice([(60, 80, 140), (140, 60, 60), (90, 120, 80), (180, 170, 150),
                                    (95, 95, 105)]), np.float32)
        pixels = base * (0.7 + 0.4 * threads[..., None]) + rng.normal(0, 4, (size, size, 1))
    elif kind == "wood":
        # Grain lines run along x and bend gently; fine streaks add the fibre texture.
        distortion = _smooth_noise(rng, size, 3, 1.0)
        fibre = rng.normal(0, 0.08, (size, max(size // 16, 2))).astype(np.float32)
        fibre = np.asarray(Image.fromarray(fibre).resize((size, size), Image.BILINEAR))
        rings = np.sin(2 * np.pi * (yy / size * rng.uniform(5, 10) + distortion * 0.35 + fibre))
        t = (0.5 + 0.5 * rings)[..., None] ** 2
        light, dark = np.array([205, 155, 100], np.float32), np.array([140, 90, 50], np.float32)
        pixels = light + t * (dark - light) + rng.normal(0, 3, (size, size, 1))
        if rng.random() < 0.5:
            pixels = pixels.transpose(1, 0, 2)
    elif kind == "concrete":
        tone = rng.uniform(120, 170) + _smooth_noise(rng, size, 5, 10)
        tone += _smooth_noise(rng, size, max(size // 4, 2), 6) + rng.normal(0, 7, (size, size))
        pixels = np.stack([tone, tone * 0.98, tone * 0.95], axis=-1)
    elif kind == "plastic":
        base = np.array(rng.choice([(230, 230, 225), (85, 85, 95), (200, 60, 50), (60, 110, 190),
                                    (240, 200, 60)]), np.float32)
        light = 1 + 0.12 * ((xx + yy) / (2 * size) - 0.5)
        pixels = base * light[..., None] + rng.normal(0, 2, (size, size, 1))
    else:
        raise ValueError(f"unknown surface {kind!r}; expected one of {tuple(SURFACES)}")
    return pixels.astype(np.float32)


def _polyline(rng: np.random.Generator, start: tuple[float, float], length: float, angle: float,
              steps: int, wiggle: float) -> list[tuple[float, float]]:
    points = [start]
    x, y = start
    for _ in range(steps):
        angle += rng.normal(0, wiggle)
        x += length / steps * math.cos(angle)
        y += length / steps * math.sin(angle)
        points.append((x, y))
    return points


def draw_defect(kind: str, size: int, rng: np.random.Generator, surface_luminance: float = 128.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hard mask, soft alpha, RGB colour) for one defect of ``kind``.

    ``surface_luminance`` picks a scratch colour that shows: bright on dark surfaces.
    """
    hard = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(hard)
    cx, cy = (float(v) for v in rng.uniform(0.25, 0.75, 2) * size)
    width = max(1, round(size / 80))
    blur = 0.0
    if kind == "scratch":
        length = size * rng.uniform(0.3, 0.6)
        angle = rng.uniform(0, math.pi)
        start = (cx - length / 2 * math.cos(angle), cy - length / 2 * math.sin(angle))
        draw.line(_polyline(rng, start, length, angle, 6, 0.05), fill=255, width=width)
        bright = surface_luminance < 110 or rng.random() < 0.5
        colour = (235, 235, 230) if bright else (45, 45, 45)
    elif kind == "hole":
        r = max(size * rng.uniform(0.03, 0.07), 1.5)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        colour = (12, 12, 12)
        blur = 0.5
    elif kind == "stain":
        for _ in range(int(rng.integers(3, 7))):
            ox, oy = rng.normal(0, size * 0.04, 2)
            rx, ry = rng.uniform(0.03, 0.08, 2) * size
            draw.ellipse((cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry), fill=255)
        colour = tuple(int(v) for v in rng.choice([(90, 60, 30), (40, 40, 30), (120, 110, 40)]))
        blur = size / 100
    elif kind == "crack":
        start = (cx, cy)
        trunk = _polyline(rng, start, size * rng.uniform(0.25, 0.45), rng.uniform(0, 2 * math.pi),
                          10, 0.45)
        draw.line(trunk, fill=255, width=width)
        for _ in range(int(rng.integers(0, 3))):
            branch_from = trunk[int(rng.integers(2, len(trunk)))]
            draw.line(_polyline(rng, branch_from, size * rng.uniform(0.08, 0.18),
                                rng.uniform(0, 2 * math.pi), 4, 0.5), fill=255, width=width)
        colour = (25, 22, 20)
    else:
        raise ValueError(f"unknown defect {kind!r}; expected one of {tuple(DEFECTS)}")
    soft = hard.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else hard
    mask = np.asarray(hard) > 0
    alpha = np.maximum(np.asarray(soft, np.float32) / 255.0, mask * 1.0)
    strength = 0.65 if kind == "stain" else 0.9
    return mask, alpha * strength, np.array(colour, np.float32)


def _mask_box(mask: np.ndarray, label: str) -> Box:
    ys, xs = np.nonzero(mask)
    return Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1), label)


def defect_questions(surface: str, defect: str | None) -> list[QA]:
    _, _, material_en, material_ko = SURFACES[surface]
    found = defect is not None
    questions = [
        yes_no_qa("defect", "Is there a defect on this surface?", "이 표면에 결함이 있나요?",
                  found),
        QA("material", "What is the surface made of?", material_en,
           "이 표면은 어떤 재질인가요?", material_ko),
    ]
    if found:
        questions.append(QA("defect_type", "What kind of defect is there?", DEFECTS[defect][0],
                            "어떤 결함이 있나요?", DEFECTS[defect][1]))
    return questions


def defect_record(rng: np.random.Generator, *, key: str, image_size: int, split: str,
                  defect_rate: float = 0.5, surfaces: tuple[str, ...] = tuple(SURFACES),
                  defects: tuple[str, ...] = tuple(DEFECTS), qa_per_image: int = 2) -> Record:
    """One inspection sample: label 0 normal / 1 defect, label_name, mask, captions, QA."""
    size = image_size
    surface = surfaces[int(rng.integers(len(surfaces)))]
    pixels = render_surface(surface, size, rng)
    defect = defects[int(rng.integers(len(defects)))] if rng.random() < defect_rate else None
    mask = np.zeros((size, size), bool)
    boxes = []
    if defect is not None:
        mask, alpha, colour = draw_defect(defect, size, rng, float(pixels.mean()))
        pixels = pixels * (1 - alpha[..., None]) + colour * alpha[..., None]
        boxes.append(_mask_box(mask, defect))
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    name = defect or "normal"
    surface_en, surface_ko = SURFACES[surface][:2]
    english = _CAPTIONS_EN[name][int(rng.integers(len(_CAPTIONS_EN[name])))]
    korean = _CAPTIONS_KO[name][int(rng.integers(len(_CAPTIONS_KO[name])))]
    english = english.format(s=surface_en)
    questions = pick_questions(defect_questions(surface, defect), qa_per_image, rng)
    chat_lang = ("en", "ko")[int(rng.integers(2))]
    return Record(
        key=key, image=encode_png(image), mask=encode_png(Image.fromarray(
            (mask * 255).astype(np.uint8), "L")),
        captions=[Caption(english, "en"), Caption(korean.format(s=surface_ko), "ko")],
        label=int(defect is not None), label_name=name, conversation=conversation(
            questions, chat_lang), boxes=boxes, split=split, source="synthetic/defects",
        license="generated, CC0", meta={"surface": surface, "defect": name, "lang": chat_lang},
    )
