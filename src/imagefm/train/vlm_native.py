"""``data.source = vlm-synthetic`` for VLMs that read images at their own size (Qwen2-VL, and any
family with a :mod:`imagefm.train.conversations` codec): the same conversations as the LLaVA
recipe's, each scene drawn at its own size.

    data:
      source: vlm-synthetic
      options: {kind: mixed, sizes: [48, 64, 80, 96]}   # height and width each drawn from sizes

Sample ``index`` is the scene, questions, caption and language that :mod:`imagefm.train.vlm_data`
gives the LLaVA-style model for that index (same seed, same stream); only its pixels differ: it
is rendered ``width`` x ``height`` (both drawn from ``sizes`` by a random stream of their own), with
centres at the same fractions of each side and radii a fraction of the shorter side, so the text
stays true. The family's codec then tokenises it (Qwen2-VL: ``h/14 * w/14 / 4``-style pad tokens
from the image's own grid, labels on the replies only) and makes the pixel tensors of a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch import nn

from imagefm.config import ConfigError, check_choice
from imagefm.data.conversations import Conversation
from imagefm.data.records import IMAGE_TOKEN
from imagefm.train.config import TrainConfig
from imagefm.train.conversations import Codec, codec_for, collate
from imagefm.train.data import LoaderFactory, check_options, micro_batch_size
from imagefm.train.distributed import DistInfo
from imagefm.train.vlm_data import DESCRIBE, KINDS, OPTIONS, rank_rows, record_messages

NATIVE_OPTIONS = (*OPTIONS, "sizes")
_SIZE_STREAM = 7  # the random stream of each scene's size, apart from the scene's own


def content_parts(text: str) -> list[dict[str, Any]]:
    """A turn written LLaVA-style (``<image>\\n...``) as content parts."""
    parts: list[dict[str, Any]] = []
    for index, piece in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


class NativeSyntheticConversations:
    """Deterministic batches of synthetic conversations at native sizes (module docstring)."""

    def __init__(self, codec: Codec, *, batch_size: int, kind: str = "mixed",
                 langs: Sequence[str] = ("en", "ko"), qa_per_image: int = 3,
                 style: dict[str, Any] | None = None, sizes: Sequence[int] = (64,),
                 examples_per_epoch: int = 100_000, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        from imagefm.data.synthetic.generator import check_request

        check_choice("data.options.kind", kind, KINDS)
        if not langs or set(langs) - set(DESCRIBE):
            raise ConfigError(f"data.options.langs = {list(langs)}: choose from "
                              f"{', '.join(DESCRIBE)}")
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or min(self.sizes) < 16:
            raise ConfigError(f"data.options.sizes = {list(sizes)}: give image sides of at "
                              f"least 16 pixels")
        self.codec, self.kind, self.langs = codec, kind, tuple(langs)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.examples_per_epoch, self.seed = examples_per_epoch, seed
        self.record_options = {"qa_per_image": qa_per_image, "style": style, "langs": self.langs}
        self.skipped = 0
        check_request("vqa", seed, max(self.sizes), "train",
                      {**self.record_options, "height": min(self.sizes)})

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample ``index``."""
        rng = np.random.default_rng([self.seed, _SIZE_STREAM, index])
        height, width = rng.choice(self.sizes, size=2)
        return int(height), int(width)

    def example(self, index: int) -> tuple[Any, Any]:
        """The tokenised conversation and the image of sample ``index``."""
        from imagefm.data.image import open_image
        from imagefm.data.synthetic.generator import make_record

        height, width = self.size(index)
        record = make_record("vqa", index, seed=self.seed, image_size=width, height=height,
                             split="train", **self.record_options)
        kind = self.kind if self.kind != "mixed" else ("captions", "vqa")[index % 2]
        lang = record.meta["lang"] if kind == "vqa" else self.langs[(index // 2) % len(self.langs)]
        messages = [{"role": m["role"], "content": content_parts(m["content"])}
                    for m in record_messages(record, kind, lang)]
        image = open_image(record.image)
        conversation = Conversation(messages, [record.key], record.key)
        return self.codec.example(conversation, [(image.height, image.width)]), image

    def __call__(self, epoch: int) -> Iterator[dict]:
        for mine in rank_rows(self, epoch):
            yield collate(self.codec, [(example, [image]) for example, image in mine])


def native_synthetic_source(config: TrainConfig, model: nn.Module,
                            info: DistInfo) -> LoaderFactory:
    """``data.source = vlm-synthetic`` for a model with a conversation codec (options:
    NATIVE_OPTIONS)."""
    check_options("vlm-synthetic", config.data.options, NATIVE_OPTIONS)
    micro_rows = micro_batch_size(config, info) * info.world_size  # all ranks
    options = dict(config.data.options)
    options.setdefault("seed", config.run.seed)
    return NativeSyntheticConversations(codec_for(model), batch_size=micro_rows,
                                        rank=info.rank, world_size=info.world_size, **options)
