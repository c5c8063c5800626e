"""Real-data recipes: ``imagefm data prepare NAME --out DIR [--src PATH]``.

Each module registers one recipe (``RECIPES[name]``); ``prepare`` runs it. Importing this package
registers them all; their heavy imports (Pillow, emoji) happen only when a recipe runs.
"""

from __future__ import annotations

from imagefm.data.recipes import (
    cifar10,
    coco,
    folder,
    medical,
    noto_emoji,
    openclipart,
    openclipart_classes,
    tuxpaint,
)
from imagefm.data.recipes.base import (
    MANIFEST,
    RECIPES,
    MissingSourceError,
    Recipe,
    prepare,
    register,
    reserved_test_split,
    split_for,
    write_dataset,
)

__all__ = ["MANIFEST", "RECIPES", "MissingSourceError", "Recipe", "cifar10", "coco", "folder",
           "medical", "noto_emoji", "openclipart", "openclipart_classes", "prepare", "register",
           "reserved_test_split", "split_for", "tuxpaint", "write_dataset"]
