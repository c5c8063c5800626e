"""imagefm: train, adapt, evaluate and serve image foundation models in plain PyTorch.

    import imagefm
    model = imagefm.load(path)            # imagefm, HF CLIP/SigLIP or open_clip checkpoint
    proc = imagefm.load_processor(path)   # images -> pixel_values, texts -> input_ids (+ mask)
"""

from __future__ import annotations

__version__ = "0.1.0"

from imagefm.checkpoint import load  # noqa: E402
from imagefm.config import DualEncoderConfig, ImageCard, preset  # noqa: E402
from imagefm.processor import Processor, load_processor  # noqa: E402

__all__ = ["DualEncoderConfig", "ImageCard", "Processor", "__version__", "load",
           "load_processor", "preset"]
