"""How well does a CTC-pretrained audio tower hear the questions? Character error rate.

The questions are those ``imagefm vlm-speech-eval`` asks (:func:`imagefm.eval.vqa.vqa_questions`,
same seed), spoken by the voice training never used (by default); each clip is transcribed by
greedy CTC decoding and compared with the question's text as the model can write it (lower case,
no punctuation: :func:`imagefm.models.speech_ctc.transcript_ids` and back). The error rate is
edits (insertions, deletions, substitutions) over reference characters, summed over clips;
Korean is counted in syllables (NFC), as it is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from imagefm.data.speech import synthesize
from imagefm.eval.speech_vqa import eval_voice
from imagefm.eval.vqa import vqa_questions
from imagefm.models.audio_features import log_mel
from imagefm.models.speech_ctc import SpeechCTC, ids_to_text, transcript_ids


def edit_distance(reference: str, hypothesis: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions."""
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        current = [i]
        for j, h in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Total edits over total reference characters."""
    edits = sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True))
    return edits / max(1, sum(len(r) for r in references))


@torch.no_grad()
def evaluate_ctc(model: SpeechCTC, *, n: int = 50, langs: Sequence[str] = ("en", "ko"),
                 split: str = "all", seed: int = 12345, voice: str = "held-out",
                 batch_size: int = 32) -> dict[str, Any]:
    """``{lang: {"cer", "exact", "n", "examples": [[reference, transcript], ...]}}``."""
    model.eval()
    config = model.config
    rate = config.encoder.mel.sampling_rate
    results: dict[str, Any] = {}
    for lang in langs:
        questions = [q for _, _, q, _ in vqa_questions(n, lang=lang, split=split, image_size=32,
                                                        seed=seed)]
        speaker = eval_voice(lang, voice)
        references = [ids_to_text(transcript_ids(q, config.alphabet), config.alphabet)
                      for q in questions]
        hypotheses: list[str] = []
        for start in range(0, n, batch_size):
            waves = [synthesize(q, speaker, rate) for q in questions[start:start + batch_size]]
            features, _ = log_mel(waves, config.mel)
            hypotheses += model.transcribe(features)
        results[lang] = {
            "cer": character_error_rate(references, hypotheses),
            "exact": sum(r == h for r, h in zip(references, hypotheses, strict=True)) / n,
            "n": n, "voice": speaker.name,
            "examples": [list(pair) for pair in zip(references, hypotheses, strict=True)]}
    return results
