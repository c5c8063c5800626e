"""``data.source: recipes``: train on the real-data recipes where they are installed.

    data:
      source: recipes
      batch_size: 256
      options:
        recipes: [tuxpaint, emoji]    # imagefm.data.recipes names (Debian / PyPI data)
        langs: [en, ko]               # caption languages; each epoch picks one per image
        cache_image_features: auto    # auto: when the stage locks the whole image tower
        views: 2                      # cached views per image: 1 = as is, 2 = + mirrored
        feature_cache: DIR            # optional: keep the cached features on disk between runs

Only each recipe's ``train`` split is ever read: the ``test`` split (for Tux Paint the project's
reserved evaluation stamps, DESIGN.md "Reserved evaluation data") is never trained on, whatever
the options say. Captions are tokenised once, by the model's own tokenizer.

A locked image tower computes the same features for an image at every step, so with
``cache_image_features`` the source runs it once per image (and view) before training and
yields the pooled features in ``pixel_values`` ([B, width]); ``DualEncoder.encode_image`` then
skips the tower. Unlocked towers get pixels, preprocessed once per image by the model's card.

The contract of ``imagefm.train.data`` holds: batches depend only on (run.seed, epoch), and each
rank yields its rows of every global batch. ``run.local=true`` keeps the first 64 train records
of each recipe (a smoke run), unless ``limit`` says otherwise.

Everything this source trains on sits in memory (encoded images, then pixels or features: about
300 kB per image at 224 px), so it refuses more than ``MAX_IN_MEMORY`` images. Larger data streams
from shards with flat memory: ``imagefm data prepare NAME --out DIR`` writes a recipe's shards,
and ``data.source=stream data.path=DIR`` trains on them (train/stream_data.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn

from imagefm.config import ConfigError
from imagefm.train.config import STAGE_PRESETS, TrainConfig
from imagefm.train.data import (
    check_options,
    micro_batch_size,
    model_tokenizer,
    register_data_source,
)
from imagefm.train.distributed import DistInfo, resolve_device
from imagefm.train.feature_cache import feature_key, load_features, save_features

OPTIONS = ("recipes", "langs", "cache_image_features", "views", "limit", "src", "feature_cache")
LOCAL_LIMIT = 64
MAX_IN_MEMORY = 20_000  # images; ~6 GB of float16 pixels at 224 px
TRAIN_SPLIT = "train"


@dataclass
class CaptionedImages:
    """Training images with their captions (already tokenised), from one or more recipes."""

    images: list[bytes]
    captions: list[list[list[int]]]  # per image: token ids of each caption
    langs: list[list[str]]
    sources: dict[str, int]  # recipe -> images kept
    skipped: dict[str, Any]


def read_train_records(recipes: list[str], langs: list[str], limit: int | None = None,
                       src: dict[str, str] | None = None) -> Iterator[Any]:
    """Records of each recipe's ``train`` split that have a caption in ``langs`` (captions in
    other languages dropped). The ``test`` split is filtered out here, once for every caller."""
    from imagefm.data.formats import SkipCounter
    from imagefm.data.recipes import RECIPES, MissingSourceError

    for name in recipes:
        if name not in RECIPES:
            raise ConfigError(f"data.options.recipes: unknown recipe {name!r}; known: "
                              f"{', '.join(sorted(RECIPES))}")
        recipe = RECIPES[name]
        try:
            path = recipe.locate((src or {}).get(name))
        except MissingSourceError as err:
            raise ConfigError(f"data.options.recipes: {err}") from None
        records = (r for r in recipe.build(path, SkipCounter()) if r.split == TRAIN_SPLIT)
        kept = (_keep_langs(r, langs) for r in records)
        yield from islice((r for r in kept if r is not None), limit)


def _keep_langs(record: Any, langs: list[str]) -> Any:
    import dataclasses

    captions = [c for c in record.captions if c.lang in langs and c.text.strip()]
    if record.image is None or not captions:
        return None
    return dataclasses.replace(record, captions=captions)


def collect(records: Any, tokenizer: Any) -> CaptionedImages:
    """Images and tokenised captions of ``records`` (undecodable images skipped, counted)."""
    from imagefm.data.formats import SkipCounter
    from imagefm.data.image import ImageDecodeError, open_image

    skips = SkipCounter()
    images, texts, owners, langs = [], [], [], []
    sources: dict[str, int] = {}
    for record in records:
        if len(images) >= MAX_IN_MEMORY:
            raise ConfigError(
                f"data.source=recipes holds every image in memory and stops at {MAX_IN_MEMORY:,}; "
                f"write shards with `imagefm data prepare NAME --out DIR` and train with "
                f"data.source=stream data.path=DIR (flat memory), or set data.options.limit")
        try:
            open_image(record.image, name=record.key)
        except ImageDecodeError as err:
            skips.add("undecodable image", str(err))
            continue
        skips.ok()
        for caption in record.captions:
            texts.append(caption.text)
            owners.append(len(images))
        langs.append([c.lang for c in record.captions])
        images.append(record.image)
        sources[record.source] = sources.get(record.source, 0) + 1
    if not images:
        raise ConfigError("data.source=recipes found no captioned train images in the chosen "
                          "recipes and languages")
    ids = tokenizer.encode_batch(texts)
    captions: list[list[list[int]]] = [[] for _ in images]
    for owner, row in zip(owners, ids, strict=True):
        captions[owner].append(row)
    return CaptionedImages(images, captions, langs, sources, skips.as_dict())


def preprocess(images: list[bytes], card: Any, batch_size: int = 64) -> torch.Tensor:
    """Pixel values [N, 3, S, S] of every image, per the model's card."""
    from imagefm.data.image import ImageProcessor

    processor = ImageProcessor(card)
    return torch.cat([processor(images[i:i + batch_size])
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def tower_features(tower: nn.Module, pixels: torch.Tensor, views: int,
                   batch_size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The image tower's pooled output for every image and view: [views, N, width] (float32).

    View 0 is the image as is, view 1 its mirror image.
    """
    was_training, home = tower.training, next(tower.parameters()).device
    tower.eval().to(device)
    try:
        out = []
        for view in range(views):
            rows = []
            for i in range(0, len(pixels), batch_size):
                chunk = pixels[i:i + batch_size].to(device)
                rows.append(tower(chunk.flip(-1) if view else chunk).float().cpu())
            out.append(torch.cat(rows))
        return torch.stack(out)
    finally:
        tower.train(was_training).to(home)


def image_tower_locked(config: TrainConfig) -> bool:
    """Whether the stage freezes the whole image tower (nothing under ``vision`` trains)."""
    frozen = STAGE_PRESETS[config.stage.preset] + list(config.stage.frozen)
    return "vision" in frozen and not config.stage.unlock_last_n.get("vision")


class RecipeBatches:
    """``make_loader(epoch)``: shuffled batches of (image or its features, one caption).

    Each epoch visits every image once in an order drawn from (seed, epoch); each image's
    caption (language) and view are drawn from the same generator. Batches are global; this
    rank yields rows ``[rank * n, (rank + 1) * n)``. The last incomplete batch is dropped.
    """

    def __init__(self, data: CaptionedImages, inputs: torch.Tensor, *, batch_size: int,
                 pad_id: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 features: bool = False, views: int = 1) -> None:
        if len(data.images) < batch_size:
            raise ConfigError(f"data.batch_size ({batch_size}) is larger than the "
                              f"{len(data.images)} training images")
        self.data, self.inputs, self.features = data, inputs, features
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size
        # Features hold every view ([views, N, width]); pixels are mirrored per batch.
        self.views = inputs.shape[0] if features else views

    def __len__(self) -> int:
        return len(self.data.images) // self.batch_size

    def __call__(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.data.images)
        order = torch.randperm(n, generator=generator)
        pick = torch.randint(0, 1 << 30, (n,), generator=generator)
        view = torch.randint(0, self.views, (n,), generator=generator)
        local = self.batch_size // self.world_size
        rows = slice(self.rank * local, (self.rank + 1) * local)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size][rows]
            captions = [self.data.captions[i][int(pick[i]) % len(self.data.captions[i])]
                        for i in index.tolist()]
            yield {"pixel_values": self._images(index, view[index]),
                   **pad(captions, self.pad_id)}

    def _images(self, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        if self.features:
            return self.inputs[view, index]
        pixels = self.inputs[index].float()
        mirrored = view.bool()
        if mirrored.any():
            pixels[mirrored] = pixels[mirrored].flip(-1)
        return pixels


def pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token rows padded to the longest: ``input_ids`` and ``attention_mask``."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _options(config: TrainConfig) -> dict[str, Any]:
    options = dict(config.data.options)
    check_options("the recipes source", options, OPTIONS)
    options.setdefault("recipes", ["tuxpaint", "emoji"])
    options.setdefault("langs", ["en", "ko"])
    options.setdefault("cache_image_features", "auto")
    options.setdefault("views", 1)
    options.setdefault("limit", LOCAL_LIMIT if config.run.local else None)
    for key in ("recipes", "langs"):
        if isinstance(options[key], str):
            options[key] = [options[key]]
    if options["cache_image_features"] not in ("auto", True, False):
        raise ConfigError(f"data.options.cache_image_features must be auto, true or false, got "
                          f"{options['cache_image_features']!r}")
    if options["views"] not in (1, 2):
        raise ConfigError(f"data.options.views must be 1 (as is) or 2 (+ mirrored), got "
                          f"{options['views']!r}")
    return options


def recipe_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> RecipeBatches:
    """``data.source=recipes`` (see the module docstring)."""
    options = _options(config)
    micro_rows = micro_batch_size(config, info) * info.world_size  # all ranks
    tokenizer = model_tokenizer(model, "recipes")
    cache = options["cache_image_features"]
    locked = image_tower_locked(config)
    if cache is True and not locked:
        raise ConfigError("data.options.cache_image_features=true needs a locked image tower "
                          "(stage.preset=lit, no stage.unlock_last_n.vision)")
    cache = locked if cache == "auto" else cache
    started = time.perf_counter()
    records = read_train_records(options["recipes"], options["langs"], options["limit"],
                                 options.get("src"))
    data = collect(records, tokenizer)
    inputs, key = None, None
    if cache and options.get("feature_cache"):

        key = feature_key(data.images, options["views"], model.vision, model.card)
        inputs = load_features(options["feature_cache"], key)
    if inputs is None:
        pixels = preprocess(data.images, model.card)
        if cache:

            device = resolve_device(config.run.device, info)
            inputs = tower_features(model.vision, pixels, options["views"], device=device)
            if key is not None and info.is_main:

                save_features(options["feature_cache"], key, inputs)
        else:
            inputs = pixels.half()  # float16 halves the memory; the model gets float32 back
        del pixels
    if info.is_main:
        what = "image features cached" if cache else "pixels"
        print(f"data.source=recipes: {len(data.images)} train images "
              f"({', '.join(f'{k} {v}' for k, v in data.sources.items())}), "
              f"{sum(len(c) for c in data.captions)} captions in {', '.join(options['langs'])}; "
              f"{what} ({options['views']} view(s)) in {time.perf_counter() - started:.1f} s")
    batches = RecipeBatches(data, inputs, batch_size=micro_rows,
                            pad_id=tokenizer.pad_id, seed=config.run.seed, rank=info.rank,
                            world_size=info.world_size, features=bool(cache),
                            views=options["views"])
    return batches


register_data_source("recipes", recipe_source)
