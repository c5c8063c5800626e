"""imagefm: train, adapt, evaluate and serve image foundation models in plain PyTorch.

    import imagefm
    model = imagefm.load("google/siglip-base-patch16-224")   # a Hub id, or a local path
    model, proc = imagefm.load(path, processor=True)          # model + its processor, one call
    proc = imagefm.load_processor(path)   # images -> pixel_values, texts -> input_ids (+ mask)

Importing the package is cheap: ``load`` and friends import the loading layer (and through it
every converter and model) when first used, so ``import imagefm.checkpoint`` or
``imagefm.config`` alone pulls in no model code.
"""

from __future__ import annotations

from typing import Any

from imagefm.version import __version__

__all__ = ["DualEncoderConfig", "ImageCard", "Processor", "__version__", "load",
           "load_processor", "preset"]

# name -> module that defines it, imported on first use.
_LAZY = {"load": "imagefm.loading", "load_processor": "imagefm.loading",
         "Processor": "imagefm.processor", "DualEncoderConfig": "imagefm.config",
         "ImageCard": "imagefm.config", "preset": "imagefm.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imagefm' has no attribute {name!r}")
