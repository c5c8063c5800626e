"""Run adaptation methods at several shot counts on one model and data set.

    splits = make_splits(load_labelled("data/mine"), val_per_class=10)
    exp = Experiment(model, processor, splits, classnames, cache_dir="runs/cache")
    results = [r for k in (1, 4, 16) for r in exp.run("probe", k)]

The image features of every image are computed once (and cached on disk); every method and
shot count reuses them. Methods that change the image tower (LoRA on it, fine-tuning) embed the
test images again with the adapted model. Each result carries test and validation accuracy,
the wall-clock training time, the number of trained parameters and, for methods that change
weights, the forgetting check (reference accuracy before and after).

Domain shift: ``also_test`` is a second labelled set (another domain: clip-art for a model
adapted on photos) on which every method is tested too (``Result.also_top1``); its images are
matched to the experiment's classes by class name, and those of other classes left out.
``only_classes`` restricts the experiment to some classes (e.g. those both domains have),
after the features of the full splits are read, so a cache of the full data serves.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagefm.adapt.coop import CoopConfig, train_coop
from imagefm.adapt.data import LabelledImages, Splits
from imagefm.adapt.features import (
    FeatureViews,
    cached_features,
    extract_features,
    feature_fingerprint,
    feature_views,
)
from imagefm.adapt.finetune import FinetuneConfig, finetune
from imagefm.adapt.head import Head, accuracy, text_head
from imagefm.adapt.lora import LoraSettings, resolve_towers, train_lora
from imagefm.adapt.probe import ProbeConfig, train_probe
from imagefm.adapt.reference import Reference
from imagefm.adapt.tip_adapter import TipConfig, tip_adapter, tip_adapter_f
from imagefm.adapt.tune import Batchable, class_prompts, preprocess
from imagefm.adapt.wise_ft import ALPHAS, choose_alpha, wise_ft
from imagefm.apps.zeroshot import class_embeddings, logit_parts
from imagefm.config import ConfigError, from_dict
from imagefm.data.formats import SkipCounter
from imagefm.train.config import parse_override, set_dotted

METHODS = ("zeroshot", "probe", "zs-probe", "tip", "tip-f", "coop", "lora", "finetune")
# Methods whose weights change: their result carries the forgetting check.
WEIGHT_METHODS = ("lora", "finetune", "wise-ft")


@dataclass(frozen=True)
class WiseConfig:
    alphas: tuple[float, ...] = ALPHAS
    max_drop: float = 0.02  # reference accuracy WiSE-FT may lose (validation), a fraction


@dataclass(frozen=True)
class MethodConfigs:
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tip: TipConfig = field(default_factory=TipConfig)
    coop: CoopConfig = field(default_factory=CoopConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    wise: WiseConfig = field(default_factory=WiseConfig)


def parse_overrides(items: list[str] | tuple[str, ...] = ()) -> MethodConfigs:
    """``["coop.steps=100", "lora.rank=8", "probe.l2_grid=[0.001, 0.01]"]`` → configs.

    Each item is read by the Trainer's override parser (``train.config.parse_override``: values
    are YAML numbers, strings, lists); unknown sections or keys are refused with the known ones
    named.
    """
    sections: dict[str, dict[str, Any]] = {}
    names = [f.name for f in fields(MethodConfigs)]
    for item in items:
        try:
            key, value = parse_override(item)
        except ConfigError:  # no "=": refused below with this command's own example
            key, value = "", None
        if key.count(".") != 1:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. coop.steps=100")
        section, name = key.split(".")
        if section not in names:
            raise ConfigError(f"--set {item!r}: unknown section {section!r}; sections: "
                              f"{', '.join(names)}")
        set_dotted(sections, key, value)
    built = {}
    for f in fields(MethodConfigs):
        default = f.default_factory()  # type: ignore[misc]
        current = asdict(default)
        changes = {key: _coerce(value, current[key], f"{f.name}.{key}") if key in current
                   else value for key, value in sections.get(f.name, {}).items()}
        data = {**current, **changes}
        try:
            built[f.name] = from_dict(type(default), data, f.name)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--set {f.name}: {err}") from None
    return MethodConfigs(**built)


def _coerce(value: Any, default: Any, key: str) -> Any:
    """``value`` as the type of the setting's default (YAML reads ``1e-4`` as a string)."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if isinstance(default, (int, float)) and not isinstance(value, bool):
            number = float(value)
            if isinstance(default, int):
                if number != int(number):
                    raise ValueError("expected a whole number")
                return int(number)
            return number
        if isinstance(default, tuple):
            items = value if isinstance(value, (list, tuple)) else [value]
            kind = type(default[0]) if default else str
            return tuple(kind(v) for v in items)
        if default is None or isinstance(default, str):
            return value if default is None else str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--set {key}={value!r}: {err}") from None
    raise ConfigError(f"--set {key}={value!r}: expected a {type(default).__name__}")


@dataclass
class Result:
    method: str
    shots: int | None  # per class; None = every training image ("full data")
    top1: float  # test accuracy, a fraction
    val_top1: float
    seconds: float  # wall-clock training time (features cached beforehand)
    trainable_parameters: int
    details: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, float] | None = None  # {"before", "after"} test accuracy
    head: Head | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)  # when the weights changed
    also_top1: float | None = None  # accuracy on the second domain (``also_test``)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it would deep-copy the model.
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)
                if f.name not in ("head", "model")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Experiment:
    """A model, a few-shot data split and cached features; ``run(method, shots)``."""

    def __init__(self, model: nn.Module, processor: Any, splits: Splits,
                 classnames: list[str] | None = None, lang: str = "en", *,
                 cache_dir: str | Path | None = None, reference: Reference | None = None,
                 configs: MethodConfigs | None = None, batch_size: int = 128,
                 skips: SkipCounter | None = None, progress: bool = False,
                 also_test: LabelledImages | None = None,
                 only_classes: list[str] | None = None) -> None:
        self.model, self.processor, self.lang = model.eval(), processor, lang
        self.classnames = list(classnames or splits.classnames)
        if len(self.classnames) != len(splits.classnames):
            raise ValueError(f"{len(self.classnames)} class names for "
                             f"{len(splits.classnames)} classes")
        names = list(only_classes or splits.classnames)
        unknown = [n for n in names if n not in splits.classnames]
        if unknown:
            raise ValueError(f"only_classes: {unknown} not among the data's classes "
                             f"{splits.classnames}")
        self.classnames = [self.classnames[splits.classnames.index(n)] for n in names]
        self.reference, self.configs = reference, configs or MethodConfigs()
        self.batch_size, self.skips = batch_size, skips if skips is not None else SkipCounter()
        started = time.perf_counter()
        fingerprint = feature_fingerprint(model)
        views = {}
        kept_splits = {}
        parts = {name: getattr(splits, name) for name in ("pool", "val", "test")}
        if also_test is not None:
            parts["also"] = also_test
        for name, part in parts.items():
            feats = cached_features(model, processor, part.images, part.keys, cache_dir,
                                    fingerprint=fingerprint, batch_size=batch_size,
                                    skips=self.skips, progress=progress)
            kept = part.subset(feats.kept.tolist())  # undecodable images leave every split
            # Only the experiment's classes, by name (a no-op without only_classes).
            rows = kept.rows_of(names)
            kept_splits[name] = kept.restrict(names)
            pre = feats.pre[torch.as_tensor(rows, dtype=torch.long)]
            views[name] = feature_views(model, pre, kept_splits[name].labels)
        self.splits = Splits(kept_splits["pool"], kept_splits["val"], kept_splits["test"])
        self.pool, self.val, self.test = views["pool"], views["val"], views["test"]
        # The second domain, if any: its images of the experiment's classes.
        self.also_data: LabelledImages | None = kept_splits.get("also")
        self.also: FeatureViews | None = views.get("also")
        if self.also is not None and len(self.also) == 0:
            raise ValueError(f"also_test has no images of the classes {names} (its classes: "
                             f"{also_test.classnames if also_test is not None else []})")
        self.feature_seconds = time.perf_counter() - started
        self.prompts = class_prompts(self.classnames, lang)
        scale, bias = logit_parts(model)
        self.zero_shot = text_head(class_embeddings(model, processor, self.prompts), scale, bias)
        self._reference_before: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def reference_before(self, part: str = "test") -> float | None:
        if self.reference is None:
            return None
        if part not in self._reference_before:
            self._reference_before[part] = self.reference.accuracy(self.model, self.processor,
                                                                   part)
        return self._reference_before[part]

    def _forgetting(self, model: nn.Module) -> dict[str, float] | None:
        if self.reference is None:
            return None
        return {"before": self.reference_before("test"),
                "after": self.reference.accuracy(model, self.processor, "test")}

    def _images(self, part: str, indices: list[int] | None = None) -> list[bytes]:
        data = self.also_data if part == "also" else getattr(self.splits, part)
        images = data.images
        return images if indices is None else [images[i] for i in indices]

    def _post_features(self, model: nn.Module, part: str) -> torch.Tensor:
        """Normalised post-projection features of a split through ``model``'s image tower."""
        feats = extract_features(model, self.processor, self._images(part),
                                 batch_size=self.batch_size)
        return feature_views(model, feats.pre, getattr(self, part).labels).post

    def _accuracy_of(self, model: nn.Module, part: str, prompts: list[list[str]],
                     vision_changed: bool) -> float:
        views: FeatureViews = getattr(self, part)
        post = self._post_features(model, part) if vision_changed else views.post
        scale, bias = logit_parts(model)
        head = text_head(class_embeddings(model, self.processor, prompts), scale, bias)
        return accuracy(head.logits(post), views.labels)

    def _batchable(self, part: str, indices: list[int] | None, vision: bool) -> Batchable:
        views: FeatureViews = getattr(self, part)
        if indices is not None:
            views = views.subset(indices)
        if not vision:
            return Batchable(views.labels, features=views.post)
        return Batchable(views.labels, pixels=preprocess(self.processor,
                                                         self._images(part, indices)))

    # ------------------------------------------------------------------ methods
    def run(self, method: str, shots: int | None) -> list[Result]:
        """Train ``method`` on ``shots`` images per class (None: all); one result (two for
        ``finetune``: the fine-tuned model and its WiSE-FT interpolation)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
        indices = self.splits.shot_indices(shots)
        train = self.pool.subset(indices)
        c, C = self.configs, len(self.classnames)
        started = time.perf_counter()
        if method == "zeroshot":
            head, info, trainable = self.zero_shot, {}, 0
        elif method in ("probe", "zs-probe"):
            init = self.zero_shot if method == "zs-probe" else None
            head, info = train_probe(train, self.val, C, c.probe, init=init)
            trainable = head.weight.numel() + head.bias.numel()
        elif method == "tip":
            head, info = tip_adapter(self.zero_shot, train, self.val, c.tip)
            trainable = 0
        elif method == "tip-f":
            head, info = tip_adapter_f(self.zero_shot, train, self.val, c.tip)
            trainable = head.cache_keys.numel() if head.cache_keys is not None else 0
        elif method == "coop":
            head, info = train_coop(self.model, self.processor.tokenizer, self.classnames,
                                    train, self.val, c.coop, self.lang)
            trainable = info["trainable_parameters"]
        elif method == "lora":
            return [self._run_lora(indices, shots, started)]
        else:
            return self._run_finetune(indices, shots, started)
        seconds = time.perf_counter() - started
        top1 = accuracy(head.logits(self.test.get(head.feature)), self.test.labels)
        val = accuracy(head.logits(self.val.get(head.feature)), self.val.labels)
        also = (None if self.also is None else
                accuracy(head.logits(self.also.get(head.feature)), self.also.labels))
        return [Result(method, 0 if method == "zeroshot" else shots, top1, val, seconds,
                       trainable, info, None, head, also_top1=also)]

    def _run_lora(self, indices: list[int], shots: int | None, started: float) -> Result:
        settings = self.configs.lora
        towers = resolve_towers(self.model, settings)
        vision = "vision" in towers
        prompts = (class_prompts(self.classnames, self.lang, settings.text_templates)
                   if "text" in towers else self.prompts)
        adapted, info = train_lora(self.model, self.processor, prompts,
                                   self._batchable("pool", indices, vision),
                                   self._batchable("val", None, vision), settings, towers)
        seconds = time.perf_counter() - started
        scale, bias = logit_parts(adapted)
        head = text_head(class_embeddings(adapted, self.processor, prompts), scale, bias)
        scores = {}
        for part in ("test", "also") if self.also is not None else ("test",):
            views: FeatureViews = getattr(self, part)
            post = self._post_features(adapted, part) if vision else views.post
            scores[part] = accuracy(head.logits(post), views.labels)
        return Result("lora", shots, scores["test"], info["val_accuracy"], seconds,
                      info["trainable_parameters"], info, self._forgetting(adapted), head,
                      adapted, also_top1=scores.get("also"))

    def _run_finetune(self, indices: list[int], shots: int | None,
                      started: float) -> list[Result]:
        config = self.configs.finetune
        vision = config.lock != "vision"
        prompts = (class_prompts(self.classnames, self.lang, config.text_templates)
                   if config.lock != "text" else self.prompts)
        tuned, info = finetune(self.model, self.processor, prompts,
                               self._batchable("pool", indices, vision),
                               self._batchable("val", None, vision), config)
        seconds = time.perf_counter() - started

        def target(model: nn.Module) -> float:
            return self._accuracy_of(model, "val", prompts, vision)

        reference = None
        if self.reference is not None:
            def reference(model: nn.Module) -> float:
                return self.reference.accuracy(model, self.processor, "val")

        wise = self.configs.wise
        alpha, curve = choose_alpha(self.model, tuned, target, reference, wise.alphas,
                                    wise.max_drop)
        results = []
        for name, a in (("finetune", 1.0), ("wise-ft", alpha)):
            model = tuned if a == 1.0 else wise_ft(self.model, tuned, a)
            top1 = self._accuracy_of(model, "test", prompts, vision)
            also = (None if self.also is None else
                    self._accuracy_of(model, "also", prompts, vision))
            val = next(c["target"] for c in curve if c["alpha"] == a)
            scale, bias = logit_parts(model)
            head = text_head(class_embeddings(model, self.processor, prompts), scale, bias)
            details = {**info, "alpha": a, "wise_curve": curve,
                       "max_reference_drop": wise.max_drop}
            results.append(Result(name, shots, top1, val, seconds, info["trainable_parameters"],
                                  details, self._forgetting(model), head, model,
                                  also_top1=also))
        return results
