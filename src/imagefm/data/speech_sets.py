"""Speech–text datasets on disk: synthesized English/Korean speech and Tux Paint's narrations.

A speech dataset is a folder::

    DIR/audio/<key>.wav          16 kHz mono, 16-bit PCM
    DIR/train.jsonl, test.jsonl  one utterance per line (see ``SpeechItem``)
    DIR/manifest.json            counts, keyword classes, provenance (written last: complete)

Two builders:

* ``synthetic_speech``: espeak-ng (:mod:`imagefm.data.speech`) speaks spoken keywords (the
  synthetic engine's colour and shape words: spoken-keyword classification), synthetic scene
  captions and Tux Paint captions, in English and Korean, with several voices, rates, pitches,
  noise and reverberation. The ``test`` split holds a speaker never used in training, the
  synthetic engine's held-out (colour, shape) combinations and the reserved Tux Paint stamps.
* ``tuxpaint_narrations``: the real recordings Tux Paint ships beside its stamps:
  ``<stem>_desc.ogg`` reads the English caption aloud, ``<stem>_desc_<lang>.ogg`` the caption in
  ``<lang>`` (a dozen languages; none in Korean). Each is paired with the stamp's captions in its
  own language, English and Korean; the split is the project's reserved rule on the stem.

Every utterance lists all ``captions`` it matches (the spoken text and its translations), so a
trainer can pair English speech with Korean text and the evaluation can ask both.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagefm.checkpoint import atomic_write_text
from imagefm.data.audio import AudioError, load_audio, write_wav
from imagefm.data.formats import SkipCounter, safe_key
from imagefm.data.recipes.base import split_for
from imagefm.data.recipes.tuxpaint import DEFAULT_SRC, lang_tag, parse_description
from imagefm.data.records import Caption
from imagefm.data.speech import SpeechError, Voice, augment, synthesize, voices
from imagefm.data.synthetic.captions import scene_captions
from imagefm.data.synthetic.scenes import SceneConfig, sample_scene
from imagefm.data.synthetic.vocab import COLOURS, SHAPES

MANIFEST = "manifest.json"
SAMPLING_RATE = 16000
SPLITS = ("train", "test")


@dataclass
class SpeechItem:
    """One utterance: what is said (``text`` in ``lang``), every caption it matches, the keyword
    class (``label``) when it is a spoken keyword, and where it came from (``meta``: voice...)."""

    key: str
    text: str
    lang: str
    captions: list[Caption]
    split: str = "train"
    source: str = ""
    label: int | None = None
    label_name: str | None = None
    audio: str = ""  # path of the WAV, relative to the dataset folder
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpeechItem:
        captions = [Caption(c["text"], c.get("lang", "en")) for c in data.get("captions", [])]
        return cls(**{**data, "captions": captions})


# --- keywords ------------------------------------------------------------------------------------

def keyword_classes() -> dict[str, list[str]]:
    """The spoken keywords, one class each: the synthetic engine's colour and shape words,
    ``{"en": ["red", ..., "circle", ...], "ko": ["빨간색", ..., "원", ...]}``."""
    return {"en": [c.en for c in COLOURS.values()] + [s.en for s in SHAPES.values()],
            "ko": [c.ko for c in COLOURS.values()] + [s.ko for s in SHAPES.values()]}


# --- texts to speak -------------------------------------------------------------------------------

def tuxpaint_captions(root: str | Path = DEFAULT_SRC) -> dict[str, tuple[str, dict[str, str]]]:
    """``{stem: (split, {lang: caption})}`` for every Tux Paint stamp description under ``root``
    (the first file wins when a stem repeats in several folders)."""
    found: dict[str, tuple[str, dict[str, str]]] = {}
    for txt in sorted(Path(root).rglob("*.txt")):
        try:
            texts = parse_description(txt.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if texts and txt.stem not in found:
            found[txt.stem] = (split_for(txt.stem), texts)
    return found


def _scene_pair(rng: np.random.Generator, split: str) -> dict[str, str]:
    """An English and a Korean caption of one random synthetic scene (held-out colour–shape
    combinations only in the test split)."""
    spec = sample_scene(rng, SceneConfig(split="eval" if split == "test" else "train"))
    return {lang: scene_captions(spec, lang, rng, k=1)[0] for lang in ("en", "ko")}


def _voice(rng: np.random.Generator, lang: str, split: str) -> Voice:
    """A random voice with random prosody; the last speaker of each language is test-only."""
    pool = voices(lang) if split == "test" else voices(lang)[:-1]
    voice = pool[int(rng.integers(len(pool)))]
    return voice.with_prosody(int(rng.integers(120, 221)), int(rng.integers(25, 76)))


@dataclass(frozen=True)
class SynthesisPlan:
    """How much ``synthetic_speech`` makes per split: ``keyword_repeats`` utterances of each
    keyword per language, ``scene_captions`` scene captions per language, and each Tux Paint
    caption ``tuxpaint_repeats`` times per language (0: none)."""

    keyword_repeats: dict[str, int] = field(default_factory=lambda: {"train": 10, "test": 4})
    scene_captions: dict[str, int] = field(default_factory=lambda: {"train": 600, "test": 100})
    tuxpaint_repeats: int = 1
    augment_probability: float = 0.6
    langs: tuple[str, ...] = ("en", "ko")


def _texts(plan: SynthesisPlan, split: str, rng: np.random.Generator, stamps: dict
           ) -> Iterator[tuple[str, str, dict[str, str], int | None, dict[str, Any]]]:
    """(source, spoken language, {lang: text}, keyword label, meta) for one split."""
    classes = keyword_classes()
    for repeat in range(plan.keyword_repeats.get(split, 0)):
        for label in range(len(classes["en"])):
            texts = {lang: names[label] for lang, names in classes.items()}
            for lang in plan.langs:
                yield "keyword", lang, texts, label, {"repeat": repeat}
    for _ in range(plan.scene_captions.get(split, 0)):
        texts = _scene_pair(rng, split)
        for lang in plan.langs:
            yield "scene", lang, texts, None, {}
    for stem, (stamp_split, texts) in stamps.items():
        if stamp_split != split:
            continue
        for repeat in range(plan.tuxpaint_repeats):
            for lang in plan.langs:
                if lang in texts:
                    kept = {k: v for k, v in texts.items() if k in ("en", "ko")}
                    yield "tuxpaint", lang, kept, None, {"stamp": stem, "repeat": repeat}


def synthetic_speech(plan: SynthesisPlan, skips: SkipCounter, *, seed: int = 0,
                     tuxpaint_root: str | Path | None = DEFAULT_SRC
                     ) -> Iterator[tuple[SpeechItem, np.ndarray]]:
    """Synthesized utterances and their waveforms (16 kHz), train split then test split.

    Deterministic for a given ``seed`` and espeak-ng version. Texts espeak-ng cannot speak are
    skipped and counted in ``skips``. Tux Paint captions are left out when ``tuxpaint_root``
    is None or not installed.
    """
    stamps = (tuxpaint_captions(tuxpaint_root)
              if tuxpaint_root is not None and Path(tuxpaint_root).is_dir() else {})
    keyword_names = keyword_classes()
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_index])
        for index, (source, lang, texts, label, meta) in enumerate(_texts(plan, split, rng,
                                                                          stamps)):
            voice = _voice(rng, lang, split)
            try:
                wave = synthesize(texts[lang], voice, SAMPLING_RATE)
            except SpeechError as err:
                skips.add("synthesis failed", str(err))
                continue
            augmented = bool(rng.random() < plan.augment_probability)
            if augmented:
                wave = augment(wave, rng, SAMPLING_RATE)
            captions = [Caption(texts[lang], lang)] + [Caption(t, other) for other, t in
                                                       texts.items() if other != lang]
            item = SpeechItem(
                key=f"{split}-{source}-{lang}-{index:06d}", text=texts[lang], lang=lang,
                captions=captions, split=split, source=f"espeak-ng/{source}", label=label,
                label_name=keyword_names["en"][label] if label is not None else None,
                meta={**meta, "voice": voice.name, "rate": voice.rate, "pitch": voice.pitch,
                      "augmented": augmented})
            yield item, wave


# --- Tux Paint's recorded narrations --------------------------------------------------------------

# <stem>_desc.ogg (English) or <stem>_desc_<locale>.ogg; one file in the package is named
# "..._desc_da.ogg.ogg".
_NARRATION = re.compile(r"^(?P<stem>.+)_desc(?:_(?P<locale>[a-z]{2,3}(?:_[A-Z]{2})?))?"
                        r"\.ogg(?:\.ogg)?$")


def narration_files(root: str | Path = DEFAULT_SRC) -> list[tuple[Path, str, str]]:
    """``(path, stem, language)`` of every narration under ``root``, sorted by path."""
    found = []
    for path in sorted(Path(root).rglob("*_desc*.ogg")):
        match = _NARRATION.match(path.name)
        if match:
            locale = match.group("locale")
            found.append((path, match.group("stem"), lang_tag(locale) if locale else "en"))
    return found


def tuxpaint_narrations(skips: SkipCounter, root: str | Path = DEFAULT_SRC, *,
                        langs: Iterable[str] | None = None, max_seconds: float = 15.0
                        ) -> Iterator[tuple[SpeechItem, np.ndarray]]:
    """Tux Paint's recorded narrations (real speech) with the captions of their stamps, in the
    narration's language, English and Korean; ``langs`` keeps only narrations in those
    languages. Unreadable audio and narrations without a caption are skipped and counted."""
    wanted = set(langs) if langs is not None else None
    for path, stem, lang in narration_files(root):
        if wanted is not None and lang not in wanted:
            continue
        txt = path.with_name(f"{stem}.txt")
        try:
            texts = parse_description(txt.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            skips.add("no description", f"{path}: {err}")
            continue
        if lang not in texts:
            skips.add("no caption in its language", f"{path}: {txt.name} has no {lang!r} line")
            continue
        try:
            wave = load_audio(path, SAMPLING_RATE, max_seconds=max_seconds)
        except AudioError as err:
            skips.add("bad audio", str(err))
            continue
        captions = [Caption(texts[lang], lang)] + [Caption(texts[other], other) for other in
                                                   ("en", "ko") if other != lang and other in texts]
        relative = path.relative_to(root).as_posix()
        yield SpeechItem(key=safe_key(f"tuxpaint-{relative[:-4]}", unique=True), text=texts[lang],
                         lang=lang, captions=captions, split=split_for(stem),
                         source="tuxpaint-narration", meta={"stamp": stem, "path": relative}), wave


# --- writing and reading -------------------------------------------------------------------------

def write_speech_dataset(examples: Iterable[tuple[SpeechItem, np.ndarray]], out: str | Path, *,
                         name: str, skips: SkipCounter, overwrite: bool = False,
                         classes: dict[str, list[str]] | None = None,
                         provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the utterances (WAV each, a JSONL per split) and, last, ``manifest.json``."""
    out = Path(out)
    if (out / MANIFEST).exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a speech dataset; pass overwrite=True "
                                  f"(--overwrite) to replace it")
        # Only what a speech dataset consists of goes (a stale WAV would linger otherwise).
        (out / MANIFEST).unlink()
        for old in out.glob("*.jsonl"):
            old.unlink()
        shutil.rmtree(out / "audio", ignore_errors=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    seconds: Counter[str] = Counter()
    langs: Counter[str] = Counter()
    for item, wave in examples:
        item.audio = f"audio/{item.key}.wav"
        write_wav(out / item.audio, wave, SAMPLING_RATE)
        lines.setdefault(item.split, []).append(json.dumps(item.to_json(), ensure_ascii=False))
        seconds[item.split] += len(wave) / SAMPLING_RATE
        langs[item.lang] += 1
        skips.ok()
    for split, rows in lines.items():
        atomic_write_text(out / f"{split}.jsonl", "\n".join(rows) + "\n")
    manifest = {
        "name": name, "format": "imagefm-speech", "sampling_rate": SAMPLING_RATE,
        "counts": {"splits": {s: len(r) for s, r in sorted(lines.items())},
                   "speech_langs": dict(sorted(langs.items())),
                   "hours": {s: round(v / 3600, 3) for s, v in sorted(seconds.items())}},
        "classes": classes, "provenance": provenance or {},
        "skipped": dict(skips.skipped.most_common()), "skip_examples": skips.examples,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a speech dataset (make one with "
                                f"`imagefm speech prepare synthetic --out {root}`)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_speech_dataset(root: str | Path, split: str | None = None,
                        skips: SkipCounter | None = None) -> list[SpeechItem]:
    """The utterances of ``split`` (None: every split), ``audio`` made an absolute path. Lines
    that do not parse are skipped and counted."""
    root = Path(root)
    read_manifest(root)
    skips = skips if skips is not None else SkipCounter()
    items = []
    splits = [split] if split is not None else sorted(p.stem for p in root.glob("*.jsonl"))
    for name in splits:
        path = root / f"{name}.jsonl"
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = SpeechItem.from_json(json.loads(line))
            except (ValueError, TypeError, KeyError) as err:
                skips.add("bad line", f"{path}:{number}: {err}")
                continue
            item.audio = str(root / item.audio)
            items.append(item)
            skips.ok()
    return items
