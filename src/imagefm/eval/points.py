"""Evaluating point cloud–text models: zero-shot 3D classification, point ↔ text retrieval in
English and Korean, and robustness to rotation and to the number of points.

    results = evaluate_points(model, "data/shapes3d")      # held-out (test) shapes
    plot_robustness(results, "points_robustness.png")

Zero-shot: each shape class is the mean of its prompts' normalised embeddings
(``shapes3d.class_prompts``); a cloud is assigned the nearest class. Retrieval: the held-out
shapes against all their captions in one language (R@1/5/10 both ways). Robustness: the same
zero-shot accuracy with each cloud turned by a random rotation about the vertical axis or over
all of SO(3), and with fewer or more points per cloud.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagefm.data.formats import SkipCounter
from imagefm.data.pointcloud import iter_point_clouds, mesh_files, random_rotation
from imagefm.data.synthetic.shapes3d import SHAPE3D_NAMES, class_prompts, read_shapes3d
from imagefm.eval.metrics import classification_metrics, positive_ranks, recall_at_k
from imagefm.eval.retrieval import retrieval_metrics
from imagefm.train.points import dense_clouds

LANGS = ("en", "ko")
POINT_COUNTS = (64, 128, 256, 512, 1024, 2048)
ROTATIONS = ("none", "z", "so3")
# Files of Debian's assimp-testmodels (BSD-3-clause) that are plainly one of our classes.
ASSIMP_MODELS = Path("/usr/share/assimp/models")
ASSIMP_NAMED = {"PLY/cube.ply": "cube", "PLY/cube_binary.ply": "cube", "OFF/Cube.off": "cube",
                "OBJ/box.obj": "cube", "OBJ/cube_with_vertexcolors.obj": "cube",
                "OBJ/cube_usemtl.obj": "cube", "STL/sphereWithHole.stl": "sphere"}


@torch.no_grad()
def embed_points(model: Any, clouds: np.ndarray | torch.Tensor, batch_size: int = 64
                 ) -> torch.Tensor:
    """Normalised point embeddings [N, D] of clouds [N, n, C]."""
    clouds = torch.as_tensor(np.asarray(clouds), dtype=torch.float32)
    rows = [model.encode_points(clouds[i:i + batch_size])
            for i in range(0, len(clouds), batch_size)]
    return F.normalize(torch.cat(rows).float(), dim=-1)


@torch.no_grad()
def embed_texts(model: Any, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Normalised text embeddings [len(texts), D] (tokenised with the model's tokenizer)."""
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = model.tokenizer(texts[start:start + batch_size])
        rows.append(model.encode_text(batch["input_ids"], batch.get("attention_mask")))
    return F.normalize(torch.cat(rows).float(), dim=-1)


def class_embeddings(model: Any, lang: str) -> torch.Tensor:
    """[classes, D]: each shape class as the mean of its prompts' embeddings."""
    prompts = class_prompts(lang)
    return F.normalize(torch.stack([embed_texts(model, prompts[name]).mean(0)
                                    for name in SHAPE3D_NAMES]), dim=-1)


def shape_label(record: dict) -> int:
    """A record's class: the shape of its (first) object."""
    return SHAPE3D_NAMES.index(record["spec"]["objects"][0]["shape"])


def rotate_clouds(clouds: np.ndarray, mode: str, seed: int = 0) -> np.ndarray:
    """Each cloud's xyz turned by its own random rotation ("z": about the vertical axis, "so3":
    any); colours untouched."""
    if mode == "none":
        return clouds
    rng = np.random.default_rng(seed)
    out = np.array(clouds, copy=True)
    for i in range(len(out)):
        out[i, :, :3] = out[i, :, :3] @ random_rotation(rng, None if mode == "so3" else "z").T
    return out


def subsample(clouds: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random points of each cloud (with repeats if it has fewer)."""
    rng = np.random.default_rng(seed)
    n = clouds.shape[1]
    return np.stack([c[rng.choice(n, count, replace=n < count)] for c in clouds])


def zero_shot(model: Any, clouds: np.ndarray, labels: list[int], lang: str,
              classes: torch.Tensor | None = None) -> dict:
    """classification_metrics of zero-shot shape classification of ``clouds``."""
    classes = class_embeddings(model, lang) if classes is None else classes
    scores = embed_points(model, clouds) @ classes.t()
    return classification_metrics(scores, torch.as_tensor(labels), list(SHAPE3D_NAMES))


def evaluate_points(model: Any, root: str | Path, *, split: str = "test",
                    num_points: int | None = None, seed: int = 0,
                    real_root: str | Path | None = ASSIMP_MODELS) -> dict[str, Any]:
    """Zero-shot accuracy (en, ko), retrieval R@K (en, ko) on ``split`` of a shapes3d set, the
    robustness curves, and, when ``real_root`` holds assimp's test models, zero-shot accuracy
    on its named real meshes (with the unreadable files counted)."""
    model.eval()
    root = Path(root)
    records = read_shapes3d(root, split)
    num_points = num_points or model.config.point.num_points
    with_colour = model.config.point.in_channels == 6
    dense = dense_clouds(root, records, max(2048, max(POINT_COUNTS)), with_colour)
    clouds = subsample(dense, num_points, seed)
    labels = [shape_label(r) for r in records]
    classes = {lang: class_embeddings(model, lang) for lang in LANGS}
    point_embeds = embed_points(model, clouds)
    results: dict[str, Any] = {"split": split, "n_shapes": len(records),
                               "num_points": num_points, "zero_shot": {}, "retrieval": {},
                               "retrieval_by_description": {}}
    for lang in LANGS:
        metrics = classification_metrics(point_embeds @ classes[lang].t(),
                                         torch.as_tensor(labels), list(SHAPE3D_NAMES))
        results["zero_shot"][lang] = {k: metrics[k] for k in ("top1", "mean_per_class",
                                                              "chance", "n", "per_class")}
        texts = [c for r in records for c in r["captions"][lang]]
        owner = [i for i, r in enumerate(records) for _ in r["captions"][lang]]
        similarity = point_embeds @ embed_texts(model, texts).t()
        results["retrieval"][lang] = retrieval_metrics(similarity, owner, ks=(1, 5, 10))
        results["retrieval_by_description"][lang] = description_retrieval(similarity, records,
                                                                          owner)
    results["rotation"] = {mode: {lang: zero_shot(model, rotate_clouds(clouds, mode, seed),
                                                  labels, lang, classes[lang])["top1"]
                                  for lang in LANGS} for mode in ROTATIONS}
    results["points"] = {str(n): zero_shot(model, subsample(dense, n, seed + 1), labels, "en",
                                           classes["en"])["top1"] for n in POINT_COUNTS}
    if real_root is not None and Path(real_root).is_dir():
        results["real"] = evaluate_real(model, real_root, num_points, classes)
    return results


def description(record: dict) -> tuple:
    """What the captions of a record can tell apart: each object's colour and shape and the
    relation (sizes are mentioned only sometimes, and the cloud is normalised)."""
    spec = record["spec"]
    return (tuple((o["colour"], o["shape"]) for o in spec["objects"]), spec.get("relation"))


def description_retrieval(similarity: torch.Tensor, records: list[dict], owner: list[int],
                          ks: tuple[int, ...] = (1, 5)) -> dict[str, dict[str, float]]:
    """R@K where any shape with the same description as the caption's own counts as a hit
    (many held-out shapes are, say, "a blue cylinder": plain R@K calls all but one wrong)."""
    keys = [description(r) for r in records]
    same = torch.tensor([[keys[i] == keys[j] for j in owner] for i in range(len(records))])
    point_ranks = positive_ranks(similarity.float(), same)
    text_ranks = positive_ranks(similarity.float().t(), same.t())
    return {"image_to_text": {f"R@{k}": v for k, v in recall_at_k(point_ranks, ks).items()},
            "text_to_image": {f"R@{k}": v for k, v in recall_at_k(text_ranks, ks).items()},
            "distinct_descriptions": len(set(keys))}


def evaluate_real(model: Any, root: str | Path, num_points: int,
                  classes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Zero-shot shape of the named real meshes under ``root`` (assimp-testmodels), and how
    many of all its PLY/OBJ/STL/OFF files read (the rest are counted as skipped)."""
    root = Path(root)
    skips = SkipCounter()
    readable = sum(1 for _ in iter_point_clouds(mesh_files(root), num_points, skips=skips))
    named = [(root / path, label) for path, label in ASSIMP_NAMED.items()
             if (root / path).is_file()]
    clouds, labels, files = [], [], []
    for path, cloud in iter_point_clouds([p for p, _ in named], num_points):
        clouds.append(cloud.features(model.config.point.in_channels == 6))
        labels.append(SHAPE3D_NAMES.index(dict(named)[path]))
        files.append(str(path.relative_to(root)))
    out: dict[str, Any] = {"files_read": readable, "skipped": skips.as_dict(), "named": files}
    if clouds:
        embeds = embed_points(model, np.stack(clouds))
        for lang in LANGS:
            predicted = (embeds @ classes[lang].t()).argmax(1).tolist()
            hits = [p == t for p, t in zip(predicted, labels, strict=True)]
            out[lang] = {"top1": float(np.mean(hits)),
                         "predicted": [SHAPE3D_NAMES[p] for p in predicted]}
    return out


def plot_robustness(results: dict[str, Any], path: str | Path) -> Path:
    """Two panels: zero-shot accuracy vs rotation (en, ko) and vs points per cloud (en)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    modes = list(results["rotation"])
    width = 0.38
    for offset, lang in ((-width / 2, "en"), (width / 2, "ko")):
        left.bar(np.arange(len(modes)) + offset, [results["rotation"][m][lang] for m in modes],
                 width, label=lang)
    chance = results["zero_shot"]["en"]["chance"]
    for axis in (left, right):
        axis.axhline(chance, color="grey", linestyle=":", label="chance")
        axis.set_ylim(0, 1)
        axis.set_ylabel("zero-shot shape accuracy")
    left.set_xticks(range(len(modes)), ["no rotation", "random about z", "random SO(3)"])
    left.set_title("rotation (held-out shapes)")
    left.legend(fontsize=8)
    counts = [int(n) for n in results["points"]]
    right.plot(counts, [results["points"][str(n)] for n in counts], marker="o")
    right.axvline(results["num_points"], color="tab:red", linestyle="--", label="trained with")
    right.set_xscale("log", base=2)
    right.set_xlabel("points per cloud")
    right.set_title("point count (en prompts)")
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_comparison(runs: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Zero-shot accuracy of several runs side by side (``{run name: evaluate_points result}``):
    en, ko, and en under random SO(3) rotation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {"en": lambda r: r["zero_shot"]["en"]["top1"],
            "ko": lambda r: r["zero_shot"]["ko"]["top1"],
            "en, random SO(3)": lambda r: r["rotation"]["so3"]["en"]}
    fig, axis = plt.subplots(figsize=(1.6 + 2.2 * len(runs), 3.6))
    width = 0.8 / len(bars)
    for i, (label, value) in enumerate(bars.items()):
        heights = [value(r) for r in runs.values()]
        xs = np.arange(len(runs)) + (i - (len(bars) - 1) / 2) * width
        axis.bar(xs, heights, width, label=label)
        for x, h in zip(xs, heights, strict=True):
            axis.text(x, h + 0.01, f"{h:.2f}", ha="center", fontsize=7)
    axis.axhline(next(iter(runs.values()))["zero_shot"]["en"]["chance"], color="grey",
                 linestyle=":", label="chance")
    axis.set_xticks(range(len(runs)), list(runs))
    axis.set_ylim(0, 1)
    axis.set_ylabel("zero-shot shape accuracy")
    axis.set_title("held-out (colour, shape) combinations")
    axis.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (folders made) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
