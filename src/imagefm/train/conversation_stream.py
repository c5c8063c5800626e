"""``data.source = conversation-stream``: fine-tune a VLM on conversations of any number, streamed.

    task: {name: vlm}
    data:
      source: conversation-stream
      path: chats.jsonl            # LLaVA / OpenAI conversation JSONL (or .json), or shards
      batch_size: 32               # the global batch of one optimizer step
      num_workers: 4
      options:
        images: photos/            # image paths of conversation files start here (default:
                                   # each file's folder)
        paths: [more.jsonl, "shards/{000000..000099}.tar"]   # more inputs, any of the kinds
        length_group: 1            # >1: sort each G chunks of a stream by length (less padding)
        rows_per_unit: 1000        # a JSONL file is read as units of this many rows
        shuffle_buffer: 1000       # conversations per stream
        streams: 8                 # virtual streams (default: processes x workers)
        resampled: false           # true: units drawn with replacement, endless...
        samples_per_epoch: null    # ...and this sets the epoch's length (required then)
        split: train               # split-named shards (train-*.tar / test-*.tar)
        max_pixels: null           # larger shard images are skipped ("image too large")
        held_out: false            # true: evaluation batches (in order, the test split)

The data is the ``conversations`` source's (:mod:`imagefm.train.conversations`), read as the
contrastive ``stream`` source reads its data: with flat memory, the order, the split over ranks
and workers and the exact resume (``skip_batches``) of :mod:`imagefm.data.stream`, which this
module only feeds. Inputs become units (:mod:`imagefm.data.stream_units`):

- a ``.jsonl`` conversation file (LLaVA and OpenAI entries, mixed as they come): one unit per
  ``rows_per_unit`` rows, each row parsed when it is read (``parse_conversation``), its images
  opened by path then;
- a ``.json`` file (a JSON list): one unit, read whole (refused as a whole before training when
  it breaks the format, as the ``conversations`` source does); convert big ones to JSONL;
- anything else is a shard spec (our layout, as ``imagefm synth vqa`` and ``vlm-records`` read):
  each record's ``conversation`` turns and its image; without an ``<image>`` placeholder the
  image goes at the start of the first user turn, as LLaVA does.

Every record is prepared at check time (``VirtualStreams``' ``prepare`` hook) by the model
family's :class:`~imagefm.train.conversations.Codec`: images decoded, the conversation
tokenised with its labels on the replies. A missing or corrupt image, a conversation too long
for the context or without a reply, a malformed row: skipped and counted, never fatal. The
batch is the codec's :func:`~imagefm.train.conversations.collate` of this rank's
``micro_batch_size`` rows (in the main process: the pixel tensors of some families are made for
a whole batch), so a conversation gives the same ``input_ids``, ``labels`` and pixels as with
the in-memory ``conversations`` source.

Length grouping (``length_group``): per stream, each G chunks of prepared conversations are
sorted by token count and handed out in an order drawn per group, the same for every stream
(see :mod:`imagefm.data.stream`). It holds G chunks of decoded images per stream, so it is off
by default; the in-memory source groups the whole epoch's order instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from imagefm.config import ConfigError
from imagefm.data.conversations import (
    Conversation,
    ConversationFileError,
    parse_conversation,
    read_conversations,
)
from imagefm.data.formats import RecordError, SkipCounter, safe_key
from imagefm.data.records import Record
from imagefm.data.stream import StreamLoader, input_units
from imagefm.data.stream_units import ROWS_PER_UNIT, InputOptions, Unit, jsonl_units
from imagefm.train.config import TrainConfig
from imagefm.train.conversations import Codec, codec_for, collate, conversation_example
from imagefm.train.data import (
    check_options,
    int_option,
    register_data_source,
)
from imagefm.train.distributed import DistInfo
from imagefm.train.stream_data import HELD_OUT_SPLIT, stream_loader, stream_options

# Options the stream source reads and checks (stream_options), and this source's own.
STREAM_OPTIONS = ("shuffle_buffer", "streams", "resampled", "samples_per_epoch", "split",
                  "max_pixels", "held_out")
OPTIONS = ("images", "paths", "length_group", "rows_per_unit", *STREAM_OPTIONS)
SOURCE = "conversation-stream"


@dataclass
class ConversationRecord(Record):
    """A record read from a conversation file: ``chat`` holds the parsed conversation, whose
    images are opened by path when it is prepared."""

    chat: Conversation | None = None


@dataclass(frozen=True)
class ConversationRows:
    """Makes a row of a JSONL conversation file (a LLaVA or OpenAI entry) a record."""

    root: str  # image paths start here

    def to_record(self, row: dict[str, Any], key: str, where: str) -> Record:
        try:
            chat = parse_conversation(row, self.root, where)
        except ConversationFileError as err:
            raise RecordError("bad conversation", str(err)) from None
        return ConversationRecord(key=key, chat=chat)


@dataclass(frozen=True)
class ConversationFileUnit:
    """A ``.json`` conversation file (a JSON list): one unit, read whole."""

    name: str
    root: str

    def records(self, skips: SkipCounter, part: int = 0, parts: int = 1) -> Iterator[Record]:
        try:
            chats = read_conversations(self.name, self.root)
        except (OSError, ConversationFileError) as err:  # it changed since the check
            if part == 0:
                skips.add("unreadable file", f"{self.name}: {err}")
            return
        stem = safe_key(Path(self.name).stem or "row", unique=True)
        for index, chat in enumerate(chats):
            if index % parts == part:
                yield ConversationRecord(key=f"{stem}-{index}", chat=chat)


def record_conversation(record: Record, has_image: bool) -> Conversation:
    """The conversation of a record: parsed from its file, or its ``conversation`` turns (our
    shard layout) with its image, placed as a LLaVA entry's (by ``<image>``, else first)."""
    if isinstance(record, ConversationRecord) and record.chat is not None:
        return record.chat
    if not record.conversation:
        raise RecordError("no conversation", f"{record.key}: no conversation turns")
    entry: dict[str, Any] = {"conversations": [{"from": turn.role, "value": turn.content}
                                               for turn in record.conversation]}
    if has_image:
        entry["image"] = record.key  # a name only: the decoded image is at hand
    try:
        return parse_conversation(entry, ".", record.key)
    except ConversationFileError as err:
        raise RecordError("bad conversation", str(err)) from None


class PrepareConversation:
    """The stream's ``prepare`` hook: a record → ``(Example, images)``, a row of ``collate``;
    ``RecordError`` when it cannot train (counted by reason)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def __call__(self, record: Record, image: Any) -> tuple[Any, list[Any]]:
        conversation = record_conversation(record, image is not None)
        if isinstance(record, ConversationRecord):
            return conversation_example(self.codec, conversation)  # images opened by path
        return conversation_example(self.codec, conversation, [] if image is None else [image])


class CollateConversations:
    """The codec's batch of this rank's prepared items."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(self.codec, [item["image"] for item in items])


def example_length(prepared: tuple[Any, list[Any]]) -> int:
    """Tokens of a prepared conversation (what length grouping sorts by)."""
    return len(prepared[0].input_ids)


def conversation_units(spec: str, *, images: str | None = None, split: str | None = "train",
                       rows_per_unit: int = ROWS_PER_UNIT) -> list[Unit]:
    """The units of one input: a ``.jsonl``/``.json`` conversation file (image paths relative
    to ``images``, default its folder) or a shard spec (see the module docstring)."""
    path = Path(spec).expanduser()
    root = str(Path(images).expanduser() if images is not None else path.parent)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return jsonl_units(path, ConversationRows(root), rows_per_unit)
    if suffix == ".json":
        read_conversations(path, root)  # a broken file is refused now, before any work
        return [ConversationFileUnit(str(path), root)]
    return input_units(spec, InputOptions(format="shards", split=split))


def _paths(options: dict[str, Any]) -> list[str]:
    paths = options.get("paths", [])
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"data.options.paths must be a list of conversation files or shard "
                          f"specs, got {paths!r}")
    return paths


def conversation_stream_source(config: TrainConfig, model: nn.Module, info: DistInfo
                               ) -> StreamLoader:
    """``data.source = conversation-stream`` (see the module docstring)."""
    options = dict(config.data.options)
    check_options(SOURCE, options, OPTIONS)
    if config.data.path is None:
        raise ConfigError(f"data.source = {SOURCE} reads data.path: a .jsonl conversation file "
                          f"(LLaVA or OpenAI entries) or a shard spec of conversation records")
    stream = stream_options(dataclasses.replace(config, data=dataclasses.replace(
        config.data, options={k: v for k, v in options.items() if k in STREAM_OPTIONS})))
    evaluation = stream["held_out"]
    split = stream["input"].split
    if evaluation and split is not None:
        split = HELD_OUT_SPLIT
    # Held-out batches read eval.data alone: the extra paths are training inputs.
    paths = [config.data.path] + ([] if evaluation else _paths(options))
    images = options.get("images")
    if images is not None and not isinstance(images, str):
        raise ConfigError(f"data.options.images must be a folder, got {images!r}")
    rows_per_unit = int_option(options, "rows_per_unit", 1, ROWS_PER_UNIT)
    length_group = int_option(options, "length_group", 1, 1)
    units: list[Unit] = []
    for path in paths:
        try:
            units += conversation_units(path, images=images, split=split,
                                        rows_per_unit=rows_per_unit)
        except FileNotFoundError as err:
            raise ConfigError(f"data.path: {err}") from None
    codec = codec_for(model, SOURCE)
    return stream_loader(
        config, info, units, stream, task="any", prepare=PrepareConversation(codec),
        length=example_length, length_group=1 if evaluation else length_group,
        collate=CollateConversations(codec))


register_data_source(SOURCE, conversation_stream_source, held_out_option=True)
