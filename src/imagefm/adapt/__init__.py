"""Adaptation of dual encoders (CLIP / SigLIP) to a domain with few labels.

    from imagefm.adapt import Experiment, load_labelled, make_splits, sweep

    splits = make_splits(load_labelled("../shared/data/cifar10"), val_per_class=10)
    exp = Experiment(model, processor, splits, cache_dir="runs/adapt-cache")
    results = sweep(exp, ["zeroshot", "probe", "tip", "coop", "lora"], [1, 2, 4, 8, 16])

Methods (``imagefm adapt METHOD``; docs/adapt.md):

| method     | what trains                                    | module           |
|------------|------------------------------------------------|------------------|
| zeroshot   | nothing: prompt-ensembled class embeddings      | (apps.zeroshot)  |
| probe      | logistic regression on cached features          | probe            |
| zs-probe   | the same, started from and shrunk to zero-shot  | probe            |
| tip        | nothing: a cache of the few-shot features       | tip_adapter      |
| tip-f      | the cache keys                                  | tip_adapter      |
| coop       | context vectors in the text tower's input       | coop             |
| lora       | low-rank updates of q/k/v/o, fc1/fc2 (peft)     | lora             |
| finetune   | whole towers, layer-wise lr decay; + WiSE-FT    | finetune/wise_ft |

Anomaly detection (WinCLIP-style zero-/few-shot): :mod:`imagefm.adapt.anomaly` and
:mod:`imagefm.adapt.inspection`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from imagefm.adapt.classifier import AdaptedClassifier
from imagefm.adapt.data import LabelledImages, Splits, load_labelled, make_splits
from imagefm.adapt.experiment import METHODS, Experiment, MethodConfigs, Result, parse_overrides
from imagefm.adapt.head import Head
from imagefm.adapt.lora import add_lora, merge_lora
from imagefm.adapt.reference import Reference, parse_reference
from imagefm.adapt.wise_ft import interpolate_state, wise_ft


def sweep(experiment: Experiment, methods: Sequence[str], shots: Sequence[int | None],
          progress: Callable[[str], None] | None = None) -> list[Result]:
    """Every method at every shot count (``zeroshot`` once); results in run order."""
    results = []
    for method in methods:
        for k in ([0] if method == "zeroshot" else shots):
            for result in experiment.run(method, None if k is None else int(k)):
                results.append(result)
                if progress is not None:
                    ref = result.reference
                    extra = (f", reference {100 * ref['before']:.1f} -> {100 * ref['after']:.1f}"
                             if ref else "")
                    shots_text = "all" if result.shots is None else str(result.shots)
                    if result.also_top1 is not None:
                        extra += f", second domain {100 * result.also_top1:.1f}%"
                    progress(f"{result.method:>9} shots={shots_text:>3}: test "
                             f"{100 * result.top1:5.1f}%  val {100 * result.val_top1:5.1f}%  "
                             f"{result.seconds:6.1f}s  {result.trainable_parameters:,} params"
                             f"{extra}")
    return results


__all__ = ["METHODS", "AdaptedClassifier", "Experiment", "Head", "LabelledImages",
           "MethodConfigs", "Reference", "Result", "Splits", "add_lora", "interpolate_state",
           "load_labelled", "make_splits", "merge_lora", "parse_overrides", "parse_reference",
           "sweep", "wise_ft"]
