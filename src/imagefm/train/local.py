"""``run.local=true``: any training config shrunk to a laptop-sized smoke run (tiny towers with
random weights, a few steps, small batches), in the spirit of big_vision's ``runlocal``.
Explicit overrides still win over the shrink (``train.config.load_config``)."""

from __future__ import annotations

import copy
from typing import Any

from imagefm.config import PRESETS
from imagefm.train.presets import LOCAL_PRESETS, MODEL_PRESETS

# run.local sizes per tower kind (model_type): a few thousand parameters each, random weights.
LOCAL_TOWERS: dict[str, dict[str, Any]] = {
    "vit": {"layers": 1, "width": 32, "heads": 2, "mlp_dim": 64},
    "transformer": {"layers": 1, "width": 32, "heads": 2, "mlp_dim": 64},
    "efficientnet_lite": {"image_size": 32, "width_coefficient": 0.25,
                          "depth_coefficient": 0.34, "stem_channels": 8, "width": 32},
    "bert": {"layers": 1, "width": 32, "heads": 2, "mlp_dim": 64, "context_length": 32},
}


def shrink_for_local(data: dict[str, Any]) -> dict[str, Any]:
    """A laptop-sized version of a config: tiny model, a few steps, small batches, CPU-friendly."""
    data = copy.deepcopy(data)
    model, train, run, optim, dataset, evaluation = (data[k] for k in (
        "model", "train", "run", "optim", "data", "eval"))
    if model.get("init") is None and str(model.get("preset")) in LOCAL_PRESETS:
        model["preset"] = LOCAL_PRESETS[str(model.get("preset"))]
    if model.get("init") is None and model["preset"] in MODEL_PRESETS and \
            model["preset"] not in PRESETS:  # another model family: its small preset as it is
        model["config"], model["pretrained"] = {}, False
    elif model.get("init") is None:
        base = PRESETS.get(str(model.get("preset")))
        kinds = (base.vision.model_type, base.text.model_type) if base else ("vit", "transformer")
        if kinds == ("vit", "transformer"):  # any ViT preset shrinks to the tiny one
            model["preset"] = "siglip-tiny" if "siglip" in str(model.get("preset")) else "tiny"
        else:  # other towers keep their kind, shrunk, with random weights
            model["pretrained"] = False
        overrides = model.get("config") or {}
        model["config"] = {**overrides, "embed_dim": 32,
                           "vision": {**overrides.get("vision", {}), **LOCAL_TOWERS[kinds[0]]},
                           "text": {**overrides.get("text", {}), **LOCAL_TOWERS[kinds[1]]}}
    model["compile"] = False
    train["steps"] = min(train["steps"], 20)
    train["gradcache_chunk"] = min(train["gradcache_chunk"], 4)
    optim["warmup_steps"] = min(optim["warmup_steps"], 2)
    dataset["batch_size"] = min(dataset["batch_size"], 8)
    # The largest accumulation up to the old one that still divides the shrunk batch.
    train["accumulate"] = max(k for k in range(1, min(train["accumulate"], 8) + 1)
                              if dataset["batch_size"] % k == 0)
    if evaluation["every"]:
        evaluation["every"] = min(evaluation["every"], 10)
    evaluation["limit"] = min(evaluation["limit"], 32)
    if evaluation["batch_size"] is not None:
        evaluation["batch_size"] = min(evaluation["batch_size"], 8)
    dataset["num_workers"] = 0
    run["checkpoint_every"] = min(run["checkpoint_every"], 10)
    run["name"] = f"{run['name']}-local"
    return data
