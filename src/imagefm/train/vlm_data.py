"""VLM training batches: synthetic bilingual conversations, or conversations from real records.

``data.source = vlm-synthetic`` draws scenes from the synthetic engine and turns each into a
conversation the model's processor tokenises (labels on the replies only):

- ``kind: captions`` (the ``align`` stage): "Describe the image." → a caption;
- ``kind: vqa``: up to ``qa_per_image`` questions and short answers about the scene;
- ``kind: mixed`` (the ``sft`` stage): captions and VQA alternating.

``data.source = vlm-records`` reads records instead: WebDataset shards (e.g. a recipe's output:
``imagefm data prepare tuxpaint``) or a LLaVA conversation JSON, from ``data.path`` and
``data.options.paths``. Records with a conversation use it; others become caption requests in
each of their languages in turn.

Half the conversations are in English and half in Korean (``langs``). Scene ``index`` ``i`` of
epoch ``e`` is sample ``e * examples_per_epoch + i`` of the synthetic dataset, so batches are
deterministic given the epoch (exact resume) and ranks slice one global batch. A conversation
too long for the model's context is skipped and counted, never truncated through an image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch import nn

from imagefm.config import ConfigError, check_choice
from imagefm.data.records import IMAGE_TOKEN, Record
from imagefm.train.config import TrainConfig
from imagefm.train.data import (
    LoaderFactory,
    check_options,
    micro_batch_size,
    register_data_source,
)
from imagefm.train.distributed import DistInfo
from imagefm.vlm_processor import ConversationTooLong, VLMProcessor

KINDS = ("captions", "vqa", "mixed")
DESCRIBE = {"en": "Describe the image.", "ko": "이 그림을 설명해 주세요."}
OPTIONS = ("kind", "langs", "qa_per_image", "style", "examples_per_epoch", "seed")


def record_messages(record: Record, kind: str, lang: str) -> list[dict[str, str]]:
    """The conversation of ``record`` for ``kind``: its caption in ``lang`` as the reply to a
    request for a description, or its own VQA turns."""
    if kind == "vqa":
        return [{"role": t.role, "content": t.content} for t in record.conversation]
    captions = record.captions_in(lang)
    if not captions:
        raise ValueError(f"record {record.key} has no {lang} caption")
    return [{"role": "user", "content": f"<image>\n{DESCRIBE[lang]}"},
            {"role": "assistant", "content": captions[0]}]


def rank_rows(source: Any, epoch: int) -> Iterator[list]:
    """This rank's rows of each global batch of an epoch of generated conversations.

    ``source`` has ``example(index)``, ``examples_per_epoch``, ``batch_size`` (global), ``rank``,
    ``world_size`` and a ``skipped`` counter. Examples ``epoch * examples_per_epoch`` onwards
    fill global batches in order; one too long for the context is skipped and counted (every
    rank skips the same ones, so the ranks stay aligned); a last, partial batch is dropped.
    """
    local = source.batch_size // source.world_size
    index = epoch * source.examples_per_epoch
    end = index + source.examples_per_epoch
    while index + source.batch_size <= end:
        rows = []
        while len(rows) < source.batch_size and index < end:
            try:
                rows.append(source.example(index))
            except ConversationTooLong:
                source.skipped += 1
            index += 1
        mine = rows[source.rank * local:(source.rank + 1) * local]
        if len(mine) < local:
            return
        yield mine


class SyntheticConversations:
    """Deterministic batches of synthetic conversations (see the module docstring)."""

    def __init__(self, processor: VLMProcessor, *, batch_size: int, kind: str = "mixed",
                 langs: Sequence[str] = ("en", "ko"), qa_per_image: int = 3,
                 style: dict[str, Any] | None = None, examples_per_epoch: int = 100_000,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        check_choice("data.options.kind", kind, KINDS)
        unknown = sorted(set(langs) - set(DESCRIBE))
        if unknown or not langs:
            raise ConfigError(f"data.options.langs = {list(langs)}: choose from "
                              f"{', '.join(DESCRIBE)}")
        self.processor, self.kind, self.langs = processor, kind, tuple(langs)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.examples_per_epoch, self.seed = examples_per_epoch, seed
        self.record_options = {"qa_per_image": qa_per_image, "style": style, "langs": self.langs}
        self.skipped = 0
        from imagefm.data.synthetic.generator import check_request

        check_request("vqa", seed, processor.card.image_size, "train", self.record_options)

    def example(self, index: int) -> tuple[Any, np.ndarray]:
        """The tokenised conversation and the image of sample ``index``."""
        from imagefm.data.image import open_image
        from imagefm.data.synthetic.generator import make_record

        record = make_record("vqa", index, seed=self.seed,
                             image_size=self.processor.card.image_size, split="train",
                             **self.record_options)
        kind = self.kind if self.kind != "mixed" else ("captions", "vqa")[index % 2]
        lang = self.langs[(index // 2) % len(self.langs)]
        if kind == "vqa":
            lang = record.meta["lang"]
        example = self.processor.training_example(record_messages(record, kind, lang))
        return example, np.asarray(open_image(record.image))

    def __call__(self, epoch: int) -> Iterator[dict]:
        for mine in rank_rows(self, epoch):
            yield self.processor.collate([e for e, _ in mine], images=[i for _, i in mine])


def vlm_synthetic_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> LoaderFactory:
    """``data.source = vlm-synthetic`` (options: see OPTIONS). Families other than the
    LLaVA-style VLM read the scenes at their own sizes (:mod:`imagefm.train.vlm_native`)."""
    if getattr(model, "architecture", None) != "vlm":
        from imagefm.train.vlm_native import native_synthetic_source

        return native_synthetic_source(config, model, info)
    check_options("vlm-synthetic", config.data.options, OPTIONS)
    micro_rows = micro_batch_size(config, info) * info.world_size  # all ranks
    options = dict(config.data.options)
    options.setdefault("seed", config.run.seed)
    return SyntheticConversations(VLMProcessor.for_model(model),
                                  batch_size=micro_rows, rank=info.rank,
                                  world_size=info.world_size, **options)


register_data_source("vlm-synthetic", vlm_synthetic_source)


class RecordConversations:
    """Batches of conversations from records, shuffled per epoch by (seed, epoch)."""

    def __init__(self, processor: VLMProcessor, records: Sequence[Record], *, batch_size: int,
                 langs: Sequence[str] = ("en", "ko"), seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.processor, self.langs, self.seed = processor, tuple(langs), seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        # One entry per (record, language) a caption exists in; conversations count once.
        self.items: list[tuple[Record, str]] = []
        for record in records:
            if record.image is None:
                continue
            if record.conversation:
                self.items.append((record, "conversation"))
            else:
                self.items += [(record, lang) for lang in self.langs if record.captions_in(lang)]
        if len(self.items) < batch_size:
            raise ConfigError(f"the records give {len(self.items)} conversations, fewer than "
                              f"one batch of {batch_size}")
        self.skipped = 0

    def messages(self, record: Record, lang: str) -> list[dict[str, str]]:
        if lang != "conversation":
            return record_messages(record, "captions", lang)
        messages = [{"role": t.role, "content": t.content} for t in record.conversation]
        if not any(IMAGE_TOKEN in m["content"] for m in messages):
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first]["content"] = f"{IMAGE_TOKEN}\n{messages[first]['content']}"
        return messages

    def __call__(self, epoch: int) -> Iterator[dict]:
        from imagefm.data.image import open_image

        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        local = self.batch_size // self.world_size
        rows: list[tuple[Any, Any]] = []
        for position in order.tolist():
            record, lang = self.items[position]
            try:
                example = self.processor.training_example(self.messages(record, lang))
                if example.images != 1:
                    raise ValueError(f"{example.images} image placeholders; one per record")
                image = open_image(record.image).convert("RGB")
            except ValueError:  # too long, no reply, a broken image (ImageDecodeError)...
                self.skipped += 1  # counted, never fatal: a long job must not die on one record
                continue
            rows.append((example, image))
            if len(rows) == self.batch_size:
                mine = rows[self.rank * local:(self.rank + 1) * local]
                yield self.processor.collate([e for e, _ in mine], images=[i for _, i in mine])
                rows = []


RECORD_OPTIONS = ("paths", "langs", "image_root", "seed")


def read_training_records(paths: Sequence[str], image_root: str | None = None) -> list[Record]:
    """Records of LLaVA ``.json`` files and WebDataset shards (directories, files, globs);
    the Tux Paint ``test`` split is refused (reserved for evaluation)."""
    from imagefm.data.files import read_llava_json
    from imagefm.data.formats import SkipCounter, read_shards

    records: list[Record] = []
    skips = SkipCounter()
    for path in paths:
        if str(path).endswith(".json"):
            records += read_llava_json(path, image_root, skips)
        else:
            records += [r for r in read_shards(path, skips) if r.split != "test"]
    return records


def vlm_records_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> LoaderFactory:
    """``data.source = vlm-records``: conversations from ``data.path`` (+ ``options.paths``)."""
    options = dict(config.data.options)
    check_options("vlm-records", options, RECORD_OPTIONS)
    paths = ([config.data.path] if config.data.path else []) + list(options.pop("paths", []))
    if not paths:
        raise ConfigError("data.source = vlm-records needs data.path (shards or a LLaVA .json)")
    micro_rows = micro_batch_size(config, info) * info.world_size  # all ranks
    try:
        records = read_training_records(paths, options.pop("image_root", None))
    except FileNotFoundError as err:
        raise ConfigError(f"data.path: {err}") from None
    options.setdefault("seed", config.run.seed)
    return RecordConversations(VLMProcessor.for_model(model), records,
                               batch_size=micro_rows, rank=info.rank,
                               world_size=info.world_size, **options)


register_data_source("vlm-records", vlm_records_source)
