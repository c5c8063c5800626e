"""Streaming training data: shards → checked, decoded samples → batches.

``ShardDataset`` is an ``IterableDataset`` over tar shards. Shards are split between distributed
ranks and ``DataLoader`` workers (by shard when there are enough of them, else by sample), the
order is shuffled deterministically from ``(seed, epoch)`` (shard order plus a shuffle buffer), and
every sample is checked: a bad one is skipped and counted by reason, never fatal. Workers ship
their skip counts along with their samples; ``ReportingLoader`` adds them up and prints one line
at the end of a pass, e.g. ``skipped 3 of 1000: 2 corrupt image, 1 empty caption``.

``Collate`` builds the batch: pixel values from an ``ImageProcessor`` (the model card), one caption
per image (by language if asked, deterministic by seed), tokenised.

``check_record`` (clean, check and decode one record) and ``buffer_shuffle`` are shared with
``imagefm.data.stream``, the training stream: batches identical over any number of ranks and
workers, and an exact, fast resume (``skip_batches``), which ``ShardDataset`` does not give.
"""

from __future__ import annotations

import os
import random
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imagefm.data.formats import RecordError, SkipCounter, expand_shard_spec, read_shard
from imagefm.data.records import Caption, Record

__all__ = ["Collate", "ReportingLoader", "ShardDataset", "SkipCounter", "buffer_shuffle",
           "check_record", "clean_record", "image_skip_reason", "make_loader"]

TASKS = ("caption", "label", "conversation", "any")
SKIPS_KEY = "skip_counts"  # where a sample or batch carries its worker's skip counts
_END_OF_STREAM = "__skips_only__"


def image_skip_reason(reason: str) -> str:
    """A counting category for an ``ImageDecodeError.reason`` (which holds sizes and names)."""
    if reason.startswith("empty"):
        return "empty image"
    if "decompression bomb" in reason:
        return "image too large"
    return "corrupt image"


def _clean_text(text: str) -> str:
    # NFC so that decomposed Hangul (NFD, as macOS file names give) matches composed text.
    return unicodedata.normalize("NFC", text).strip()


def clean_record(record: Record, task: str = "caption",
                 languages: Iterable[str] | None = None) -> Record:
    """Normalise a record's text in place and check it is usable for ``task``.

    Captions are NFC-normalised and stripped; empty ones are dropped, as are those not in
    ``languages`` (when given). Raises ``RecordError`` when nothing usable remains for the task:
    ``caption`` needs a caption, ``label`` a label, ``conversation`` turns; ``any`` needs nothing.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    wanted = set(languages) if languages is not None else None
    captions = [Caption(_clean_text(c.text), c.lang) for c in record.captions]
    had_text = any(c.text for c in captions)
    captions = [c for c in captions if c.text]
    if wanted is not None:
        captions = [c for c in captions if c.lang in wanted]
    record.captions = captions
    if record.label_name is not None:
        record.label_name = _clean_text(record.label_name)
    if task == "caption" and not captions:
        if had_text:
            raise RecordError("no caption in requested language",
                              f"{record.key}: no caption in {sorted(wanted or [])}")
        raise RecordError("empty caption", f"{record.key}: no non-empty caption")
    if task == "label" and record.label is None:
        raise RecordError("no label", f"{record.key}: no label")
    if task == "conversation" and not record.conversation:
        raise RecordError("no conversation", f"{record.key}: no conversation turns")
    return record


def check_record(record: Record, task: str = "caption", languages: Iterable[str] | None = None,
                 *, decode: bool = True, max_pixels: int | None = None) -> Any:
    """Clean and check one record for ``task`` (``clean_record``) and decode its image: the
    PIL RGB image (None without ``decode`` or when the task needs no image). Anything unusable
    raises ``RecordError`` whose ``reason`` is the skip category (``corrupt image``...)."""
    from imagefm.data.image import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image

    clean_record(record, task, languages)
    if record.image is None and task in ("caption", "label"):
        raise RecordError("no image", f"{record.key}: sample has no image")
    if not decode or record.image is None:
        return None
    try:
        return open_image(record.image, name=f"{record.key}.{record.image_ext}",
                          max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    except ImageDecodeError as err:
        raise RecordError(image_skip_reason(err.reason), str(err)) from err


def buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """``items`` shuffled through a buffer of ``size``: each new item takes the place of a
    random one, which goes out; the rest leaves shuffled at the end. Memory: ``size`` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(IterableDataset):
    """Records from WebDataset shards, decoded and checked, as dicts for ``Collate``.

    Each item is ``{"key", "image" (PIL RGB or None when decode=False), "record", "epoch"}``.
    Call ``set_epoch(n)`` before each pass for a new, reproducible order. With ``shuffle`` the
    shard order is permuted from ``(seed, epoch)`` and samples go through a ``shuffle_buffer``.
    ``split`` keeps only shards named ``{split}-*.tar`` (as recipes write them).
    """

    def __init__(self, shards: str | Path | Iterable[str | Path], *, split: str | None = None,
                 task: str = "caption",
                 languages: Iterable[str] | None = None, shuffle: bool = False,
                 shuffle_buffer: int = 1000, seed: int = 0, decode: bool = True,
                 max_pixels: int | None = None, rank: int | None = None,
                 world_size: int | None = None) -> None:
        super().__init__()
        # Recipes name shards by split (train-000000.tar, test-000000.tar): reading a whole
        # dataset folder for training must not pull in the held-out test shards.
        self.shards = expand_shard_spec(shards, split)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        self.languages = tuple(languages) if languages is not None else None
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.seed = seed
        self.epoch = 0
        self.decode = decode
        self.max_pixels = max_pixels
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- which samples this process reads ------------------------------------------------------

    def _consumer(self) -> tuple[int, int]:
        """(index, count) of this reader among all ranks x workers."""
        rank, world = _dist_rank_world()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def _shard_order(self) -> list[str]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(shards)
        return shards

    def _assigned(self) -> Iterator[tuple[str, int | None]]:
        """(shard, sample stride) pairs: whole shards when there are enough, else every n-th."""
        index, count = self._consumer()
        shards = self._shard_order()
        if len(shards) >= count:
            # Whole shards per reader. Unequal shard counts mean unequal lengths per rank;
            # training loops must not assume every rank sees the same number of batches.
            for shard in shards[index::count]:
                yield shard, None
        else:
            for shard in shards:
                yield shard, index

    def _raw_records(self, skips: SkipCounter) -> Iterator[Record]:
        _, count = self._consumer()
        for shard, keep in self._assigned():
            if keep is None:
                yield from read_shard(shard, skips)
            else:  # every count-th sample of the shard
                yield from read_shard(shard, skips, part=keep, parts=count)

    def _shuffled(self, records: Iterator[Any]) -> Iterator[Any]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from records
            return
        index, _ = self._consumer()
        yield from buffer_shuffle(records, self.shuffle_buffer,
                                  random.Random(f"buffer:{self.seed}:{self.epoch}:{index}"))

    def _prepare(self, record: Record, skips: SkipCounter) -> dict[str, Any] | None:
        try:
            image = check_record(record, self.task, self.languages, decode=self.decode,
                                 max_pixels=self.max_pixels)
        except RecordError as err:
            skips.add(err.reason, str(err))
            return None
        skips.ok()
        return {"key": record.key, "image": image, "record": record, "epoch": self.epoch}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skips = SkipCounter()
        # Shuffle records before decoding so the buffer holds bytes, not decoded images.
        for record in self._shuffled(self._raw_records(skips)):
            item = self._prepare(record, skips)
            if item is not None:
                item[SKIPS_KEY] = skips.take()
                yield item
        # Skips after the last good sample would be lost; ship them in a marker item.
        if skips.seen:
            yield {_END_OF_STREAM: True, SKIPS_KEY: skips.take()}


def _pick_caption(record: Record, lang: str | Iterable[str] | None, seed: int,
                  epoch: int) -> Caption | None:
    captions = record.captions
    if lang is not None:
        langs = {lang} if isinstance(lang, str) else set(lang)
        preferred = [c for c in captions if c.lang in langs]
        captions = preferred or captions
    if not captions:
        return None
    # Seeded by (seed, epoch, key): the same caption every run, another one next epoch.
    rng = random.Random(zlib.crc32(f"{seed}:{epoch}:{record.key}".encode()))
    return captions[rng.randrange(len(captions))]


class Collate:
    """Items from ``ShardDataset`` or ``imagefm.data.stream`` → a batch dict.

    Keys: ``pixel_values`` (when an image processor is given, or stacked when the items' images
    are already tensors, as a stream's per-sample transform makes them), ``input_ids`` and
    ``attention_mask`` (when a tokenizer is given), ``labels`` (class index, -1 when unknown),
    ``captions``/``langs``/``keys`` (the chosen text, for logging), ``skip_counts``.
    One caption per image: among those in ``lang`` when it has some, chosen by ``(seed, epoch,
    key)``. ``lang`` may be one tag or several.
    """

    def __init__(self, image_processor: Callable[[list[Any]], torch.Tensor] | None = None,
                 tokenizer: Callable[[list[str]], dict[str, Any]] | None = None, *,
                 lang: str | Iterable[str] | None = None, seed: int = 0) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.lang = lang if lang is None or isinstance(lang, str) else tuple(lang)
        self.seed = seed

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        skips = SkipCounter()
        for item in items:
            skips.merge(item.get(SKIPS_KEY, {}))
        items = [item for item in items if not item.get(_END_OF_STREAM)]
        batch: dict[str, Any] = {SKIPS_KEY: skips.as_dict()}
        if not items:
            return batch
        records = [item["record"] for item in items]
        batch["keys"] = [r.key for r in records]
        batch["labels"] = torch.tensor([-1 if r.label is None else r.label for r in records])
        if self.image_processor is not None:
            missing = [item["key"] for item in items if item["image"] is None]
            if missing:
                raise ValueError(f"Collate got samples without a decoded image ({missing[:3]}); "
                                 "use ShardDataset(decode=True) and a task that needs images")
            batch["pixel_values"] = self.image_processor([item["image"] for item in items])
        elif all(torch.is_tensor(item.get("image")) for item in items):
            # Images already turned into tensors per sample (a stream's transform): stack them.
            batch["pixel_values"] = torch.stack([item["image"] for item in items])
        chosen = [_pick_caption(r, self.lang, self.seed, item.get("epoch", 0))
                  for r, item in zip(records, items, strict=True)]
        batch["captions"] = [c.text if c is not None else "" for c in chosen]
        batch["langs"] = [c.lang if c is not None else "" for c in chosen]
        if self.tokenizer is not None:
            encoded = self.tokenizer(batch["captions"])
            for name in ("input_ids", "attention_mask"):
                value = encoded[name]
                batch[name] = value if torch.is_tensor(value) else torch.tensor(value)
        return batch


class ReportingLoader:
    """Wraps a ``DataLoader`` whose batches carry ``skip_counts``: adds them up, hides them.

    At the end of each full pass the summary line is printed (``log``) when anything was skipped
    or always with ``verbose``; ``skips`` holds the running totals.
    """

    def __init__(self, loader: Iterable[dict[str, Any]], log: Callable[[str], None] | None = print,
                 verbose: bool = False) -> None:
        self.loader = loader
        self.skips = SkipCounter()
        self.log = log
        self.verbose = verbose

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.skips.merge(batch.pop(SKIPS_KEY, {}))
            if batch:  # a batch of only end-of-stream markers holds nothing but skip counts
                yield batch
        if self.log is not None and (self.skips.total_skipped or self.verbose):
            self.log(self.skips.report())

    def set_epoch(self, epoch: int) -> None:
        dataset = getattr(self.loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)


def make_loader(shards: str | Path | Iterable[str | Path], *, batch_size: int,
                collate: Collate | None = None, num_workers: int = 0,
                log: Callable[[str], None] | None = print, **dataset_options: Any
                ) -> ReportingLoader:
    """A ``ReportingLoader`` over ``ShardDataset(shards, **dataset_options)``."""
    dataset = ShardDataset(shards, **dataset_options)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate or Collate(),
                        num_workers=num_workers, persistent_workers=False)
    return ReportingLoader(loader, log=log)
