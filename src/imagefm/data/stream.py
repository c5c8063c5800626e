"""Deterministic streaming of training data at any scale: units → virtual streams → batches.

    loader = StreamLoader(input_units("data/{00000..01023}.tar"), batch_size=1024,
                          rank=rank, world_size=world, num_workers=4, seed=0,
                          transform=TrainTransform(card, aug), collate=Collate(tokenizer=tok))
    for batch in loader(epoch): ...          # this rank's rows of global batch 0, 1, 2...
    resumed = loader(epoch); resumed.skip_batches(n)   # starts exactly at batch n

The data of an epoch is read as ``S`` VIRTUAL STREAMS (``streams``; by default one per
process x worker). The units of the input (shards, row ranges: ``imagefm.data.stream_units``)
are permuted from ``(seed, epoch)`` and stream ``s`` reads ``units[s::S]`` (with fewer units
than streams, each unit is shared: stream ``s`` keeps every m-th of its samples). Records go
through a shuffle buffer seeded ``(seed, epoch, s)`` that holds encoded bytes; after it each
record is checked and decoded (a corrupt image, an empty caption, bad JSON... is skipped and
counted by reason, never fatal). A stream's GOOD items are numbered from 0 (its positions).

Global batch ``k`` is the concatenation, in stream order, of chunk ``k`` (``batch_size / S``
items) of every stream. Rank ``r`` of ``W`` with ``K`` DataLoader workers reads the contiguous
block of streams of consumer ``r * K + w`` (``S`` must be a multiple of ``W * K``); a worker
decodes and runs the per-sample ``transform(image, generator)``, the generator seeded from
``(seed, epoch, stream, position)``; the main process joins the ``K`` workers' parts of a batch in
stream order and applies ``collate``. So the batches depend on ``S`` and the seed only: one
process with ``S = 2``, two ranks and one process with two workers see the same global batches,
sample for sample. An epoch ends when any of this rank's streams cannot fill its chunk (ranks
agree through the Trainer); with ``resampled`` every stream draws units with replacement
(seeded per stream), endlessly, and ``samples_per_epoch`` sets the epoch's length.

``skip_batches(n)`` (fast, exact resume): each stream drops its first ``n`` chunks of good
items without transform or collate, still reading and checking them, so the skip counts and
the positions are those of an uninterrupted pass. Memory is flat in the dataset size: units
are read one at a time and only the shuffle buffers (of encoded records) are held.

Tasks whose samples are more than an image (a tokenised conversation: the VLM stream,
``imagefm.train.conversation_stream``) give a ``prepare(record, image)`` hook: it runs at check
time, in the workers, on every record that passes ``check_record`` (skipped batches too: whether
an item is good decides the positions), and returns what the item carries instead of the bare
image, or raises ``RecordError`` to skip the record (counted by its reason). With ``length`` (the
size of a prepared item) and ``length_group = G``, each stream sorts every ``G`` chunks of its
good items by length, longest first, and hands those chunks out in an order drawn from
``(seed, epoch, group)``: the same for every stream, so the chunks joined into one batch come
from the same place in their groups and have similar lengths (less padding). Grouping holds
``G`` chunks of prepared items per stream in memory.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import count, islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imagefm.config import ConfigError
from imagefm.data.formats import RecordError, SkipCounter
from imagefm.data.loader import (
    SKIPS_KEY,
    TASKS,
    Collate,
    ReportingLoader,
    buffer_shuffle,
    check_record,
)
from imagefm.data.records import Record
from imagefm.data.shards import expand_shard_spec, is_remote
from imagefm.data.stream_hf import hf_units, metadata_file, saved_dataset
from imagefm.data.stream_units import (
    TABLE_SUFFIXES,
    InputOptions,
    ShardUnit,
    Unit,
    text_table_units,
)

__all__ = ["StreamLoader", "EpochLoader", "VirtualStreams", "derive_seed"]

Transform = Callable[[Any, torch.Generator], Any]
Prepare = Callable[[Record, Any], Any]  # (record, decoded image or None) -> the item's payload
_IDLE_DRAWS = 64  # resampled: unit draws in a row without a good sample before a stream stops


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any values (the same in every process and Python run)."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class VirtualStreams:
    """Which units each stream reads in an epoch and how its records come out (picklable: it
    travels to DataLoader workers)."""

    def __init__(self, units: Sequence[Unit], *, streams: int, chunk: int, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 max_batches: int | None = None, task: str = "caption",
                 languages: Iterable[str] | None = None, max_pixels: int | None = None,
                 prepare: Prepare | None = None, length: Callable[[Any], int] | None = None,
                 length_group: int = 1) -> None:
        if not units:
            raise ConfigError("the stream has no input units (no shards or rows found)")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.units = list(units)
        self.streams, self.chunk, self.seed = streams, chunk, seed
        self.shuffle, self.shuffle_buffer = shuffle, max(1, shuffle_buffer)
        self.resampled, self.max_batches = resampled, max_batches
        self.task, self.max_pixels = task, max_pixels
        self.languages = tuple(languages) if languages is not None else None
        if length_group < 1:
            raise ConfigError(f"length_group must be >= 1 (1: no length grouping), got "
                              f"{length_group}")
        self.prepare, self.length, self.length_group = prepare, length, length_group

    def assignment(self, epoch: int, stream: int) -> list[tuple[Unit, int, int]]:
        """(unit, part, parts) read by ``stream`` this epoch, in order (not resampled)."""
        order = list(range(len(self.units)))
        if self.shuffle:
            random.Random(f"units:{self.seed}:{epoch}").shuffle(order)
        # Fewer units than streams: each unit is read as `parts` interleaved parts, as many
        # as make the pieces share out evenly (lcm(units, streams) pieces in all).
        parts = self.streams // math.gcd(len(order), self.streams) if len(order) < self.streams \
            else 1
        pieces = [(self.units[i], p, parts) for i in order for p in range(parts)]
        return pieces[stream::self.streams]

    def records(self, epoch: int, stream: int, skips: SkipCounter) -> Iterator[Record]:
        """The stream's records, shuffled (encoded images: the buffer holds bytes)."""
        if self.resampled:
            raw = self._resampled(epoch, stream, skips)
        else:
            raw = (record for unit, part, parts in self.assignment(epoch, stream)
                   for record in unit.records(skips, part, parts))
        if not self.shuffle or self.shuffle_buffer <= 1:
            return raw
        return buffer_shuffle(raw, self.shuffle_buffer,
                              random.Random(f"buffer:{self.seed}:{epoch}:{stream}"))

    def _resampled(self, epoch: int, stream: int, skips: SkipCounter) -> Iterator[Record]:
        rng = random.Random(f"resample:{self.seed}:{epoch}:{stream}")
        idle = 0
        while idle < max(_IDLE_DRAWS, 2 * len(self.units)):  # all units empty: stop, not spin
            idle += 1
            for record in self.units[rng.randrange(len(self.units))].records(skips):
                idle = 0
                yield record

    def items(self, epoch: int, stream: int, skips: SkipCounter
              ) -> Iterator[tuple[int, Record, Any]]:
        """(position, record, decoded image or what ``prepare`` made of it) of the stream's good
        items; bad ones counted."""
        position = 0
        for record in self.records(epoch, stream, skips):
            try:
                image = check_record(record, self.task, self.languages,
                                     max_pixels=self.max_pixels)
                if self.prepare is not None:
                    image = self.prepare(record, image)
            except RecordError as err:
                skips.add(err.reason, str(err))
                continue
            skips.ok()
            yield position, record, image
            position += 1

    def grouped(self, epoch: int, items: Iterator[tuple[int, Record, Any]]
                ) -> Iterator[tuple[int, Record, Any]]:
        """``items`` length-grouped (see the module docstring); as they are without
        ``length`` or with ``length_group = 1``."""
        if self.length is None or self.length_group <= 1:
            yield from items
            return
        length, span = self.length, self.chunk * self.length_group
        for group in count():
            block = list(islice(items, span))
            # Longest first (a stable sort: ties keep the stream's order); a last short block
            # gives its full chunks only, as the stream would without grouping.
            block.sort(key=lambda item: -length(item[2]))
            chunks = [block[i:i + self.chunk]
                      for i in range(0, len(block) - self.chunk + 1, self.chunk)]
            random.Random(f"lengths:{self.seed}:{epoch}:{group}").shuffle(chunks)
            for chunk in chunks:
                yield from chunk
            if len(block) < span:
                return

    def parts(self, epoch: int, streams: range, skip: int = 0,
              transform: Transform | None = None) -> Iterator[dict[str, Any]]:
        """One consumer's share of each batch from ``skip`` on: ``{"batch", "items",
        skip counts}`` (its streams' chunks in stream order), then ``{"end": True, ...}``."""
        skips = SkipCounter()
        readers = [self.grouped(epoch, self.items(epoch, s, skips)) for s in streams]
        batch = 0
        while self.max_batches is None or batch < self.max_batches:
            items = []
            for stream, reader in zip(streams, readers, strict=True):
                chunk = list(islice(reader, self.chunk))
                if len(chunk) < self.chunk:  # this stream is dry: the epoch ends here
                    yield {"end": True, "batch": batch, SKIPS_KEY: skips.take()}
                    return
                if batch >= skip:
                    items += [self._finish(epoch, stream, *item, transform) for item in chunk]
            if batch >= skip:
                yield {"end": False, "batch": batch, "items": items, SKIPS_KEY: skips.take()}
            batch += 1
        yield {"end": True, "batch": batch, SKIPS_KEY: skips.take()}

    def _finish(self, epoch: int, stream: int, position: int, record: Record, image: Any,
                transform: Transform | None) -> dict[str, Any]:
        if transform is not None:  # on a decoded, checked image: a failure is a bug, it raises
            generator = torch.Generator().manual_seed(
                derive_seed(self.seed, epoch, stream, position))
            image = transform(image, generator)
        # The encoded bytes are done with: they need not travel back from the worker.
        record.image = record.mask = None
        return {"key": record.key, "record": record, "image": image, "epoch": epoch,
                "stream": stream, "position": position}


class _ConsumerParts(IterableDataset):
    """What one DataLoader worker reads: the parts of its consumer (rank * K + worker)."""

    def __init__(self, plan: VirtualStreams, epoch: int, rank: int, world_size: int, skip: int,
                 transform: Transform | None) -> None:
        super().__init__()
        self.plan, self.epoch, self.rank, self.world_size = plan, epoch, rank, world_size
        self.skip, self.transform = skip, transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for part in self.plan.parts(self.epoch, consumer_streams(
                self.plan.streams, self.rank * workers + worker, self.world_size * workers),
                self.skip, self.transform):
            yield {**part, "worker": worker}


def consumer_streams(streams: int, consumer: int, consumers: int) -> range:
    """The contiguous block of streams that ``consumer`` of ``consumers`` reads."""
    per = streams // consumers
    return range(consumer * per, (consumer + 1) * per)


def _as_is(part: dict[str, Any]) -> dict[str, Any]:
    return part


class StreamLoader:
    """``make_loader(epoch)`` over virtual streams of ``units`` (see the module docstring).

    ``batch_size`` is the GLOBAL batch of one loader step (all ranks); each rank yields
    ``batch_size / world_size`` rows. ``streams`` defaults to ``world_size * max(num_workers, 1)``
    and must be a multiple of it and divide ``batch_size``. ``transform(image, generator)`` runs
    per sample in the workers (default: the PIL image as is), ``collate(items)`` on this rank's
    items of a batch in the main process (default ``Collate()``: keys, labels, captions).
    ``prepare``, ``length`` and ``length_group``: see the module docstring.
    """

    def __init__(self, units: Sequence[Unit], *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, streams: int | None = None,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 resampled: bool = False, samples_per_epoch: int | None = None,
                 task: str = "caption", languages: Iterable[str] | None = None,
                 max_pixels: int | None = None, transform: Transform | None = None,
                 collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
                 prepare: Prepare | None = None, length: Callable[[Any], int] | None = None,
                 length_group: int = 1, log: Callable[[str], None] | None = print) -> None:
        consumers = world_size * max(num_workers, 1)
        streams = consumers if streams is None else streams
        if streams < 1 or streams % consumers:
            raise ConfigError(f"streams = {streams} must be a multiple of processes x loader "
                              f"workers = {world_size} x {max(num_workers, 1)} (data.options."
                              f"streams, data.num_workers)")
        if batch_size % streams:
            raise ConfigError(f"the global batch ({batch_size} rows per loader step) must be "
                              f"divisible by streams = {streams}: each stream gives an equal "
                              f"chunk of every batch (data.options.streams)")
        if resampled and not samples_per_epoch:
            raise ConfigError("resampled streams never end: set samples_per_epoch "
                              "(data.options.samples_per_epoch)")
        max_batches = None
        if samples_per_epoch:
            max_batches = samples_per_epoch // batch_size
            if max_batches < 1:
                raise ConfigError(f"samples_per_epoch = {samples_per_epoch} is less than one "
                                  f"batch of {batch_size}")
        self.plan = VirtualStreams(units, streams=streams, chunk=batch_size // streams,
                                   seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                                   resampled=resampled, max_batches=max_batches, task=task,
                                   languages=languages, max_pixels=max_pixels,
                                   prepare=prepare, length=length, length_group=length_group)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.transform = num_workers, transform
        self.collate = collate if collate is not None else Collate()
        self.log = log

    @property
    def streams(self) -> int:
        return self.plan.streams

    def __call__(self, epoch: int) -> EpochLoader:
        return EpochLoader(self, epoch)


class EpochLoader:
    """This rank's batches of one epoch; ``skip_batches(n)`` before iterating starts at batch
    ``n``. Skip counts add up in ``skips`` (a line is logged at the end of a pass)."""

    def __init__(self, owner: StreamLoader, epoch: int) -> None:
        self.owner, self.epoch, self.skip = owner, epoch, 0
        self._reporting = ReportingLoader(_Pass(self), log=owner.log)

    def skip_batches(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"skip_batches takes n >= 0, got {n}")
        self.skip = n

    @property
    def skips(self) -> SkipCounter:
        return self._reporting.skips

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._reporting)

    def batches(self) -> Iterator[dict[str, Any]]:
        """Collated batches, each with its skip counts under ``SKIPS_KEY`` (then a last dict of
        skip counts only); ``__iter__`` adds these up and hides them."""
        owner, plan = self.owner, self.owner.plan
        workers = max(owner.num_workers, 1)
        if owner.num_workers == 0:
            source: Iterable[dict[str, Any]] = (
                {**part, "worker": 0} for part in plan.parts(
                    self.epoch, consumer_streams(plan.streams, owner.rank, owner.world_size),
                    self.skip, owner.transform))
        else:
            source = DataLoader(
                _ConsumerParts(plan, self.epoch, owner.rank, owner.world_size, self.skip,
                               owner.transform),
                batch_size=None, num_workers=owner.num_workers, collate_fn=_as_is)
        parts = iter(source)
        batch = self.skip
        while True:
            # The DataLoader hands out its workers' items in turn: worker 0's part of a batch,
            # worker 1's... Every worker ends with an end marker, so the first marker to come
            # falls in a full round and the rounds before it stay aligned.
            group = list(islice(parts, workers))
            skips = SkipCounter()
            for part in group:
                skips.merge(part[SKIPS_KEY])
            if len(group) < workers or any(part["end"] for part in group):
                yield {SKIPS_KEY: skips.as_dict()}
                return
            if [(p["worker"], p["batch"]) for p in group] != [(w, batch) for w in range(workers)]:
                raise RuntimeError(f"stream parts out of order at batch {batch}: "
                                   f"{[(p['worker'], p['batch']) for p in group]}")
            out = owner.collate([item for part in group for item in part["items"]])
            out[SKIPS_KEY] = skips.as_dict()
            yield out
            batch += 1


class _Pass:
    """A re-iterable view of one epoch loader's batches (for ReportingLoader)."""

    def __init__(self, loader: EpochLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.loader.batches()


# --- inputs -> units ------------------------------------------------------------------------------

def input_units(spec: str | Path, options: InputOptions | None = None) -> list[Unit]:
    """The units of one input: a shard spec, a CSV/TSV/JSONL file or a HF dataset (see above)."""
    options = options or InputOptions()
    fmt = options.format if options.format != "auto" else detect_format(str(spec))
    if fmt == "shards":
        return [ShardUnit(url, options.lang) for url in expand_shard_spec(spec, options.split)]
    if fmt == "csv":
        path = Path(spec)
        return text_table_units(path, options.csv_img_key, options.csv_caption_key,
                                options.csv_separator, options, base=path.parent)
    return hf_units(Path(spec), options)


def detect_format(spec: str) -> str:
    """``shards``, ``csv`` or ``hf`` from what ``spec`` names."""
    if "::" in spec or is_remote(spec) or "{" in spec:
        return "shards"
    path = Path(spec).expanduser()
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "csv"
    if path.suffix.lower() == ".parquet":
        return "hf"
    if path.is_dir():
        if saved_dataset(path) or metadata_file(path, None) is not None or (
                any(path.rglob("*.parquet")) and not any(path.rglob("*.tar"))):
            return "hf"
        splits = [d for d in path.iterdir() if d.is_dir() and metadata_file(d, None)]
        if splits:
            return "hf"
    return "shards"
