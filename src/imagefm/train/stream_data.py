"""``data.source: stream``: contrastive training on data of any size, streamed with flat memory.

    data:
      source: stream
      path: "shards/{000000..001023}.tar"   # a shard spec (braces, ::, dirs, globs, pipe:, http)
                                            # or a .csv/.tsv/.jsonl file, or a HF dataset folder
      batch_size: 1024                      # the global batch of one optimizer step
      num_workers: 4                        # DataLoader workers per process
      options:
        format: auto              # auto | shards | csv | hf
        langs: [en, ko]           # caption languages kept (default: all); one is drawn per step
        shuffle_buffer: 1000      # records (encoded) per stream
        streams: 8                # virtual streams (default: processes x workers)
        resampled: false          # true: units drawn with replacement, endless...
        samples_per_epoch: null   # ...and this sets the epoch's length (required then)
        augment: {scale: [0.9, 1.0], hflip_prob: 0.5}   # data/augment.py AugmentConfig
        csv_img_key: filepath     # open_clip's CSV conventions
        csv_caption_key: title
        csv_separator: null       # null: a tab when the header has one, else a comma
        hf_image_column: image
        hf_text_column: text
        split: train              # split-named shards / imagefolder / DatasetDict / parquet
        max_pixels: null          # larger images are skipped ("image too large")
        held_out: false           # true: evaluation batches (see below)

How the data is split, shuffled and resumed is ``imagefm.data.stream`` (read its docstring):
batches depend on (run.seed, epoch, streams) only, so a run resumed on the same number of
streams continues at the exact sample, and ``skip_batches`` gets there without preprocessing
the batches already trained on. Each rank yields ``micro_batch_size`` rows per batch.

Images become ``pixel_values`` through ``TrainTransform(model.card, augment)`` or, without
``augment``, the model's own evaluation preprocessing; one caption per image (among ``langs``,
drawn per (seed, epoch, key)) becomes ``input_ids``/``attention_mask`` with the model's own
tokenizer, padded as its settings say.

``held_out: true`` reads held-out data (``eval.data``): in file order, without augmentation or
resampling, from the ``test`` split where the data names its splits. Full batches only: a last
partial batch is not read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from imagefm.config import ConfigError
from imagefm.data.augment import AugmentConfig, TrainTransform
from imagefm.data.image import DEFAULT_MAX_PIXELS, ImageProcessor
from imagefm.data.loader import Collate
from imagefm.data.stream import StreamLoader, input_units
from imagefm.data.stream_units import InputOptions
from imagefm.train.config import TrainConfig
from imagefm.train.data import (
    check_options,
    int_option,
    micro_batch_size,
    model_tokenizer,
    register_data_source,
)
from imagefm.train.distributed import DistInfo

OPTIONS = ("format", "langs", "shuffle_buffer", "streams", "resampled", "samples_per_epoch",
           "augment", "csv_img_key", "csv_caption_key", "csv_separator", "hf_image_column",
           "hf_text_column", "split", "max_pixels", "held_out")
HELD_OUT_SPLIT = "test"


class Preprocess:
    """The model's evaluation preprocessing as a stream transform (the generator is unused)."""

    def __init__(self, card: Any, max_pixels: int | None = None) -> None:

        if card.resize_mode == "naflex":
            raise ConfigError("data.source=stream gives square images; this model's card is "
                              "NaFlex (patches at the native aspect ratio), which it does not "
                              "support")
        self.processor = ImageProcessor(card, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)

    def __call__(self, image: Any, generator: torch.Generator) -> torch.Tensor:
        return torch.from_numpy(self.processor.preprocess_one(image))


def image_transform(card: Any, augment: dict[str, Any] | None, max_pixels: int | None = None
                    ) -> Any:
    """``TrainTransform(card, AugmentConfig.from_dict(augment))``, or ``Preprocess(card)``."""
    if augment is None:
        return Preprocess(card, max_pixels)

    if not isinstance(augment, dict):
        raise ConfigError(f"data.options.augment must be a mapping of augmentation settings "
                          f"(e.g. {{scale: [0.9, 1.0], hflip_prob: 0.5}}), got {augment!r}")
    aug = AugmentConfig.from_dict(augment, where="data.options.augment")
    return TrainTransform(card, aug, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)


def stream_options(config: TrainConfig) -> dict[str, Any]:
    """``data.options`` checked, with defaults (see the module docstring)."""
    options = dict(config.data.options)
    check_options("the stream source", options, OPTIONS)
    if config.data.path is None:
        raise ConfigError("data.source=stream reads data.path: a shard spec "
                          "(e.g. 'shards/{000000..000099}.tar'), a CSV/TSV file or a HF dataset")
    langs = options.get("langs")
    if isinstance(langs, str):
        langs = [langs]
    if langs is not None and not (isinstance(langs, list) and langs
                                  and all(isinstance(x, str) for x in langs)):
        raise ConfigError(f"data.options.langs must be a language tag or a list of them, got "
                          f"{options.get('langs')!r}")
    for key in ("resampled", "held_out"):
        if not isinstance(options.get(key, False), bool):
            raise ConfigError(f"data.options.{key} must be true or false, got "
                              f"{options[key]!r}")
    try:
        reading = InputOptions(
            format=options.get("format", "auto"), split=options.get("split", "train"),
            csv_img_key=str(options.get("csv_img_key", "filepath")),
            csv_caption_key=str(options.get("csv_caption_key", "title")),
            csv_separator=options.get("csv_separator"),
            hf_image_column=str(options.get("hf_image_column", "image")),
            hf_text_column=str(options.get("hf_text_column", "text")))
    except ConfigError as err:
        raise ConfigError(f"data.options.{err}") from None
    return {
        "langs": langs,
        "shuffle_buffer": int_option(options, "shuffle_buffer", 0, 1000),
        "streams": int_option(options, "streams", 1, None),
        "resampled": options.get("resampled", False),
        "samples_per_epoch": int_option(options, "samples_per_epoch", 1, None),
        "augment": options.get("augment"),
        "max_pixels": int_option(options, "max_pixels", 1, None),
        "held_out": options.get("held_out", False),
        "input": reading,
    }


def stream_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> StreamLoader:
    """``data.source=stream`` (see the module docstring)."""
    if config.task.name == "vlm":
        raise ConfigError("data.source=stream gives image-caption batches for contrastive "
                          "training; a VLM (task.name=vlm) streams its conversations with "
                          "data.source=conversation-stream")
    options = stream_options(config)
    micro_batch_size(config, info)  # an indivisible batch is refused before any reading
    tokenizer = model_tokenizer(model, "stream")
    evaluation = options["held_out"]
    reading = options["input"]
    if evaluation and reading.split is not None:
        reading = dataclasses.replace(reading, split=HELD_OUT_SPLIT)
    try:
        units = input_units(config.data.path, reading)
    except FileNotFoundError as err:
        raise ConfigError(f"data.path: {err}") from None
    transform = image_transform(model.card, None if evaluation else options["augment"],
                                options["max_pixels"])
    return stream_loader(
        config, info, units, options, task="caption", languages=options["langs"],
        transform=transform,
        collate=Collate(tokenizer=tokenizer, lang=options["langs"], seed=config.run.seed))


def stream_loader(config: TrainConfig, info: DistInfo, units: list[Any], options: dict[str, Any],
                  **task_settings: Any) -> StreamLoader:
    """The ``StreamLoader`` of a stream source: this rank's micro-batches of ``units`` with the
    checked ``options`` (:func:`stream_options`); held-out data (``options["held_out"]``) is
    read in order, neither resampled nor cut to an epoch length. ``task_settings`` (task,
    transform, collate, prepare...) are the source's own."""
    evaluation = options["held_out"]
    if config.data.num_workers > 0:
        # Workers fork after the main process tokenised: HF tokenizers would warn and turn
        # their threads off anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return StreamLoader(
        units, batch_size=micro_batch_size(config, info) * info.world_size, rank=info.rank,
        world_size=info.world_size, num_workers=config.data.num_workers,
        streams=options["streams"], seed=config.run.seed, shuffle=not evaluation,
        shuffle_buffer=options["shuffle_buffer"],
        resampled=options["resampled"] and not evaluation,
        samples_per_epoch=None if evaluation else options["samples_per_epoch"],
        max_pixels=options["max_pixels"], log=print if info.is_main else None, **task_settings)


register_data_source("stream", stream_source, held_out_option=True)
