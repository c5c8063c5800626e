"""A training data source of synthetic inspection images with captions (``imagefm train``).

    imagefm train model.init=runs/quickstart/model \\
        data.source=imagefm.adapt.defect_data:source data.batch_size=128 train.steps=300

teaches a small CLIP what surfaces and defects look like and are called ("a metal surface with
a scratch", "긁힌 자국이 있는 금속 표면"), so that its *zero-shot* anomaly detection (state
prompts, :mod:`imagefm.adapt.anomaly`) has words to work with. The anomaly detector itself
never sees a label: but the model has seen defect captions, so the result is in-domain
zero-shot, not zero-shot on an unseen domain — say so when reporting it.

Images are drawn from a random stream of its own (``run.seed`` with a fixed offset), never the
seeds :func:`imagefm.adapt.inspection.synthetic_inspection` evaluates on. Options
(``data.options``): ``n`` images (default 3000), ``defect_rate`` (0.5), ``langs`` ([en, ko]).
Batches are deterministic in (seed, epoch), each rank taking its rows, as the Trainer needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from imagefm.config import ConfigError

OPTIONS = ("n", "defect_rate", "langs")
SEED_OFFSET = 7_919  # keeps the training stream apart from the evaluation seeds


class DefectBatches:
    def __init__(self, pixels: torch.Tensor, tokens: dict[str, dict[str, torch.Tensor]],
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.pixels, self.tokens = pixels, tokens
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def __call__(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, SEED_OFFSET, epoch])
        order = rng.permutation(len(self.pixels))
        langs = list(self.tokens)
        local = self.batch_size // self.world_size
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            rows = torch.from_numpy(order[start:start + self.batch_size])
            pick = torch.from_numpy(rng.integers(len(langs), size=self.batch_size))
            ids = torch.stack([self.tokens[langs[int(p)]]["input_ids"][r]
                               for p, r in zip(pick, rows, strict=True)])
            mask = torch.stack([self.tokens[langs[int(p)]]["attention_mask"][r]
                                for p, r in zip(pick, rows, strict=True)])
            mine = slice(self.rank * local, (self.rank + 1) * local)
            yield {"pixel_values": self.pixels[rows][mine].float(), "input_ids": ids[mine],
                   "attention_mask": mask[mine]}


def source(config: Any, model: nn.Module, info: Any) -> DefectBatches:
    """``data.source=imagefm.adapt.defect_data:source`` (see the module docstring)."""
    from imagefm.data.synthetic.defects import defect_record
    from imagefm.processor import Processor
    from imagefm.train.data import check_options

    options = dict(config.data.options)
    check_options("defect_data", options, OPTIONS)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("defect_data needs a model with a tokenizer: start from a checkpoint "
                          "(model.init=runs/quickstart/model)")
    n, rate = int(options.get("n", 3000)), float(options.get("defect_rate", 0.5))
    langs = list(options.get("langs", ["en", "ko"]))
    if config.data.batch_size % info.world_size or config.data.batch_size > n:
        raise ConfigError(f"data.batch_size {config.data.batch_size} must divide by the "
                          f"processes and be at most data.options.n ({n})")
    processor = Processor.for_model(model)
    rng = np.random.default_rng([config.run.seed, SEED_OFFSET])
    size = model.card.image_size
    records = [defect_record(rng, key=f"train-{i}", image_size=size, split="train",
                             defect_rate=rate) for i in range(n)]
    # float16 in memory: 3,000 images of 64 px take 70 MB instead of 140.
    pixels = torch.cat([processor(images=[r.image for r in records[i:i + 256]])["pixel_values"]
                        for i in range(0, n, 256)]).half()
    tokens = {lang: tokenizer([r.captions_in(lang)[0] for r in records]) for lang in langs}
    return DefectBatches(pixels, tokens, config.data.batch_size, config.run.seed, info.rank,
                         info.world_size)
