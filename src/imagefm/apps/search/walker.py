"""Find the images of a folder, and read one file for indexing (in a worker process).

The walk is recursive and deterministic (sorted), skips hidden files and folders (``.git``,
``.thumbnails``, macOS ``._`` files) and does not follow symbolic links to folders (no loops).
A symbolic link to a *file* is kept only when its target lies inside the root: the server later
serves indexed files, and must never be talked into serving something outside the folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# First frame only for animated GIF/WebP/TIFF (open_image takes frame 0).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class FoundFile:
    """An image file under the root: path relative to it (POSIX separators), size, mtime."""

    rel_path: str
    size: int
    mtime_ns: int


@dataclass
class LoadedFile:
    """One file read for indexing: its stat and content hash, and pixels or an error."""

    rel_path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int = 0
    height: int = 0
    pixels: np.ndarray | None = None  # uint8 [S, S, 3], the model card's resize and crop
    error: str | None = None


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True when ``path``, symbolic links resolved, is ``root`` or lies under it."""
    real_path, real_root = os.path.realpath(path), os.path.realpath(root)
    try:
        return os.path.commonpath([real_path, real_root]) == real_root
    except ValueError:  # different drives (Windows)
        return False


def walk_images(root: str | Path, *, skip: Iterable[str | Path] = (),
                on_skip: Callable[[str, str], None] | None = None) -> Iterator[FoundFile]:
    """Image files under ``root``, sorted by relative path; ``skip`` lists folders to leave out.

    Image files left out for a reason worth telling (a name that is not valid UTF-8, a link
    pointing outside the root) are reported to ``on_skip(path, reason)``.
    """
    def report(path: str, reason: str) -> None:
        if on_skip is not None:
            on_skip(path, reason)

    root = Path(root)
    skipped = {os.path.realpath(p) for p in skip}
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) not in skipped)
        for name in sorted(files):
            if name.startswith(".") or not is_image_name(name):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if undecodable(rel):
                report(rel.encode("utf-8", "replace").decode("utf-8"),
                       "file name is not valid UTF-8")
                continue
            if os.path.islink(path) and not is_inside(path, root):
                report(rel, "symbolic link to a file outside the folder")
                continue
            try:
                stat = os.stat(path)
            except OSError:  # vanished or a dangling link
                continue
            if not os.path.isfile(path):
                continue
            yield FoundFile(rel, stat.st_size, stat.st_mtime_ns)


def undecodable(name: str) -> bool:
    """True for a file name with bytes that are not UTF-8 (os.walk keeps them as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --- reading one file (runs in worker processes) -------------------------------------------------

_processor: Any = None


def init_worker(card: Any, max_pixels: int) -> None:
    """Process-pool initialiser: one image processor per worker, for the model's card."""
    global _processor
    from imagefm.data.image import ImageProcessor

    _processor = ImageProcessor(card, max_pixels=max_pixels)
    # Decoding is the job here; leave the cores to the other workers and the model.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def load_files(root: str, rel_paths: list[str]) -> list[LoadedFile]:
    """Read, hash, decode and resize/crop each file; failures are returned, never raised."""
    return [load_file(root, rel, _processor) for rel in rel_paths]


def load_file(root: str, rel_path: str, processor: Any) -> LoadedFile:
    """One file: stat and SHA-256 of the bytes read, then the card's resize and crop."""
    from imagefm.data.image import ImageDecodeError, open_image

    path = os.path.join(root, rel_path)
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
    except OSError as err:
        return LoadedFile(rel_path, 0, 0, "", error=f"cannot read {rel_path}: {err.strerror}")
    loaded = LoadedFile(rel_path, stat.st_size, stat.st_mtime_ns, hashlib.sha256(data).hexdigest())
    try:
        image = open_image(data, name=rel_path, max_pixels=processor.max_pixels)
        loaded.width, loaded.height = image.size
        # A copy: the crop may be a view into the whole decoded image, which would be pickled.
        loaded.pixels = np.ascontiguousarray(processor.resize_and_crop(image))
    except ImageDecodeError as err:
        loaded.error = str(err)
    except Exception as err:  # a bad file must never stop indexing
        loaded.error = f"cannot decode image {rel_path}: {type(err).__name__}: {err}"
    return loaded
