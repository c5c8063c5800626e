"""What every recipe shares: the reserved split rule, the registry entry, writing the result.

A recipe reads data where the user installed it (a Debian package, a download, a folder) and
yields ``Record``s; ``prepare`` writes them as WebDataset shards by split (``train-000000.tar``,
``test-000000.tar``...) plus ``manifest.json`` (licence, provenance, counts, skips).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefm.data.formats import ShardWriter, SkipCounter
from imagefm.data.records import Record

MANIFEST = "manifest.json"


def reserved_test_split(name: str) -> bool:
    """The project-wide evaluation rule: ``name`` (a file stem such as ``lion``) is held out.

    ``int(sha1(name).hexdigest(), 16) % 5 == 0`` → test, never train. Every recipe that has
    stable item names uses this one function so the held-out set never drifts.
    """
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % 5 == 0


def split_for(name: str) -> str:
    """``"test"`` for reserved names, else ``"train"``."""
    return "test" if reserved_test_split(name) else "train"


class MissingSourceError(FileNotFoundError):
    """The recipe's data is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Recipe:
    """A named way to turn installed data into shards.

    ``build(src, skips, **options)`` yields records (with ``split`` set) and counts what it
    skips; ``count(src)`` (optional) estimates the number of items for the progress bar.
    """

    name: str
    summary: str
    license: str
    install: str  # what to run when the data is missing
    build: Callable[..., Iterable[Record]]
    default_src: str | None = None
    debian_package: str | None = None
    count: Callable[[Path], int] | None = None
    notes: str = ""
    split_rule: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def locate(self, src: str | Path | None) -> Path:
        """The source path, checked to exist; otherwise a message on how to install it."""
        path = Path(src) if src is not None else (
            Path(self.default_src) if self.default_src else None)
        if path is None:
            raise MissingSourceError(f"recipe '{self.name}' needs --src PATH. {self.install}")
        if not path.exists():
            raise MissingSourceError(f"{self.summary}: not found at {path}. {self.install}")
        return path


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a recipe to the registry (by name; a second one with the same name is a bug)."""
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def debian_version(package: str) -> str | None:
    """The installed version of a Debian package, for provenance (None if unknown)."""
    if not shutil.which("dpkg-query"):
        return None
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def image_is_usable(data: bytes, name: str, skips: SkipCounter) -> bool:
    """Decode once to check; counts and names the file when it is bad."""
    from imagefm.data.image import ImageDecodeError, open_image
    from imagefm.data.loader import image_skip_reason

    try:
        open_image(data, name=name)
    except ImageDecodeError as err:
        skips.add(image_skip_reason(err.reason), str(err))
        return False
    return True


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    old = [p for p in out.iterdir() if p.name == MANIFEST or p.name.endswith((".tar", ".tar.tmp"))]
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({len(old)} files); "
                              "pass --overwrite to replace it")
    for path in old:
        path.unlink()


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def write_dataset(records: Iterable[Record], out: str | Path, *, name: str, src: Path,
                  license: str, skips: SkipCounter, provenance: dict[str, Any] | None = None,
                  max_per_shard: int = 1000, total: int | None = None, progress: bool = True,
                  overwrite: bool = False, notes: str = "", split_rule: str = ""
                  ) -> dict[str, Any]:
    """Write records as shards per split plus ``manifest.json``; returns the manifest.

    The manifest is written last (atomically), so its presence means the dataset is complete.
    """
    out = Path(out)
    _prepare_out_dir(out, overwrite)
    writers: dict[str, ShardWriter] = {}
    splits: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    labelled = 0
    bar = _progress(total, name, progress)
    try:
        for record in records:
            writer = writers.get(record.split)
            if writer is None:
                writer = writers[record.split] = ShardWriter(out, prefix=record.split,
                                                             max_samples=max_per_shard)
            writer.write(record)
            skips.ok()
            splits[record.split] += 1
            languages.update(c.lang for c in record.captions)
            labelled += record.label is not None
            bar.update(skips.seen - bar.n)
            if skips.total_skipped:
                bar.set_postfix(skipped=skips.total_skipped, refresh=False)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.update(skips.seen - bar.n)
        bar.close()
    shards = {split: [p.name for p in writer.close()] for split, writer in sorted(writers.items())}
    from imagefm.version import __version__

    manifest = {
        "name": name,
        "source": str(src.resolve()),
        "license": license,
        "provenance": provenance or {},
        "notes": notes,
        "split_rule": split_rule,
        "counts": {"total": sum(splits.values()), "splits": dict(sorted(splits.items())),
                   "captions_per_lang": dict(sorted(languages.items())), "labelled": labelled},
        "skipped": dict(skips.skipped.most_common()),
        "skip_examples": skips.examples,
        "shards": shards,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "imagefm_version": __version__,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return manifest


def prepare(name: str, out: str | Path, src: str | Path | None = None, *,
            max_per_shard: int = 1000, overwrite: bool = False, progress: bool = True,
            **options: Any) -> dict[str, Any]:
    """Run recipe ``name``: read its source, write shards + manifest to ``out``.

    Raises ``KeyError`` for an unknown recipe and ``MissingSourceError`` (with the install
    command) when its data is not installed. ``options`` go to the recipe's ``build``.
    """
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    path = recipe.locate(src)
    skips = SkipCounter()
    provenance: dict[str, Any] = {"recipe": name, "source": recipe.summary}
    if recipe.debian_package:
        provenance["debian_package"] = recipe.debian_package
        provenance["debian_version"] = debian_version(recipe.debian_package)
    provenance.update(recipe.extra)
    records = recipe.build(path, skips, **options)
    total = recipe.count(path) if recipe.count is not None else None
    from PIL import Image  # here: importing the recipes stays light (see __init__)

    with warnings.catch_warnings():
        # Pillow warns about huge images as it opens them; open_image refuses the same ones
        # (its limit is Pillow's threshold) and the manifest counts them as "image too large".
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        manifest = write_dataset(records, out, name=name, src=path, license=recipe.license,
                                 skips=skips, provenance=provenance,
                                 max_per_shard=max_per_shard, total=total, progress=progress,
                                 overwrite=overwrite, notes=recipe.notes,
                                 split_rule=recipe.split_rule)
    return manifest


def iter_files(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Files under ``root`` with one of ``suffixes`` (lower-case), in sorted order, no hidden."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in suffixes and not any(
                part.startswith(".") for part in path.relative_to(root).parts):
            yield path
