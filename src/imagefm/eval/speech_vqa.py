"""Spoken questions about pictures: does a VLM with an audio tower hear the question?

The scenes and questions are :func:`imagefm.eval.vqa.vqa_questions`' (the same seed gives the
same questions as ``imagefm vlm-eval``); each question is asked four ways and scored by exact
match as there:

- ``spoken``: the picture and the question as speech (espeak-ng, :mod:`imagefm.data.speech`);
- ``text``: the picture and the same question as text (what the audio should match);
- ``spoken-blind`` and ``text-blind``: a plain grey picture instead of the scene, the control
  for what the question alone gives away (answer priors).

Spoken above its blind control means the model uses the picture with a question it heard;
spoken near text means the audio carries the question as well as the words do. By default the
speaker is the one voice per language that training never uses
(:func:`imagefm.train.speech_vlm_data.held_out_voice`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imagefm.chat import chat_stops
from imagefm.data.speech import Voice, synthesize
from imagefm.eval.vqa import VQAResult, answer, scene_size, vqa_questions
from imagefm.train.speech_vlm_data import held_out_voice, training_voices
from imagefm.vlm_runtime import decode_replies, to_model

MODES = ("spoken", "text", "spoken-blind", "text-blind")


@torch.no_grad()
def answer_spoken(model: Any, processor: Any, images: Sequence[Any], clips: Sequence[Any], *,
                  max_new_tokens: int = 16) -> list[str]:
    """Greedy answers, one per (image, spoken question), batched with left padding."""

    user = {"role": "user", "content": f"{processor.image_marker}\n{processor.audio_marker}"}
    batch = processor.prompt([[user]] * len(images), list(images), audios=list(clips))
    batch = to_model(model, batch)
    eos, stops = chat_stops(model.lm)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos,
                         stop_strings=stops)
    return decode_replies(model, out[:, batch["input_ids"].shape[1]:], eos, stops)


def eval_voice(lang: str, which: str) -> Voice:
    """``held-out``: the voice training never uses; ``train``: the first training voice."""
    if which == "held-out":
        return held_out_voice(lang)
    if which == "train":
        return training_voices(lang)[0]
    raise ValueError(f"voice = {which!r}: choose held-out or train")


def evaluate_spoken_vqa(model: Any, processor: Any, *, n: int = 100,
                        langs: Sequence[str] = ("en", "ko"), split: str = "all",
                        seed: int = 12345, style: dict[str, Any] | None = None,
                        voice: str = "held-out", modes: Sequence[str] = MODES,
                        batch_size: int = 16, progress: bool = False) -> dict[str, VQAResult]:
    """Exact-match accuracy per way of asking (``modes``, see the module docstring)."""
    from tqdm.auto import tqdm

    if not getattr(processor, "takes_audio", False):
        raise ValueError("this model has no audio tower: it cannot hear questions")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"modes {unknown}: choose from {', '.join(MODES)}")
    results = {mode: VQAResult(f"{split} ({mode})") for mode in modes}
    size = scene_size(processor)
    grey = np.full((size, size, 3), 128, dtype=np.uint8)
    rate = processor.audio.sampling_rate
    for lang in langs:
        items = vqa_questions(n, lang=lang, split=split, image_size=size, seed=seed, style=style)
        speaker = eval_voice(lang, voice)
        for start in tqdm(range(0, n, batch_size), desc=f"speech vqa {lang}",
                          disable=not progress):
            chunk = items[start:start + batch_size]
            questions = [c[2] for c in chunk]
            clips = [synthesize(q, speaker, rate) for q in questions]
            for mode in modes:
                images = [grey] * len(chunk) if mode.endswith("-blind") else [c[0] for c in chunk]
                if mode.startswith("spoken"):
                    predicted = answer_spoken(model, processor, images, clips)
                else:
                    predicted = answer(model, processor, images, questions)
                for (_, kind, question, reference), guess in zip(chunk, predicted, strict=True):
                    results[mode].add(lang, kind, question, reference, guess)
    return results


def speech_vqa_markdown(results: dict[str, VQAResult], langs: Sequence[str]) -> str:
    """A table: one row per way of asking, accuracy per language."""
    lines = ["| asked | " + " | ".join(langs) + " | n per language |",
             "|---|" + "---:|" * len(langs) + "---:|"]
    for mode, result in results.items():
        table = result.to_dict()["by_lang"]
        cells = [f"{100 * table[lang]['accuracy']:.1f}%" if lang in table else "–"
                 for lang in langs]
        count = max((table[lang]["n"] for lang in langs if lang in table), default=0)
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {count} |")
    return "\n".join(lines) + "\n"
