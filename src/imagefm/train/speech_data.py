"""``data.source: speech``: train a CLAP model on speech datasets (imagefm.data.speech_sets).

    data:
      source: speech
      path: data/speech-synth,data/tuxpaint-narrations   # comma-separated dataset folders
      batch_size: 64
      options:
        speech_langs: [en, ko]       # utterances in these languages ([]: all)
        caption_langs: [en, ko]      # captions to pair with; each epoch picks one per utterance
        max_seconds: 8.0             # clips cut to this length
        cache_text_features: auto    # auto: when stage.frozen locks the whole text tower

Batches are ``{"input_features", "input_ids", "attention_mask"}``: log-mel features of the
model's own ``MelConfig`` with padded frames filled with ``FEATURE_PAD`` (the model recovers the
frame mask from them: ``imagefm.models.clap``), captions tokenised by the model's tokenizer.
Only the ``train`` split is read, except for held-out batches (``held_out: true``, set by the
evaluation loader), which read the ``test`` split in order with the spoken text as the caption.

A locked text tower gives the same output for a caption at every step; with
``cache_text_features`` the source runs it once per distinct caption before training and yields
the pooled features in ``input_ids`` ([B, width] floats; ``ClapModel.encode_text`` skips the
tower). The contract of ``imagefm.train.data`` holds: batches depend only on (run.seed, epoch);
each rank yields its rows of every global batch; the last incomplete batch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imagefm.config import ConfigError
from imagefm.data.audio import load_audio
from imagefm.data.formats import SkipCounter
from imagefm.data.speech_sets import SpeechItem, read_speech_dataset
from imagefm.models.clap import speech_features
from imagefm.train.config import STAGE_PRESETS, TrainConfig
from imagefm.train.data import (
    check_options,
    micro_batch_size,
    model_tokenizer,
    register_data_source,
)
from imagefm.train.distributed import DistInfo

OPTIONS = ("speech_langs", "caption_langs", "max_seconds", "cache_text_features", "held_out",
           "limit")


def text_tower_locked(config: TrainConfig) -> bool:
    """Whether the stage freezes the whole text tower (nothing under ``text`` trains)."""
    frozen = STAGE_PRESETS[config.stage.preset] + list(config.stage.frozen)
    return "text" in frozen and not config.stage.unlock_last_n.get("text")


@torch.no_grad()
def text_features(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 128
                  ) -> torch.Tensor:
    """The text tower's pooled output [N, width] for ``texts`` (the tower in eval mode)."""
    tower = model.text
    was_training = tower.training
    tower.eval()
    try:
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size])
            rows.append(tower(batch["input_ids"], batch["attention_mask"]).float())
        return torch.cat(rows)
    finally:
        tower.train(was_training)


class SpeechBatches:
    """``make_loader(epoch)``: batches of (speech features, one caption) from ``items``.

    Training order and caption choice come from (seed, epoch); ``held_out`` keeps the order and
    the spoken text. ``texts`` maps a caption to its row in ``cached`` (text-tower features) when
    those are cached, else captions are tokenised per batch.
    """

    def __init__(self, items: list[SpeechItem], *, batch_size: int, model: nn.Module,
                 tokenizer: Any, caption_langs: list[str], max_seconds: float, seed: int,
                 held_out: bool = False, cached: torch.Tensor | None = None,
                 texts: dict[str, int] | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.items, self.batch_size, self.held_out = items, batch_size, held_out
        self.tokenizer, self.caption_langs, self.max_seconds = tokenizer, caption_langs, max_seconds
        self.mel, self.max_frames = model.config.mel, model.config.audio.max_frames
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.cached, self.texts = cached, texts
        self.skips = SkipCounter()

    def __len__(self) -> int:
        return len(self.items) // self.batch_size

    def captions(self, item: SpeechItem) -> list[str]:
        return [c.text for c in item.captions if not self.caption_langs
                or c.lang in self.caption_langs]

    def _caption(self, item: SpeechItem, rng: np.random.Generator) -> str:
        if self.held_out:
            return item.text
        options = self.captions(item)
        return options[int(rng.integers(len(options)))]

    def __call__(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = (np.arange(len(self.items)) if self.held_out
                 else rng.permutation(len(self.items)))
        local = self.batch_size // self.world_size
        for index in range(len(self)):
            rows = order[index * self.batch_size:(index + 1) * self.batch_size]
            captions = [self._caption(self.items[i], rng) for i in rows]  # all ranks draw alike
            mine = rows[self.rank * local:(self.rank + 1) * local]
            mine_captions = captions[self.rank * local:(self.rank + 1) * local]
            waves = [load_audio(self.items[i].audio, self.mel.sampling_rate,
                                max_seconds=self.max_seconds) for i in mine]
            batch = {"input_features": speech_features(waves, self.mel, self.max_frames)}
            if self.cached is not None and self.texts is not None:
                batch["input_ids"] = self.cached[[self.texts[c] for c in mine_captions]]
                batch["attention_mask"] = torch.ones(len(mine), 1, dtype=torch.long)
            else:
                batch.update(self.tokenizer(mine_captions))
            yield batch


def _read(paths: str, split: str, speech_langs: list[str], limit: int | None) -> list[SpeechItem]:
    items: list[SpeechItem] = []
    for path in [p.strip() for p in paths.split(",") if p.strip()]:
        if not (Path(path) / "manifest.json").is_file():
            raise ConfigError(f"data.path: {path} is not a speech dataset (no manifest.json); "
                              f"make one with `imagefm speech prepare synthetic --out {path}`")
        found = [i for i in read_speech_dataset(path, split)
                 if not speech_langs or i.lang in speech_langs]
        items += found[:limit] if limit else found
    return items


def speech_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> Any:
    """``data.source=speech`` (options: see the module docstring)."""
    options = dict(config.data.options)
    check_options("the speech source", options, OPTIONS)
    if not config.data.path:
        raise ConfigError("data.source=speech needs data.path: speech dataset folder(s), "
                          "comma-separated (make one with `imagefm speech prepare synthetic`)")
    if getattr(model, "media_key", None) != "input_features":
        raise ConfigError(f"data.source=speech trains speech models (model.preset clap-e5 or "
                          f"clap-tiny), not a {type(model).__name__}")
    held_out = bool(options.get("held_out", False))
    speech_langs = list(options.get("speech_langs", []))
    caption_langs = list(options.get("caption_langs", []))
    max_seconds = float(options.get("max_seconds", 8.0))
    limit = options.get("limit", 64 if config.run.local else None)
    items = _read(config.data.path, "test" if held_out else "train", speech_langs, limit)
    if caption_langs:  # an utterance needs a caption to pair with
        items = [i for i in items if any(c.lang in caption_langs for c in i.captions)]
    rows = micro_batch_size(config, info)
    global_batch = rows * info.world_size
    if len(items) < global_batch:
        raise ConfigError(f"data.path holds {len(items)} utterances for this split, fewer than "
                          f"one batch (data.batch_size={config.data.batch_size})")
    tokenizer = model_tokenizer(model, "speech")
    cache = options.get("cache_text_features", "auto")
    if cache not in ("auto", True, False):
        raise ConfigError(f"data.options.cache_text_features must be auto, true or false, got "
                          f"{cache!r}")
    locked = text_tower_locked(config)
    if cache is True and not locked:
        raise ConfigError("data.options.cache_text_features=true needs a locked text tower: "
                          "add text to stage.frozen (and no stage.unlock_last_n.text)")
    cached, texts = None, None
    if locked and cache in ("auto", True):
        batches = SpeechBatches(items, batch_size=global_batch, model=model, tokenizer=tokenizer,
                                caption_langs=caption_langs, max_seconds=max_seconds, seed=0,
                                held_out=held_out)
        distinct = sorted({c for item in items for c in
                           ([item.text] if held_out else batches.captions(item))})
        texts = {text: i for i, text in enumerate(distinct)}
        cached = text_features(model, tokenizer, distinct)
    return SpeechBatches(items, batch_size=global_batch, model=model, tokenizer=tokenizer,
                         caption_langs=caption_langs, max_seconds=max_seconds,
                         seed=config.run.seed, held_out=held_out, cached=cached, texts=texts,
                         rank=info.rank, world_size=info.world_size)


register_data_source("speech", speech_source, held_out_option=True)
