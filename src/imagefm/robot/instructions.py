"""Instructions for a tabletop episode, in English and Korean, from the synthetic vocabulary.

    en: "put the red circle in the blue zone", "move the green cross to the yellow area" ...
    ko: "빨간 원을 파란색 구역에 놓아 줘", "초록색 십자가를 노란 칸으로 옮겨 주세요" ...

Korean particles come from ``imagefm.data.synthetic.korean.attach`` (원을 / 하트를), colours in
their attributive forms before a noun (빨간 원, 빨간색 원) as the caption templates use them.

Layer: data.
"""

from __future__ import annotations

import numpy as np

from imagefm.data.synthetic.korean import attach
from imagefm.data.synthetic.vocab import COLOURS, SHAPES
from imagefm.robot.sim import Tabletop

LANGS = ("en", "ko")
EN_TEMPLATES = (
    "put the {colour} {shape} in the {zone} zone",
    "move the {colour} {shape} to the {zone} zone",
    "place the {colour} {shape} on the {zone} area",
    "pick up the {colour} {shape} and drop it in the {zone} zone",
)
KO_TEMPLATES = (
    "{object} {zone} 구역에 놓아 줘",
    "{object} {zone} 구역으로 옮겨 주세요",
    "{object} 집어서 {zone} 칸에 내려놓아",
    "{object} {zone} 영역으로 옮겨",
)


def instruction(colour: str, shape: str, zone: str, lang: str,
                rng: np.random.Generator) -> str:
    """One phrasing (template and word forms drawn by ``rng``) of "put X in zone Z"."""
    if lang == "en":
        template = EN_TEMPLATES[int(rng.integers(len(EN_TEMPLATES)))]
        return template.format(colour=COLOURS[colour].en, shape=SHAPES[shape].en,
                               zone=COLOURS[zone].en)
    if lang == "ko":
        c, s, z = COLOURS[colour], SHAPES[shape], COLOURS[zone]
        names = (s.ko, *s.ko_alternatives)
        noun = names[int(rng.integers(len(names)))]
        adjective = c.ko_attributive[int(rng.integers(len(c.ko_attributive)))]
        zone_word = (z.ko, *z.ko_attributive)[int(rng.integers(1 + len(z.ko_attributive)))]
        template = KO_TEMPLATES[int(rng.integers(len(KO_TEMPLATES)))]
        return template.format(object=f"{adjective} {attach(noun, '을/를')}", zone=zone_word)
    raise ValueError(f"instructions are in {LANGS}, got {lang!r}")


def episode_instruction(env: Tabletop, lang: str, rng: np.random.Generator) -> str:
    """The instruction of ``env``'s task (its target object and goal zone)."""
    target = env.target
    return instruction(target.colour, target.shape, env.goal.colour, lang, rng)


def all_instructions(combos: list[tuple[str, str]], zones: tuple[str, ...]) -> list[str]:
    """Every phrasing of every (combo, zone) pair in both languages: a tokenizer's corpus."""
    texts = []
    for colour, shape in combos:
        for zone in zones:
            c, s, z = COLOURS[colour], SHAPES[shape], COLOURS[zone]
            for template in EN_TEMPLATES:
                texts.append(template.format(colour=c.en, shape=s.en, zone=z.en))
            for noun in (s.ko, *s.ko_alternatives):
                for adjective in c.ko_attributive:
                    for zone_word in (z.ko, *z.ko_attributive):
                        for template in KO_TEMPLATES:
                            texts.append(template.format(
                                object=f"{adjective} {attach(noun, '을/를')}", zone=zone_word))
    return texts
