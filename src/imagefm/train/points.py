"""Training point cloud–text models (ULIP style): presets, the ``shapes3d`` data source, the
triplet task (``task.name=ulip``).

    model.preset: point-clip-tiny | point-clip-e5          (train.presets.MODEL_PRESETS)
    data.source: shapes3d, data.path: a set `imagefm points prepare` wrote

ULIP aligns a point encoder with the frozen image and text towers of a dual encoder: the loss is
point ↔ text + point ↔ image (a rendering of the same shape). Here the text tower is locked
(multilingual-e5-small for English and Korean, or a tiny tower in tests) and the image side is a
frozen image tower's features of the renderings (EfficientNet-Lite0, the image tower of the
``lit-effnet`` dual encoder; or raw 8×8 pixels in tests); both features are computed once and
cached, so a training step runs the point tower and the projections only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from imagefm.config import ConfigError, EfficientNetLiteConfig, merge_nested, preset
from imagefm.convert.towers import (
    char_wordpiece_tokenizer,
    load_efficientnet_lite0,
    load_multilingual_e5,
)
from imagefm.data.pointcloud import augment, load_point_cloud
from imagefm.data.synthetic.shapes3d import read_shapes3d
from imagefm.losses import clip_loss, siglip_loss
from imagefm.models.efficientnet import EfficientNetLite
from imagefm.models.point_encoder import PointTextConfig, PointTextModel
from imagefm.train.config import TrainConfig
from imagefm.train.data import (
    LoaderFactory,
    check_options,
    micro_batch_size,
    model_tokenizer,
    register_data_source,
)
from imagefm.train.distributed import DistInfo
from imagefm.train.tasks import ContrastiveTask, Embeddings, Metrics

# ---------------------------------------------------------------- presets
POINT_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: a tiny point tower and a tiny BERT text tower with a character vocabulary.
    "point-clip-tiny": {
        "point": {"num_points": 256, "num_groups": 16, "group_size": 16, "width": 64,
                  "layers": 2, "heads": 4, "mlp_dim": 128},
        "text": {"model_type": "bert", "width": 64, "layers": 2, "heads": 4, "mlp_dim": 128,
                 "context_length": 48},
        "embed_dim": 64, "image_width": 192},
    # ULIP-style: locked multilingual-e5-small text tower (English + Korean), EfficientNet-Lite0
    # features of the renderings (1280-d), a small Point-BERT tower trained from scratch.
    "point-clip-e5": {
        "point": {"num_points": 512, "num_groups": 32, "group_size": 16, "width": 128,
                  "layers": 3, "heads": 4, "mlp_dim": 384},
        "text": dataclasses.asdict(preset("lit-effnet").text),
        "embed_dim": 256, "image_width": 1280, "lock_text": True},
}


def build_point_model(name: str, overrides: dict[str, Any] | None = None,
                      pretrained: bool = True) -> PointTextModel:
    """A fresh ``PointTextModel`` of preset ``name`` (+ overrides). With ``pretrained`` a BERT
    tower of multilingual-e5-small's shape gets its weights and tokenizer (the ``e5`` extra);
    otherwise the character WordPiece tokenizer, with the vocabulary sized for it."""
    if name not in POINT_PRESETS:
        raise ConfigError(f"unknown point preset {name!r}; choose one of "
                          f"{', '.join(POINT_PRESETS)}")
    config = PointTextConfig.from_dict(merge_nested(POINT_PRESETS[name], overrides or {}))
    e5_shaped = config.text == preset("lit-effnet").text
    tokenizer = None
    if not (pretrained and e5_shaped):
        tokenizer = char_wordpiece_tokenizer(config.text.context_length)
        text = dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size)
        config = dataclasses.replace(config, text=text)
    model = PointTextModel(config)
    if tokenizer is None:
        tokenizer = load_multilingual_e5(model.text)
    model.tokenizer = tokenizer
    return model



# ---------------------------------------------------------------- frozen features
@torch.no_grad()
def text_features(model: PointTextModel, texts: list[str], batch_size: int = 128
                  ) -> torch.Tensor:
    """The (locked) text tower's pooled features [len(texts), text.width]."""
    tokenizer = model_tokenizer(model, "shapes3d")
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size])
        rows.append(model.text(batch["input_ids"], batch.get("attention_mask")).float())
    return torch.cat(rows)


IMAGE_TOWERS = ("efficientnet-lite0", "pixels")


@torch.no_grad()
def image_features(paths: list[Path], tower: str, batch_size: int = 32) -> np.ndarray:
    """Frozen features of the renderings: EfficientNet-Lite0's pooled 1280-d output (ImageNet
    weights, its own normalisation, 128 px), or the picture at 8×8 pixels (192-d; for tests)."""
    if tower == "pixels":
        return np.stack([np.asarray(Image.open(p).convert("RGB").resize((8, 8), Image.BILINEAR),
                                    dtype=np.float32).reshape(-1) / 255.0 for p in paths])
    if tower != "efficientnet-lite0":
        raise ConfigError(f"data.options.image_tower must be one of {IMAGE_TOWERS}, got {tower!r}")
    net = EfficientNetLite(EfficientNetLiteConfig(image_size=128)).eval()
    load_efficientnet_lite0(net)
    rows = []
    for start in range(0, len(paths), batch_size):
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((128, 128),
                                                                          Image.BILINEAR),
                                      dtype=np.float32) for p in paths[start:start + batch_size]])
        x = torch.from_numpy((pixels - 127.0) / 128.0).permute(0, 3, 1, 2)
        rows.append(net(x).numpy())
    return np.concatenate(rows)


def tower_fingerprint(tower: nn.Module) -> str:
    """A short hash of a tower's config and weights: names a cache of its outputs."""
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(tower.config), sort_keys=True).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.float64(tensor.double().sum()).tobytes())
    return digest.hexdigest()[:12]


def cached(path: Path, compute) -> np.ndarray:
    """``compute()`` saved at ``path`` (.npy) the first time, read back after."""
    if path.is_file():
        return np.load(path)
    value = np.asarray(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, value)
    tmp.replace(path)
    return value


def dense_clouds(root: Path, records: list[dict], dense: int, with_colour: bool) -> np.ndarray:
    """[N, dense, 3 or 6] surface points of each record's mesh (seeded by its id), cached."""
    def compute() -> np.ndarray:
        return np.stack([load_point_cloud(root / r["mesh"], dense, seed=int(r["id"]))
                         .features(with_colour) for r in records])
    split = records[0]["split"] if records else "none"
    return cached(root / "cache" / f"points-{split}-{dense}-{6 if with_colour else 3}.npy",
                  compute)


# ---------------------------------------------------------------- the data source
SHAPES3D_OPTIONS = ("num_points", "dense_points", "rotate", "image_tower", "held_out")


class Shapes3DBatches:
    """Micro-batches {points, input_ids, attention_mask?, image_features?} from a shapes3d set;
    the same (seed, epoch) gives the same batches. Each shape is seen once per epoch with one
    of its English or Korean captions, ``num_points`` of its cached surface points, augmented
    (training) or as they are (held out)."""

    def __init__(self, model: PointTextModel, root: Path, *, batch_size: int, rank: int,
                 world_size: int, seed: int, options: dict[str, Any]) -> None:
        config = model.config
        self.held_out = bool(options.get("held_out", False))
        self.records = read_shapes3d(root, "test" if self.held_out else "train")
        if len(self.records) < batch_size:
            raise ConfigError(f"data.path {root} has {len(self.records)} shapes in its "
                              f"{'test' if self.held_out else 'train'} split, fewer than "
                              f"data.batch_size ({batch_size})")
        self.num_points = int(options.get("num_points", config.point.num_points))
        self.rotate = options.get("rotate", "z")
        if self.rotate not in ("z", "so3", "none"):
            raise ConfigError(f"data.options.rotate must be z, so3 or none, got {self.rotate!r}")
        dense = int(options.get("dense_points", max(2048, self.num_points)))
        self.clouds = dense_clouds(root, self.records, dense, config.point.in_channels == 6)
        self.captions = [[*r["captions"]["en"], *r["captions"]["ko"]] for r in self.records]
        self.text = None
        if config.lock_text:  # the locked tower runs once per caption, not once per step
            flat = [c for caps in self.captions for c in caps]
            split = "test" if self.held_out else "train"
            self.text = torch.from_numpy(cached(
                root / "cache" / f"text-{split}-{tower_fingerprint(model.text)}.npy",
                lambda: text_features(model, flat).numpy())).float()
            self.caption_row = np.cumsum([0] + [len(c) for c in self.captions])
        self.images = None
        if config.image_width is not None:
            tower = options.get("image_tower", "efficientnet-lite0" if config.image_width == 1280
                                else "pixels")
            paths = [root / r["image"] for r in self.records]
            split = "test" if self.held_out else "train"
            self.images = torch.from_numpy(cached(
                root / "cache" / f"image-{tower}-{split}.npy",
                lambda: image_features(paths, tower))).float()
            if self.images.shape[1] != config.image_width:
                raise ConfigError(f"image tower {tower} gives {self.images.shape[1]} features "
                                  f"but model.image_width is {config.image_width}")
        self.tokenizer = model.tokenizer
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed

    def __len__(self) -> int:
        return len(self.records) // self.batch_size

    def __call__(self, epoch: int) -> Iterator[dict]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        local = self.batch_size // self.world_size
        for b in range(len(self)):
            rows = order[b * self.batch_size:(b + 1) * self.batch_size]
            rows = rows[self.rank * local:(self.rank + 1) * local]
            yield self._batch(rows, epoch, b)

    def _batch(self, rows: np.ndarray, epoch: int, index: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index, self.rank])
        points, captions, text_rows = [], [], []
        for row in rows.tolist():
            cloud = self.clouds[row]
            if self.held_out:
                points.append(cloud[:self.num_points])
                choice = 0
            else:
                pick = rng.choice(len(cloud), self.num_points, replace=False)
                rotate = None if self.rotate == "none" else self.rotate
                points.append(augment(cloud[pick], rng, rotate=rotate))
                choice = int(rng.integers(len(self.captions[row])))
            captions.append(self.captions[row][choice])
            if self.text is not None:
                text_rows.append(int(self.caption_row[row]) + choice)
        batch: dict[str, Any] = {"points": torch.from_numpy(np.stack(points)).float()}
        if self.text is not None:
            batch["input_ids"] = self.text[text_rows]  # the locked tower's features
        else:
            batch.update(self.tokenizer(captions))
        if self.images is not None:
            batch["image_features"] = self.images[torch.as_tensor(rows)]
        return batch


def shapes3d_source(config: TrainConfig, model: nn.Module, info: DistInfo) -> LoaderFactory:
    """``data.source=shapes3d``: a set `imagefm points prepare` wrote at ``data.path``."""
    check_options("the shapes3d source", config.data.options, SHAPES3D_OPTIONS)
    if not isinstance(model, PointTextModel):
        raise ConfigError("data.source=shapes3d feeds point cloud–text models: use "
                          "model.preset=point-clip-e5 (or point-clip-tiny)")
    if not config.data.path:
        raise ConfigError("data.source=shapes3d needs data.path: a folder written by "
                          "`imagefm points prepare`")
    rows = micro_batch_size(config, info)
    return Shapes3DBatches(model, Path(config.data.path), batch_size=rows * info.world_size,
                           rank=info.rank, world_size=info.world_size, seed=config.run.seed,
                           options=dict(config.data.options))


register_data_source("shapes3d", shapes3d_source, held_out_option=True)


# ---------------------------------------------------------------- ULIP's triplet task
class PointTripletTask(ContrastiveTask):
    """ULIP's loss: point ↔ text plus ``image_weight`` × point ↔ image (the renderings'
    features, when the batch has ``image_features``), both with the model's temperature.
    Without image features it is exactly ``ContrastiveTask``."""

    def __init__(self, loss: str = "clip", *, image_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(loss, **kwargs)
        self.image_weight = image_weight

    def embed(self, model: nn.Module, batch: dict) -> Embeddings:
        out = model(batch["points"], batch["input_ids"], batch.get("attention_mask"),
                    image_features=batch.get("image_features"))
        rows = {"image": out.image_embeds, "text": out.text_embeds}
        if out.render_embeds is not None:
            rows["render"] = out.render_embeds
        return Embeddings(rows=rows, shared={"logit_scale": out.logit_scale,
                                             "logit_bias": out.logit_bias})

    def embedding_loss(self, embeddings: Embeddings) -> tuple[torch.Tensor, Metrics]:
        rows = embeddings.rows
        pair = Embeddings({"image": rows["image"], "text": rows["text"]}, embeddings.shared)
        loss, metrics = super().embedding_loss(pair)
        if "render" not in rows or self.image_weight == 0:
            return loss, metrics
        scale, bias = embeddings.shared["logit_scale"], embeddings.shared.get("logit_bias")
        with torch.autocast(rows["image"].device.type, enabled=False):
            points, render = rows["image"].float(), rows["render"].float()
            if self.loss_name == "clip":
                image_loss = clip_loss(points, render, scale.float(),
                                       gather_with_grad=self.gather_with_grad,
                                       local_loss=self.local_loss)
            else:
                image_loss = siglip_loss(points, render, scale.float(), bias.float())
        metrics["loss_point_text"] = loss.detach()
        metrics["loss_point_image"] = image_loss.detach()
        return loss + self.image_weight * image_loss, metrics


def ulip_task(config: TrainConfig, model: nn.Module) -> PointTripletTask:
    """``task.name=ulip``: the triplet task for a point cloud–text model. A model whose text
    tower is locked (its captions' features are cached) must have it frozen in the stage too."""
    if not isinstance(model, PointTextModel):
        raise ConfigError(f"task.name = ulip trains point cloud–text models (model.preset="
                          f"point-clip-e5 or point-clip-tiny), not a {type(model).__name__}")
    if model.config.lock_text and "text" not in config.stage.frozen:
        raise ConfigError(f"model.preset = {config.model.preset} locks its text tower: add "
                          f"stage.frozen=[text]")
    loss = config.task.loss if config.task.loss != "auto" else model.config.model_type
    return PointTripletTask(loss, image_weight=config.task.image_weight,
                            max_logit_scale=config.task.max_logit_scale,
                            gather_with_grad=config.task.gather_with_grad,
                            local_loss=config.task.local_loss)
