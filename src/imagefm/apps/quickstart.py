"""The main job: from nothing to a trained, evaluated, saved bilingual CLIP on a CPU in minutes.

    generate synthetic scenes (minimal-pair groups, English + Korean captions)
      → train a byte-level BPE tokenizer on the captions
      → train the `tiny` preset with the shared Trainer (CLIP or SigLIP loss)
      → evaluate zero-shot colour, shape, held-out pairs, counting, relations, retrieval (en, ko)
      → save the model (imagefm format) and write a report (Markdown + PNG plots)

The data stays in memory as uint8 pixels and token ids: at this size decoding images every step
would cost more than the model. Batches are whole minimal-pair groups (see
``imagefm.data.synthetic.pairs``), which is what lets a 2M-parameter model learn shape in a few
hundred steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUITES = ("colour", "shape", "heldout", "count", "relation")
LANGS = ("en", "ko")
# How training scenes look. "clean": solid objects on plain white backgrounds (another colour
# for white objects), each at its region's centre. "varied": the engine's full range (textures,
# noise and gradients, every background colour, positions jittered off the patch grid), which a
# 2M-parameter ViT needs far more than five minutes to see shapes through (docs/results.md).
SCENE_STYLES: dict[str, dict[str, Any] | None] = {
    "clean": {"textures": ["solid"], "backgrounds": ["plain"],
              "background_colours": ["white"], "jitter": 0.0},
    "varied": None,
}


@dataclass
class QuickstartSettings:
    """What the quickstart does; the defaults take about five minutes on two CPU cores."""

    out: Path = Path("runs/quickstart")
    loss: str = "clip"  # clip | siglip
    pool: str = "cls"  # cls | mean: the image tower pools its class token, or the mean of its
    # patches with no class token (a tower llama.cpp's llava graph can run: docs/deploy.md)
    steps: int = 1000
    batch_size: int = 128
    group_size: int = 4  # minimal-pair group size (batches hold whole groups)
    mixed: float = 0.2  # fraction of groups that are ordinary random scenes (counts, relations)
    scenes: str = "clean"  # clean | varied (see SCENE_STYLES)
    samples: int = 20_000  # synthetic training scenes held in memory
    image_size: int = 64
    vocab_size: int = 4096
    lr: float = 1e-3
    warmup_steps: int = 30
    eval_images: int = 300  # images per suite and language
    retrieval_images: int = 500
    seed: int = 0
    workers: int | None = None  # data generation processes (None: every core)
    threads: int | None = None  # torch threads (None: PyTorch's default)
    device: str = "cpu"  # cpu | cuda | auto: the quickstart is calibrated for the CPU
    progress: bool = True
    real_data: bool = True  # also evaluate on Tux Paint / emoji test splits when installed

    def __post_init__(self) -> None:
        from imagefm.config import ConfigError

        if self.loss not in ("clip", "siglip"):
            raise ConfigError(f"quickstart loss must be 'clip' or 'siglip', got {self.loss!r}")
        if self.pool not in ("cls", "mean"):
            raise ConfigError(f"quickstart pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.scenes not in SCENE_STYLES:
            raise ConfigError(f"quickstart scenes must be one of {', '.join(SCENE_STYLES)}, "
                              f"got {self.scenes!r}")
        if self.batch_size % self.group_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of "
                              f"group_size ({self.group_size})")
        if self.samples < self.batch_size:
            raise ConfigError(f"samples ({self.samples}) must be at least one batch "
                              f"({self.batch_size})")
        for name in ("steps", "image_size", "eval_images", "retrieval_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quickstart {name} must be >= 1")
        self.out = Path(self.out)


@dataclass
class SceneData:
    """Training scenes in memory: pixels [N, H, W, 3] uint8 and captions per language."""

    pixels: np.ndarray
    captions: dict[str, list[str]] = field(default_factory=dict)


def generate_scenes(settings: QuickstartSettings, log: Callable[[str], None]) -> SceneData:
    from PIL import Image

    from imagefm.data.synthetic import generate

    records = generate("pairs", settings.samples, seed=settings.seed,
                       image_size=settings.image_size, workers=settings.workers,
                       group_size=settings.group_size, mixed=settings.mixed,
                       style=SCENE_STYLES[settings.scenes], captions_per_lang=1)
    pixels = np.empty((settings.samples, settings.image_size, settings.image_size, 3), np.uint8)
    captions: dict[str, list[str]] = {lang: [] for lang in LANGS}
    count = 0
    for record in _progress(records, settings.samples, "scenes", settings.progress):
        pixels[count] = np.asarray(Image.open(io.BytesIO(record.image)).convert("RGB"))
        for lang in LANGS:
            captions[lang].append(record.captions_in(lang)[0])
        count += 1
    if count != settings.samples:  # a failed sample would shift groups; refuse to go on
        raise RuntimeError(f"synthetic generation produced {count} of {settings.samples} scenes")
    return SceneData(pixels, captions)


def _progress(items: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="img", leave=False)


class GroupBatches:
    """``make_loader(epoch)`` for the Trainer: batches of whole groups, language mixed per row.

    Deterministic given (seed, epoch), as exact resume requires.
    """

    def __init__(self, data: SceneData, token_ids: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor], card: Any, settings: QuickstartSettings) -> None:
        self.data, self.token_ids, self.masks = data, token_ids, masks
        self.settings = settings
        self.mean = torch.tensor(card.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(card.std).view(1, 3, 1, 1) * 255
        self.pixels = torch.from_numpy(data.pixels)  # shares memory

    def __call__(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        s = self.settings
        rng = np.random.default_rng([s.seed, epoch])
        groups = rng.permutation(len(self.data.pixels) // s.group_size)
        per_batch = s.batch_size // s.group_size
        for start in range(0, len(groups) - per_batch + 1, per_batch):
            chosen = groups[start:start + per_batch]
            rows = torch.from_numpy((chosen[:, None] * s.group_size
                                     + np.arange(s.group_size)).reshape(-1))
            korean = torch.from_numpy(rng.random(len(rows)) < 0.5)[:, None]
            pixels = self.pixels[rows].permute(0, 3, 1, 2).float()
            yield {
                "pixel_values": (pixels - self.mean) / self.std,
                "input_ids": torch.where(korean, self.token_ids["ko"][rows],
                                         self.token_ids["en"][rows]),
                "attention_mask": torch.where(korean, self.masks["ko"][rows],
                                              self.masks["en"][rows]),
            }


def build_model(settings: QuickstartSettings, tokenizer: Any) -> Any:
    """The `tiny` preset sized for the tokenizer, pooling text at its end-of-text token."""
    import imagefm
    from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer

    base = imagefm.preset("tiny")
    vision = dataclasses.replace(base.vision, image_size=settings.image_size)
    if settings.pool == "mean":
        vision = dataclasses.replace(vision, class_token=False, pool="mean")
    # Our trained BPE gives EOS a low id (specials first): the text tower pools at that id.
    config = fit_text_to_tokenizer(dataclasses.replace(base, vision=vision), tokenizer)
    if settings.loss == "siglip":
        # SigLIP's loss with the paper's init (t=10, b=-10); the towers stay CLIP-shaped.
        config = dataclasses.replace(config, model_type="siglip", init_logit_scale=math.log(10),
                                     init_logit_bias=-10.0)
    model = DualEncoder(config)
    model.tokenizer = tokenizer
    return model


def train_config(settings: QuickstartSettings) -> Any:
    from imagefm.train.config import TrainConfig

    return TrainConfig.from_dict({
        "run": {"name": "train", "output_dir": str(settings.out), "seed": settings.seed,
                "checkpoint_every": max(settings.steps, 1), "keep_last": 1,
                "log_every": 10, "progress": settings.progress, "tensorboard": False,
                "device": settings.device},
        "task": {"loss": settings.loss},
        "data": {"batch_size": settings.batch_size},
        "optim": {"lr": settings.lr, "weight_decay": 0.1, "warmup_steps": settings.warmup_steps,
                  "min_lr_ratio": 0.02},
        "train": {"steps": settings.steps, "precision": "auto"},
    })


def evaluate(model: Any, processor: Any, settings: QuickstartSettings,
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    from imagefm.data.synthetic import generate
    from imagefm.eval.retrieval import evaluate_retrieval_languages
    from imagefm.eval.suites import run_suites

    log("evaluating zero-shot suites (en, ko)...")
    results = run_suites(model, processor, SUITES, LANGS, n=settings.eval_images,
                         seed=settings.seed + 1)
    log("evaluating retrieval on new synthetic scenes...")
    records = list(generate("scenes", settings.retrieval_images, seed=settings.seed + 2,
                            image_size=settings.image_size, workers=settings.workers,
                            style=SCENE_STYLES[settings.scenes], captions_per_lang=1))
    for result in evaluate_retrieval_languages(model, processor, records, langs=LANGS,
                                               name=f"synthetic scenes ({settings.scenes})"):
        results.append(result)
    if settings.real_data:
        results += evaluate_real_data(model, processor, settings, log)
    return results


def evaluate_real_data(model: Any, processor: Any, settings: QuickstartSettings,
                       log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Retrieval on the Tux Paint / emoji test splits, when their Debian packages are installed."""
    from imagefm.data.formats import read_shards
    from imagefm.data.recipes import MissingSourceError, prepare
    from imagefm.eval.retrieval import evaluate_retrieval_languages

    results = []
    for name in ("tuxpaint", "emoji"):
        out = settings.out / "data" / name
        try:
            if not (out / "manifest.json").exists():
                prepare(name, out, progress=False, overwrite=True)
        except (MissingSourceError, ImportError) as err:
            log(f"skipping {name}: {str(err).splitlines()[0]}")
            continue
        records = [r for r in read_shards(sorted(out.glob("test-*.tar")))]
        if records:
            log(f"evaluating retrieval on {name} test ({len(records)} pictures)...")
            results += evaluate_retrieval_languages(model, processor, records, langs=LANGS,
                                                    name=f"{name} test")
    return results


def run_quickstart(settings: QuickstartSettings | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole main job; returns the report paths, timings and results."""
    from imagefm.eval.report import format_table, write_report
    from imagefm.processor import Processor
    from imagefm.tokenizer import train_bpe
    from imagefm.train import ContrastiveTask, Trainer

    settings = settings or QuickstartSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings.out.mkdir(parents=True, exist_ok=True)
    if (settings.out / "train").exists():
        # A re-run replaces the previous quickstart run (the Trainer refuses to start over one).
        import shutil

        log(f"replacing the previous run in {settings.out}")
        shutil.rmtree(settings.out / "train")
    timings: dict[str, float] = {}
    started = time.perf_counter()

    log(f"generating {settings.samples:,} synthetic scenes ({settings.image_size}px, en + ko)...")
    data = generate_scenes(settings, log)
    timings["data_s"] = time.perf_counter() - started

    tokenizer = train_bpe(data.captions["en"] + data.captions["ko"], settings.vocab_size,
                          context_length=32)
    token_ids, masks = {}, {}
    for lang in LANGS:
        encoded = tokenizer(data.captions[lang])
        token_ids[lang], masks[lang] = encoded["input_ids"], encoded["attention_mask"]
    model = build_model(settings, tokenizer)
    log(f"training the tiny {settings.loss.upper()} model ({model.num_parameters:,} parameters) "
        f"for {settings.steps} steps of {settings.batch_size}...")
    config = train_config(settings)
    batches = GroupBatches(data, token_ids, masks, model.card, settings)
    mark = time.perf_counter()
    trainer = Trainer(model, ContrastiveTask(settings.loss), config, batches)
    trainer.fit()
    timings["train_s"] = time.perf_counter() - mark

    model = trainer.model.eval()
    model_dir = settings.out / "model"
    model.save_pretrained(model_dir)
    mark = time.perf_counter()
    processor = Processor.for_model(model)
    results = evaluate(model, processor, settings, log)
    timings["eval_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    meta = {
        "loss": settings.loss, "steps": settings.steps, "batch_size": settings.batch_size,
        "parameters": f"{model.num_parameters:,}", "model": str(model_dir),
        "threads": torch.get_num_threads(),
        **{k: f"{v:.0f} s" for k, v in timings.items()},
        "command": "imagefm quickstart" + ("" if settings.loss == "clip" else " --loss siglip"),
        # CLIP's softmax loss is the default: in this budget it learns shape, SigLIP's sigmoid
        # loss (paper init t=10, b=-10) does not yet (docs/results.md).
        "other loss": "imagefm quickstart --loss " + ("siglip" if settings.loss == "clip"
                                                       else "clip"),
    }
    paths = write_report(results, settings.out / "report", title="imagefm quickstart", meta=meta)
    (settings.out / "settings.json").write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v
         for k, v in dataclasses.asdict(settings).items()}, indent=2))
    log(format_table(results))
    log(f"model: {model_dir}\nreport: {paths['markdown'] if 'markdown' in paths else paths}")
    log(f"time: data {timings['data_s']:.0f} s, training {timings['train_s']:.0f} s, "
        f"evaluation {timings['eval_s']:.0f} s, total {timings['total_s']:.0f} s")
    return {"paths": paths, "timings": timings, "results": results, "model_dir": model_dir}
