"""Rendered text: English and Hangul words on signs and labels, with captions and OCR questions.

Hangul needs a font that has it; we use the Nanum fonts from Debian's ``fonts-nanum``, found
at run time in the usual font folders or through ``fc-list``. Which fonts exist decides which
faces are drawn, so output bytes are reproducible on machines with the same fonts installed.
"""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imagefm.data.records import Box, Caption, Record
from imagefm.data.synthetic.drawing import background, encode_png, luminance
from imagefm.data.synthetic.korean import attach
from imagefm.data.synthetic.vocab import BACKGROUND_KINDS, COLOUR_NAMES, COLOURS, article
from imagefm.data.synthetic.vqa import QA, conversation, pick_questions

INSTALL_HINT = "sudo apt-get install fonts-nanum"
# Faces in the order we prefer them; coding fonts are left out (they look like terminals).
NANUM_FACES = (
    "NanumGothic.ttf", "NanumGothicBold.ttf", "NanumBarunGothic.ttf",
    "NanumBarunGothicBold.ttf", "NanumSquareR.ttf", "NanumSquareB.ttf",
    "NanumSquareRoundR.ttf", "NanumSquareRoundB.ttf", "NanumMyeongjo.ttf",
    "NanumMyeongjoBold.ttf",
)
FONT_DIRS = (
    "/usr/share/fonts/truetype/nanum", "/usr/share/fonts/nanum", "/usr/share/fonts/opentype/nanum",
    "/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
    "/Library/Fonts", "~/Library/Fonts", "C:/Windows/Fonts",
)

WORDS_EN = (
    "EXIT", "STOP", "OPEN", "CLOSED", "SALE", "CAFE", "HOTEL", "PARKING", "TAXI", "BUS STOP",
    "NO SMOKING", "PUSH", "PULL", "ENTRANCE", "TOILET", "PHARMACY", "BAKERY", "BOOKS", "MARKET",
    "POLICE", "HOSPITAL", "SCHOOL", "LIBRARY", "DANGER", "WELCOME", "SEOUL", "BUSAN", "COFFEE",
    "PIZZA", "FRESH FRUIT", "ONE WAY", "SLOW", "QUIET", "TICKETS", "GATE 3", "ROOM 204",
    "KEEP OUT", "WET FLOOR", "BANK", "POST OFFICE", "SUBWAY", "FLOWERS", "HELLO", "FIRE EXIT",
)
WORDS_KO = (
    "출구", "입구", "정지", "영업 중", "휴무", "할인", "카페", "호텔", "주차장", "택시",
    "버스 정류장", "금연", "미세요", "당기세요", "화장실", "약국", "빵집", "서점", "시장", "경찰서",
    "병원", "학교", "도서관", "위험", "환영합니다", "서울", "부산", "커피", "피자", "신선한 과일",
    "일방통행", "천천히", "조용히", "매표소", "3번 출구", "비상구", "출입 금지", "미끄럼 주의",
    "지하철", "편의점", "식당", "은행", "우체국", "꽃집", "안녕하세요", "반갑습니다",
)
# Syllables for random Hangul strings, so OCR is not only memorising a word list.
_SYLLABLES = ("가나다라마바사아자차카타파하거너더러머버서어저처커터퍼허고노도로모보소오조초코토포호"
              "구누두루무부수우주추쿠투푸후기니디리미비시이지치키티피히한국서울길문산강")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

HOLDERS = {"sign": ("sign", "표지판"), "label": ("label", "라벨")}


class FontNotFoundError(RuntimeError):
    """No font with Hangul glyphs was found."""


@functools.lru_cache(maxsize=1)
def find_hangul_fonts() -> tuple[Path, ...]:
    """Paths of installed Nanum fonts in preference order (empty if none); cached."""
    found: dict[str, Path] = {}
    for folder in FONT_DIRS:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        for face in NANUM_FACES:
            if face in found:
                continue
            direct = root / face
            if direct.is_file():
                found[face] = direct
            elif folder == "/usr/share/fonts":
                hits = sorted(root.rglob(face))
                if hits:
                    found[face] = hits[0]
    if not found and shutil.which("fc-list"):
        try:
            listing = subprocess.run(["fc-list", ":lang=ko", "file"], capture_output=True,
                                     text=True, timeout=20, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        for line in sorted(listing.splitlines()):
            path = Path(line.split(":")[0].strip())
            if path.suffix.lower() in (".ttf", ".otf", ".ttc") and path.is_file():
                found.setdefault(path.name, path)
    ordered = [found[f] for f in NANUM_FACES if f in found]
    ordered += sorted(p for name, p in found.items() if name not in NANUM_FACES)
    return tuple(ordered)


def hangul_fonts() -> tuple[Path, ...]:
    """Like ``find_hangul_fonts`` but raises a ``FontNotFoundError`` that says how to install."""
    fonts = find_hangul_fonts()
    if not fonts:
        raise FontNotFoundError(
            "no font with Hangul glyphs found (looked for Nanum fonts in "
            f"{', '.join(FONT_DIRS)} and asked fc-list). Install them with: {INSTALL_HINT}")
    return fonts


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def random_text(rng: np.random.Generator, lang: str, random_fraction: float = 0.25) -> str:
    """A sign word from the list, or (sometimes) a random string of letters/syllables."""
    if rng.random() < random_fraction:
        if lang == "ko":
            return "".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=int(
                rng.integers(2, 5))))
        return "".join(_LETTERS[i] for i in rng.integers(len(_LETTERS), size=int(
            rng.integers(3, 7))))
    words = WORDS_KO if lang == "ko" else WORDS_EN
    return words[int(rng.integers(len(words)))]


def _fit_font(draw: ImageDraw.ImageDraw, text: str, font_path: str, max_w: float,
              max_h: float) -> ImageFont.FreeTypeFont:
    size = max(int(max_h), 6)
    while size > 6:
        font = _font(font_path, size)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        if x1 - x0 <= max_w and y1 - y0 <= max_h:
            return font
        size = max(6, int(size * 0.88))
    return _font(font_path, 6)


def _text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (15, 15, 15) if luminance(rgb) > 140 else (250, 250, 250)


def render_text_image(text: str, image_size: int, rng: np.random.Generator, holder: str = "sign",
                      sign_colour: str = "blue", background_colour: str = "white",
                      font_path: str | None = None) -> tuple[Image.Image, Box]:
    """Draw ``text`` on a sign or label; returns the image and the text's bounding box."""
    size = image_size
    canvas = background(size, str(BACKGROUND_KINDS[int(rng.integers(3))]),
                        COLOURS[background_colour].rgb, rng).convert("RGBA")
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width = size * rng.uniform(0.7, 0.92)
    height = size * rng.uniform(0.3, 0.45)
    cx, cy = size / 2 + rng.uniform(-0.04, 0.04) * size, size * rng.uniform(0.4, 0.55)
    sign_box = (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)
    rgb = COLOURS[sign_colour].rgb
    if holder == "sign":
        pole = max(2.0, size * 0.04)
        draw.rectangle((cx - pole / 2, sign_box[3], cx + pole / 2, size), fill=(110, 110, 115))
        draw.rounded_rectangle(sign_box, radius=size * 0.04, fill=rgb,
                               outline=_text_colour(rgb), width=max(1, size // 64))
    else:
        # A cardboard box with the label stuck on its front.
        draw.rectangle((size * 0.05, size * 0.15, size * 0.95, size * 0.95), fill=(170, 125, 75))
        draw.rectangle(sign_box, fill=rgb)
    font = _fit_font(draw, text, font_path or str(hangul_fonts()[0]), width * 0.86, height * 0.62)
    draw.text((cx, cy), text, font=font, fill=_text_colour(rgb), anchor="mm")
    tx0, ty0, tx1, ty1 = draw.textbbox((cx, cy), text, font=font, anchor="mm")
    corners = [(tx0, ty0), (tx1, ty0), (tx1, ty1), (tx0, ty1)]
    if rng.random() < 0.5:
        angle = float(rng.uniform(-7, 7))
        layer = layer.rotate(angle, resample=Image.BICUBIC, center=(cx, cy))
        # PIL rotates counter-clockwise on screen; map the text corners the same way.
        a = math.radians(angle)
        corners = [(cx + (x - cx) * math.cos(a) + (y - cy) * math.sin(a),
                    cy - (x - cx) * math.sin(a) + (y - cy) * math.cos(a)) for x, y in corners]
    canvas.alpha_composite(layer)
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    box = Box(max(0.0, min(xs)), max(0.0, min(ys)), min(size, max(xs)), min(size, max(ys)), text)
    return canvas.convert("RGB"), box


def quote_ko(text: str) -> str:
    """A quoted text with the quotation particle: "출구"라고, "은행"이라고, "EXIT"라고.

    Hangul takes (이)라고 by its final consonant; for Latin text the final letter says nothing
    about how the word is read (SALE → 세일), so it takes the plain direct-quotation 라고.
    """
    quoted = f'"{text}"'
    is_hangul = any("\uac00" <= ch <= "\ud7a3" for ch in text)
    return attach(quoted, "(이)라고") if is_hangul else quoted + "라고"


def text_captions(text: str, holder: str, colour: str, rng: np.random.Generator
                  ) -> list[Caption]:
    """One English and one Korean caption naming the written text and the sign."""
    noun_en, noun_ko = HOLDERS[holder]
    c_en = COLOURS[colour].en
    c_ko = COLOURS[colour].ko_attributive[int(rng.integers(len(COLOURS[colour].ko_attributive)))]
    said = quote_ko(text)
    if holder == "sign":
        english = (f'{article(c_en)} {c_en} sign that says "{text}"',
                   f'a sign with "{text}" written on it',
                   f'"{text}" written on {article(c_en)} {c_en} sign',
                   f'a photo of a sign reading "{text}"')
        korean = (f"{said} 쓰인 {c_ko} 표지판", f"{said} 적힌 표지판",
                  f"{c_ko} 표지판에 {said} 쓰여 있다", f'"{text}" 글자가 있는 {noun_ko}')
    else:
        english = (f'a box with {article(c_en)} {c_en} label that says "{text}"',
                   f'a label reading "{text}" on a cardboard box',
                   f'"{text}" printed on {article(c_en)} {c_en} {noun_en}')
        korean = (f"{said} 적힌 라벨이 붙은 상자", f"{c_ko} 라벨에 {said} 쓰여 있다",
                  f"{said} 인쇄된 {c_ko} {noun_ko}")
    return [Caption(english[int(rng.integers(len(english)))], "en"),
            Caption(korean[int(rng.integers(len(korean)))], "ko")]


def text_questions(text: str, text_lang: str, holder: str, colour: str) -> list[QA]:
    noun_en, noun_ko = HOLDERS[holder]
    is_ko = text_lang == "ko"
    return [
        QA("ocr", f"What does the {noun_en} say?", text, f"{noun_ko}에 뭐라고 쓰여 있나요?", text),
        QA("colour", f"What colour is the {noun_en}?", COLOURS[colour].en,
           f"{attach(noun_ko, '은/는')} 무슨 색인가요?",
           COLOURS[colour].ko),
        QA("script", "Is the text written in Korean or English?", "Korean" if is_ko else "English",
           "글자는 한국어인가요, 영어인가요?", "한국어" if is_ko else "영어"),
    ]


def text_record(rng: np.random.Generator, *, key: str, image_size: int, split: str,
                langs: tuple[str, ...] = ("en", "ko"), random_fraction: float = 0.25,
                qa_per_image: int = 2) -> Record:
    """One rendered-text sample: image, captions in both languages, OCR-style conversation."""
    fonts = hangul_fonts()
    text_lang = langs[int(rng.integers(len(langs)))]
    text = random_text(rng, text_lang, random_fraction)
    holder = "sign" if rng.random() < 0.7 else "label"
    sign_colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    others = [c for c in COLOUR_NAMES if c != sign_colour]
    bg_colour = others[int(rng.integers(len(others)))]
    font = fonts[int(rng.integers(len(fonts)))]
    image, box = render_text_image(text, image_size, rng, holder, sign_colour, bg_colour, str(font))
    questions = text_questions(text, text_lang, holder, sign_colour)
    # The OCR question always comes first: reading the text is what this data teaches.
    chosen = [questions[0], *pick_questions(questions[1:], max(qa_per_image - 1, 0), rng)]
    chat_lang = ("en", "ko")[int(rng.integers(2))]
    return Record(
        key=key, image=encode_png(image), captions=text_captions(text, holder, sign_colour, rng),
        conversation=conversation(chosen, chat_lang), boxes=[box], split=split,
        source="synthetic/text", license="generated, CC0",
        meta={"text": text, "text_lang": text_lang, "holder": holder, "colour": sign_colour,
              "background_colour": bg_colour, "font": font.name, "lang": chat_lang},
    )
