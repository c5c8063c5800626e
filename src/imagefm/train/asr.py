"""CTC speech recognition: pre-training an audio tower on spoken questions (``task.name=asr_ctc``).

The tower (:class:`imagefm.models.speech_ctc.SpeechCTC`: Whisper-style encoder + a linear CTC
head over characters) learns to spell out the questions of the synthetic VQA engine, spoken by
espeak-ng in English and Korean. No LM is in the loop, so a CPU core trains on thousands of clips
a minute; afterwards ``imagefm vlm-add-audio VLM --encoder RUN/final`` puts the encoder into a VLM,
whose projector then only has to learn to hand word-bearing features to the LM.

    imagefm train configs/speech-ctc.yaml                 # model.preset=speech-ctc-tiny
    imagefm speech-ctc-eval runs/speech-ctc/final         # character error rate, held-out voice

``data.source = speech-ctc`` synthesises ``clips`` examples once (the questions of scenes
``0..clips-1`` with :mod:`imagefm.train.speech_vlm_data`'s training voices at random rates and
pitches, a fraction ``augment`` with noise and reverberation), keeps their log-mel features
(float16; optionally cached in the file ``cache``) and serves them in a new order every epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imagefm.checkpoint import atomic_write
from imagefm.config import ConfigError, merge_nested
from imagefm.data.speech import Voice, synthesize
from imagefm.data.speech import augment as augment_wave
from imagefm.losses import ctc_loss
from imagefm.models.audio_features import log_mel
from imagefm.models.speech_ctc import SpeechCTC, SpeechCTCConfig
from imagefm.models.whisper_encoder import AUDIO_PRESETS
from imagefm.train.config import TrainConfig
from imagefm.train.data import LoaderFactory, check_options, micro_batch_size, register_data_source
from imagefm.train.distributed import DistInfo
from imagefm.train.speech_vlm_data import (
    LANGS,
    held_out_voice,
    scene_question,
    training_voices,
)
from imagefm.train.tasks import Metrics, unwrap

CTC_PRESETS: dict[str, dict[str, Any]] = {
    # audio-tiny's encoder (192 wide, 4 layers): the tower `vlm-add-audio` gives a VLM by default
    "speech-ctc-tiny": {"encoder": "audio-tiny", "seconds": 4.0},
}
OPTIONS = ("langs", "clips", "augment", "rates", "pitches", "seed", "cache", "extra_voices")
_SPEECH_STREAM = 13  # the random stream of a clip's voice, apart from the scene's own


def build_speech_ctc(name: str, overrides: dict[str, Any] | None = None,
                     pretrained: bool = True) -> SpeechCTC:
    """A fresh recogniser of preset ``name``; ``overrides`` may change ``seconds``,
    ``alphabet`` and any encoder field (``{encoder: {encoder_layers: 2}}``)."""
    del pretrained  # trained from scratch: no published weights to start from
    if name not in CTC_PRESETS:
        raise ConfigError(f"unknown speech-ctc preset {name!r}; choose one of "
                          f"{', '.join(CTC_PRESETS)}")
    base = dict(CTC_PRESETS[name])
    encoder = AUDIO_PRESETS[base.pop("encoder")]
    mel = encoder.get("mel")
    data = merge_nested({**base, "encoder": {k: v for k, v in encoder.items() if k != "mel"}},
                        overrides or {})
    if mel is not None and "mel" not in data["encoder"]:
        data["encoder"]["mel"] = mel.to_dict()
    return SpeechCTC(SpeechCTCConfig.from_dict(data))


class CTCTask:
    """CTC loss of a :class:`SpeechCTC` on batches of ``input_features``, ``targets`` (padded
    with 0) and ``target_lengths``. Also reports ``blank_share``, the frames whose argmax is the
    blank: near 1 early on (a model that has learned only silence), falling as it learns."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Metrics]:
        logits = model(batch["input_features"])
        loss = ctc_loss(logits, batch["targets"], batch["target_lengths"])
        with torch.no_grad():
            blank_share = (logits.argmax(-1) == 0).float().mean()
        return loss, {"blank_share": blank_share}


def ctc_task(config: TrainConfig, model: nn.Module) -> CTCTask:
    """``task.name=asr_ctc``: checks that the model is a CTC recogniser."""
    if not isinstance(unwrap(model), SpeechCTC):
        raise ConfigError(f"task.name = asr_ctc trains a speech recogniser (model.preset="
                          f"{', '.join(CTC_PRESETS)}), not a {type(unwrap(model)).__name__}")
    return CTCTask()


def synthesize_clips(model_config: SpeechCTCConfig, *, clips: int, langs: Sequence[str] = LANGS,
                     augment: float = 0.0, rates: Sequence[int] = (150, 210),
                     pitches: Sequence[int] = (30, 70), seed: int = 0,
                     extra_voices: dict[str, Sequence[str]] | None = None
                     ) -> tuple[torch.Tensor, list[str]]:
    """Log-mel features [clips, n_mels, frames] (float16) and the texts spoken in them.
    ``extra_voices`` adds espeak-ng voices (``{"en": ["en-029", "en-us-nyc+f2"]}``) to the
    training voices; evaluation's held-out voice is refused."""
    rate = model_config.encoder.mel.sampling_rate
    voices = {lang: training_voices(lang) for lang in langs}
    for lang, names in (extra_voices or {}).items():
        if lang not in voices or held_out_voice(lang).name in names:
            raise ConfigError(f"data.options.extra_voices: {lang!r} must be one of "
                              f"{', '.join(langs)}, and its voices must not include the held-out "
                              f"{held_out_voice(lang).name if lang in LANGS else ''}")
        voices[lang] = voices[lang] + [Voice(lang, name) for name in names]
    features, texts = [], []
    for index in range(clips):
        lang = langs[index % len(langs)]
        _, _, question, _ = scene_question(index, lang=lang, seed=seed, image_size=32)
        rng = np.random.default_rng([seed, index, _SPEECH_STREAM])
        options = voices[lang]
        speaker = options[int(rng.integers(len(options)))]
        voice = speaker.with_prosody(int(rng.integers(rates[0], rates[1] + 1)),
                                     int(rng.integers(pitches[0], pitches[1] + 1)))
        wave = synthesize(question, voice, rate)
        if rng.random() < augment:
            wave = augment_wave(wave, rng, rate)
        mel, _ = log_mel([wave], model_config.mel)
        features.append(mel[0].half())
        texts.append(question)
    return torch.stack(features), texts


class SpokenTranscripts:
    """Cached (features, transcript) pairs in a new order each epoch (global batches; this
    rank's slice of each)."""

    def __init__(self, features: torch.Tensor, targets: list[list[int]], *, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.features, self.targets = features, targets
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def __call__(self, epoch: int) -> Iterator[dict]:
        order = torch.randperm(len(self.targets),
                               generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        local = self.batch_size // self.world_size
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            rows = order[start:start + self.batch_size][self.rank * local:(self.rank + 1) * local]
            targets = [self.targets[int(i)] for i in rows]
            padded = torch.zeros(len(rows), max(len(t) for t in targets), dtype=torch.long)
            for row, target in enumerate(targets):
                padded[row, :len(target)] = torch.tensor(target)
            yield {"input_features": self.features[rows].float(), "targets": padded,
                   "target_lengths": torch.tensor([len(t) for t in targets])}


def _cached(path: Path | None, key: dict[str, Any], make) -> tuple[torch.Tensor, list[str]]:
    """``make()``, or what an earlier run with the same ``key`` stored in ``path``."""
    fingerprint = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
    if path is not None and path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.get("fingerprint") == fingerprint:
            return stored["features"], list(stored["texts"])
    features, texts = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {"fingerprint": fingerprint, "features": features, "texts": texts}
        atomic_write(path, lambda partial: torch.save(stored, partial))
    return features, texts


def speech_ctc_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> LoaderFactory:
    """``data.source = speech-ctc`` (options: see OPTIONS) for a :class:`SpeechCTC`."""
    bare = unwrap(model)
    if config.task.name != "asr_ctc":
        raise ConfigError(f"data.source = speech-ctc feeds task.name=asr_ctc, not "
                          f"task.name={config.task.name}")
    if not isinstance(bare, SpeechCTC):
        raise ConfigError(f"data.source = speech-ctc trains a speech recogniser "
                          f"(task.name=asr_ctc), not a {type(bare).__name__}")
    check_options("speech-ctc", config.data.options, OPTIONS)
    options = {"langs": list(LANGS), "clips": 4000, "augment": 0.3, "rates": [150, 210],
               "pitches": [30, 70], "seed": config.run.seed, **config.data.options}
    unknown = sorted(set(options["langs"]) - set(LANGS))
    if unknown or not options["langs"] or int(options["clips"]) < config.data.batch_size:
        raise ConfigError(f"data.options.langs must be some of {', '.join(LANGS)} and "
                          f"data.options.clips >= data.batch_size ({config.data.batch_size})")
    cache = options.pop("cache", None)
    key = {**options, "mel": bare.config.mel.to_dict()}
    features, texts = _cached(Path(cache) if cache else None, key, lambda: synthesize_clips(
        bare.config, clips=int(options["clips"]), langs=tuple(options["langs"]),
        augment=float(options["augment"]), rates=options["rates"], pitches=options["pitches"],
        seed=int(options["seed"]), extra_voices=options.get("extra_voices")))
    return SpokenTranscripts(features, [bare.transcript_ids(t) for t in texts],
                             batch_size=micro_batch_size(config, info) * info.world_size,
                             seed=config.run.seed, rank=info.rank, world_size=info.world_size)


register_data_source("speech-ctc", speech_ctc_source)
