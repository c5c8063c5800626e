"""Where the Trainer's batches come from, named in the config as ``data.source``.

The Trainer consumes ``make_loader(epoch) -> Iterable[batch dict]``. For an exact resume the
loader must be DETERMINISTIC GIVEN THE EPOCH: the same epoch yields the same batches in the same
order, whatever the global random state (seed any shuffling from (seed, epoch)). Under
torch.distributed each rank's loader yields that rank's share of the global batch: rank ``r``
takes rows ``[r * n, (r + 1) * n)`` of a global batch of ``world_size * n`` rows, so the
distributed losses see the same global batch a single process would.

Batches are MICRO-batches: ``n = micro_batch_size(config, info)`` rows per rank, and one optimizer
step takes ``train.accumulate`` of them in a row (``data.batch_size`` rows over all ranks).

Two optional parts of the protocol (train/batches.py):

- Fast resume: the iterable ``make_loader(epoch)`` returns MAY have ``skip_batches(n)``. A run
  resumed mid-epoch calls it before iterating; the first batch yielded is then batch ``n``.
  Without it the Trainer iterates and drops the first ``n`` batches.
- Epoch end under torch.distributed: the ranks agree at every batch (all_reduce MIN of "I have a
  batch"); when any rank's loader is exhausted every rank ends the epoch, so ranks may yield
  different numbers of batches without a hang.

A data source is a factory ``(config, model, dist_info) -> make_loader``. Register one with
``register_data_source(name, factory)``, or name any importable ``"package.module:function"``.
The built-in ``toy`` source makes deterministic random image–text pairs that a model can learn
(smoke runs, tests).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from imagefm.config import ConfigError
from imagefm.train.config import TrainConfig
from imagefm.train.distributed import DistInfo

LoaderFactory = Callable[[int], Iterable[dict]]
DataSource = Callable[[TrainConfig, nn.Module, DistInfo], LoaderFactory]

DATA_SOURCES: dict[str, DataSource] = {}


# Sources that read held-out data differently (in order, no augmentation, the test split) when
# their data.options hold `held_out: true`, as the evaluation loader sets it.
HELD_OUT_SOURCES: set[str] = set()


def register_data_source(name: str, factory: DataSource, *, held_out_option: bool = False
                         ) -> None:
    """Make ``data.source=<name>`` build its loader with ``factory``. ``held_out_option``: the
    source takes ``data.options.held_out`` (set for the held-out batches of ``eval.data``)."""
    DATA_SOURCES[name] = factory
    if held_out_option:
        HELD_OUT_SOURCES.add(name)


# Modules that register more built-in sources when imported (imported on first lookup, as they
# import this module themselves).
SOURCE_MODULES = ("imagefm.train.vlm_data", "imagefm.train.conversations",
                  "imagefm.train.recipe_data", "imagefm.train.stream_data",
                  "imagefm.train.conversation_stream", "imagefm.train.speech_data",
                  "imagefm.train.points", "imagefm.train.speech_vlm_data",
                  "imagefm.train.asr")


def get_data_source(name: str) -> DataSource:
    """A registered source, or an importable ``"package.module:function"``."""
    for module in SOURCE_MODULES:
        importlib.import_module(module)
    if name in DATA_SOURCES:
        return DATA_SOURCES[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ConfigError(f"data.source = {name!r} is unknown; choose one of "
                          f"{', '.join(sorted(DATA_SOURCES))} or write 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"data.source = {name!r} cannot be imported: {err}") from None


def check_options(source: str, options: dict[str, Any], known: tuple[str, ...]) -> None:
    """Refuse ``data.options`` keys that ``source`` does not read (a typo, almost always)."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown data.options for {source}: {', '.join(unknown)}; "
                          f"known: {', '.join(known)}")


def model_tokenizer(model: nn.Module, source: str) -> Any:
    """The model's own tokenizer, which sources of real captions tokenise with."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"data.source={source} tokenises captions with the model's own "
                          f"tokenizer, and this model has none: use a preset whose text tower "
                          f"comes with one (lit-effnet) or model.init a checkpoint that has one")
    return tokenizer


def int_option(options: dict[str, Any], key: str, minimum: int, default: Any) -> Any:
    """``data.options[key]``: an integer >= ``minimum`` (``default`` when absent)."""
    value = options.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.options.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def micro_batch_size(config: TrainConfig, info: DistInfo) -> int:
    """Rows per rank of one micro-batch: data.batch_size / (world size * train.accumulate)."""
    parts = info.world_size * config.train.accumulate
    if config.data.batch_size % parts:
        raise ConfigError(f"data.batch_size ({config.data.batch_size}) must be divisible by the "
                          f"number of processes ({info.world_size}) times train.accumulate "
                          f"({config.train.accumulate})")
    return config.data.batch_size // parts


class ToyPairs:
    """Random image–text pairs with learnable structure, identical for a given (seed, epoch).

    Each example belongs to one of ``classes`` classes; its image is the class's random
    prototype plus noise, its text the class's random token sequence. Yields ``this rank's``
    rows of each global (micro-)batch of ``batch_size`` rows as {"pixel_values", "input_ids",
    "attention_mask"}.
    """

    def __init__(self, *, batch_size: int, image_size: int, vocab_size: int, text_length: int = 8,
                 classes: int = 16, batches_per_epoch: int = 8, noise: float = 0.5,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} not divisible by world_size {world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.batches_per_epoch, self.noise, self.seed = batches_per_epoch, noise, seed
        generator = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(classes, 3, image_size, image_size, generator=generator)
        self.texts = torch.randint(1, vocab_size, (classes, text_length), generator=generator)

    def __call__(self, epoch: int) -> Iterator[dict]:
        local = self.batch_size // self.world_size
        rows = slice(self.rank * local, (self.rank + 1) * local)
        for index in range(self.batches_per_epoch):
            # One generator per (seed, epoch, batch): the batch never depends on what came before.
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + epoch) * 1_000_003 + index)
            labels = torch.randint(len(self.texts), (self.batch_size,), generator=generator)
            noise = torch.randn(self.batch_size, *self.prototypes.shape[1:], generator=generator)
            pixels = self.prototypes[labels] + self.noise * noise
            input_ids = self.texts[labels]
            yield {"pixel_values": pixels[rows], "input_ids": input_ids[rows],
                   "attention_mask": torch.ones_like(input_ids[rows])}


TOY_OPTIONS = ("classes", "batches_per_epoch", "noise", "text_length")


def toy_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> LoaderFactory:
    """``data.source=toy``: ``ToyPairs`` shaped for ``model`` (options: see TOY_OPTIONS)."""
    check_options("the toy source", config.data.options, TOY_OPTIONS)
    rows = micro_batch_size(config, info)
    model_config: Any = model.config
    options = {"text_length": min(8, model_config.text.context_length), **config.data.options}
    return ToyPairs(batch_size=rows * info.world_size, image_size=model_config.vision.image_size,
                    vocab_size=model_config.text.vocab_size, seed=config.run.seed,
                    rank=info.rank, world_size=info.world_size, **options)


register_data_source("toy", toy_source)
