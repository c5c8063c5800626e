"""``data.source = vlm-speech``: pictures, questions asked aloud, short answers.

Each sample is a scene of the synthetic VQA engine with one question in English or Korean (half
each, ``langs``), the question spoken by espeak-ng (:mod:`imagefm.data.speech`) and given to the
model as audio instead of text::

    user:      <image>\\n<audio>          (the picture, then the spoken question)
    assistant: triangle

A ``text_fraction`` of the samples keep the question as text (the same conversation the
``vlm-synthetic`` source makes), so a stage that trains the image projector too, or the LM,
keeps the text path. A ``transcribe_fraction`` are speech recognition instead: the spoken
question alone, a request to write it down (:data:`TRANSCRIBE`) and the question's text as the
reply; every word of the question is then a label, not only the one- or two-token answer, which
gives an audio tower learning from scratch far more to learn from per clip.

Speakers are the training voices of :func:`imagefm.data.speech.voices`
(all but the last of each language, which evaluation keeps as an unheard speaker) at a random
rate and pitch; ``augment`` is the probability of reverberation and noise
(:func:`imagefm.data.speech.augment`). Sample ``index`` of epoch ``e`` is sample
``e * examples_per_epoch + index`` (deterministic: exact resume; ranks slice one global batch).

    data:
      source: vlm-speech
      batch_size: 8
      options: {langs: [en, ko], text_fraction: 0.25, augment: 0.3}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch import nn

from imagefm.config import ConfigError
from imagefm.data.image import open_image
from imagefm.data.records import IMAGE_TOKEN
from imagefm.data.speech import Voice, augment, synthesize, voices
from imagefm.data.synthetic.generator import make_record
from imagefm.train.config import TrainConfig
from imagefm.train.data import (
    LoaderFactory,
    check_options,
    micro_batch_size,
    register_data_source,
)
from imagefm.train.distributed import DistInfo
from imagefm.train.vlm_data import rank_rows
from imagefm.vlm_processor import VLMProcessor

OPTIONS = ("langs", "text_fraction", "transcribe_fraction", "augment", "style",
           "examples_per_epoch", "seed", "rates", "pitches")
TRANSCRIBE = {"en": "Write down what was said.", "ko": "들은 말을 그대로 적어 주세요."}
LANGS = ("en", "ko")
_SPEECH_STREAM = 11  # the random stream of each sample's voice, apart from the scene's own


def training_voices(lang: str) -> list[Voice]:
    """The voices training speaks with: all of ``lang``'s but the last (held out)."""
    return voices(lang)[:-1]


def held_out_voice(lang: str) -> Voice:
    """The speaker no training sample uses (evaluation's unheard voice)."""
    return voices(lang)[-1]


def scene_question(index: int, *, lang: str, seed: int, image_size: int, split: str = "train",
                   style: dict[str, Any] | None = None) -> tuple[Any, str, str, str]:
    """(image, question kind, question, answer) of scene ``index``: one question in ``lang``."""

    record = make_record("vqa", index, seed=seed, image_size=image_size, split=split,
                         qa_per_image=1, langs=(lang,), style=style)
    question = record.conversation[0].content.replace(IMAGE_TOKEN, "").strip()
    return (np.asarray(open_image(record.image)), record.meta["question_kinds"][0], question,
            record.conversation[1].content)


class SpokenQuestions:
    """Deterministic batches of (picture, spoken question, answer) conversations."""

    def __init__(self, processor: VLMProcessor, *, batch_size: int,
                 langs: Sequence[str] = LANGS, text_fraction: float = 0.0,
                 transcribe_fraction: float = 0.0, augment: float = 0.0,
                 style: dict[str, Any] | None = None, examples_per_epoch: int = 100_000,
                 seed: int = 0, rates: Sequence[int] = (150, 210),
                 pitches: Sequence[int] = (30, 70), rank: int = 0, world_size: int = 1) -> None:
        if not processor.takes_audio:
            raise ConfigError("data.source = vlm-speech needs a VLM with an audio tower: add one "
                              "with `imagefm vlm-add-audio MODEL --out DIR`")
        unknown = sorted(set(langs) - set(LANGS))
        if unknown or not langs:
            raise ConfigError(f"data.options.langs = {list(langs)}: choose from "
                              f"{', '.join(LANGS)}")
        if (not 0 <= text_fraction < 1 or not 0 <= transcribe_fraction <= 1 - text_fraction
                or not 0 <= augment <= 1):
            raise ConfigError("data.options.text_fraction must be in [0, 1), "
                              "data.options.transcribe_fraction in [0, 1 - text_fraction] and "
                              "data.options.augment in [0, 1]")
        if len(rates) != 2 or len(pitches) != 2 or rates[0] > rates[1] or pitches[0] > pitches[1]:
            raise ConfigError("data.options.rates and data.options.pitches are [low, high]")
        self.processor, self.langs = processor, tuple(langs)
        self.text_fraction, self.augment = text_fraction, augment
        self.transcribe_fraction = transcribe_fraction
        self.rates, self.pitches = tuple(rates), tuple(pitches)
        self.style, self.seed = style, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.examples_per_epoch = examples_per_epoch
        self.voices = {lang: training_voices(lang) for lang in self.langs}
        self.skipped = 0

    def example(self, index: int) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
        """The tokenised conversation, the picture (None: a transcription) and the spoken
        question (None: as text)."""
        lang = self.langs[index % len(self.langs)]
        image, _, question, answer = scene_question(
            index, lang=lang, seed=self.seed, image_size=self.processor.card.image_size,
            style=self.style)
        rng = np.random.default_rng([self.seed, index, _SPEECH_STREAM])
        marker = self.processor.image_marker
        clip = None
        draw = rng.random()
        if draw < self.text_fraction:
            user = f"{marker}\n{question}"
        else:
            options = self.voices[lang]
            voice = options[int(rng.integers(len(options)))].with_prosody(
                int(rng.integers(self.rates[0], self.rates[1] + 1)),
                int(rng.integers(self.pitches[0], self.pitches[1] + 1)))
            clip = synthesize(question, voice, self.processor.audio.sampling_rate)
            if rng.random() < self.augment:
                clip = augment(clip, rng, self.processor.audio.sampling_rate)
            user = f"{marker}\n{self.processor.audio_marker}"
            if draw < self.text_fraction + self.transcribe_fraction:
                user, answer, image = (f"{self.processor.audio_marker}\n{TRANSCRIBE[lang]}",
                                       question, None)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return self.processor.training_example(messages), image, clip

    def __call__(self, epoch: int) -> Iterator[dict]:
        for mine in rank_rows(self, epoch):
            yield self.processor.collate([e for e, _, _ in mine],
                                         images=[i for _, i, _ in mine if i is not None],
                                         audios=[c for _, _, c in mine if c is not None])


def vlm_speech_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> LoaderFactory:
    """``data.source = vlm-speech`` (options: see OPTIONS) for a LLaVA-style VLM with audio."""
    if getattr(model, "architecture", None) != "vlm":
        raise ConfigError(f"data.source = vlm-speech trains a LLaVA-style VLM with an audio "
                          f"tower, not a {getattr(model, 'architecture', type(model).__name__)}")
    check_options("vlm-speech", config.data.options, OPTIONS)
    options = dict(config.data.options)
    options.setdefault("seed", config.run.seed)
    return SpokenQuestions(VLMProcessor.for_model(model),
                           batch_size=micro_batch_size(config, info) * info.world_size,
                           rank=info.rank, world_size=info.world_size, **options)


register_data_source("vlm-speech", vlm_speech_source)
