"""Labelled images for adaptation: read once, split into a shot pool / validation / test.

    data = load_labelled("../shared/data/cifar10")          # shards, or a class-per-folder tree
    splits = make_splits(data, val_per_class=10, seed=0)
    train = splits.shots(4)                                 # 4 images per class (nested in 8, 16)

Sources: WebDataset shards (``.jpg`` + ``.cls`` with ``classes.json`` beside them, or shards
written by ``imagefm data prepare`` / ``imagefm synth``) and image folders with one sub-folder
per class (``train``/``val``/``test`` split folders honoured). A record's split comes from the
record itself or, for plain shards, from the shard name (``test*`` → test, ``val*`` → val), as
the CIFAR-10 recipe reads them.

Splits are deterministic in ``seed``. The validation images are drawn from the training pool
first; the K-shot training sets are prefixes of one per-class order, so the 1-shot images are
among the 2-shot ones and so on: a curve over K compares methods on the same images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imagefm.data.formats import SkipCounter, list_shards, read_classes, read_shards
from imagefm.data.records import Record


@dataclass
class LabelledImages:
    """Encoded images with integer labels and the class names they index."""

    images: list[bytes]
    labels: torch.Tensor  # long [N]
    classnames: list[str]
    keys: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        idx = [int(i) for i in indices]
        return LabelledImages([self.images[i] for i in idx], self.labels[idx].clone(),
                              self.classnames, [self.keys[i] for i in idx] if self.keys else [],
                              [self.splits[i] for i in idx] if self.splits else [])

    def split(self, name: str) -> LabelledImages:
        return self.subset([i for i, s in enumerate(self.splits) if s == name])

    def rows_of(self, classnames: Sequence[str]) -> list[int]:
        """Indices of the images whose class name is one of ``classnames``."""
        wanted = set(classnames)
        return [i for i, label in enumerate(self.labels.tolist())
                if self.classnames[label] in wanted]

    def restrict(self, classnames: Sequence[str]) -> LabelledImages:
        """Only the images of ``classnames`` (matched by name), labelled in that order; the
        rows kept are :meth:`rows_of`'s, in their order."""
        index = {name: i for i, name in enumerate(classnames)}
        kept = self.subset(self.rows_of(classnames))
        kept.labels = torch.tensor([index[self.classnames[label]]
                                    for label in kept.labels.tolist()], dtype=torch.long)
        kept.classnames = list(classnames)
        return kept


def shared_classes(first: LabelledImages, second: LabelledImages) -> list[str]:
    """The class names of ``first`` that ``second`` has images of, in ``first``'s order."""
    present = {second.classnames[label] for label in second.labels.tolist()}
    return [name for name in first.classnames if name in present]


def cap_per_class(data: LabelledImages, per_class: int | None, seed: int = 0) -> LabelledImages:
    """At most ``per_class`` images of each class, drawn as :func:`make_splits` draws its test
    images from a data set's own test split (same seed → same images, so cached features of
    that test set are found again)."""
    if per_class is None:
        return data
    order = _per_class_order(data.labels, np.random.default_rng(seed))
    return data.subset(sorted(i for v in order.values() for i in v[:per_class]))


def _shard_split(path: Path) -> str:
    for split in ("test", "val"):
        if path.name.startswith(split):
            return split
    return "train"


def _records(source: Path, skips: SkipCounter) -> Iterator[tuple[Record, list[str] | None]]:
    """Records with their split set, and the class names stored beside them (if any)."""
    if source.is_dir() and not any(source.rglob("*.tar")):
        from imagefm.data.recipes.folder import build

        for record in build(source, skips):
            yield record, None
        return
    for shard in list_shards(source):
        classes = read_classes(shard)
        for record in read_shards(shard, skips):
            # Shards of our own format carry their split; plain ones are named after it.
            if record.split == "train":
                record.split = _shard_split(shard)
            yield record, classes


def load_labelled(source: str | Path, skips: SkipCounter | None = None) -> LabelledImages:
    """Every labelled image under ``source`` (shards or a class-per-folder tree).

    Records without an image or a label are skipped and counted in ``skips``. Labels are
    renumbered by class name when names are known, so split folders with different class
    sets still agree.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no data at {source}: pass a folder of WebDataset shards or a "
                                "folder with one sub-folder per class")
    skips = skips if skips is not None else SkipCounter()
    rows: list[tuple[bytes, int | None, str | None, str, str]] = []
    stored: list[str] | None = None
    for record, classes in _records(source, skips):
        stored = stored or classes
        if record.image is None:
            skips.add("no image", f"{record.key}: record has no image")
        elif record.label is None and record.label_name is None:
            skips.add("no label", f"{record.key}: record has no label")
        else:
            skips.ok()
            rows.append((record.image, record.label, record.label_name, record.key,
                         record.split))
    if not rows:
        raise ValueError(f"{source}: no labelled images found ({skips.report()})")
    by_name = all(name is not None for _, _, name, _, _ in rows)
    if by_name and stored is None:
        # Folders: classes are their names, in sorted order across every split.
        classnames = sorted({name for _, _, name, _, _ in rows})  # type: ignore[type-var]
        index = {name: i for i, name in enumerate(classnames)}
        labels = [index[name] for _, _, name, _, _ in rows]  # type: ignore[index]
    else:
        labels = [int(label) if label is not None else -1 for _, label, _, _, _ in rows]
        if min(labels) < 0:
            raise ValueError(f"{source}: some records have a class name but no label index")
        names = {label: name for (_, _, name, _, _), label in zip(rows, labels, strict=True)
                 if name is not None}
        count = max(max(labels) + 1, len(stored or []))
        classnames = [names.get(i) or (stored[i] if stored and i < len(stored) else str(i))
                      for i in range(count)]
    return LabelledImages([r[0] for r in rows], torch.tensor(labels, dtype=torch.long),
                          classnames, [r[3] for r in rows], [r[4] for r in rows])


@dataclass
class Splits:
    """A training pool in a fixed per-class order, a validation set and a test set."""

    pool: LabelledImages  # ordered: class c's i-th image is the i-th it contributes to K shots
    val: LabelledImages
    test: LabelledImages

    @property
    def classnames(self) -> list[str]:
        return self.pool.classnames

    def max_shots(self) -> int:
        counts = torch.bincount(self.pool.labels, minlength=len(self.classnames))
        return int(counts.min())

    def shot_indices(self, shots: int | None) -> list[int]:
        """Pool indices of the first ``shots`` images of every class (None: all of them)."""
        if shots is None:
            return list(range(len(self.pool)))
        if shots < 0:
            raise ValueError(f"shots must be >= 0, got {shots}")
        if shots > self.max_shots():
            raise ValueError(f"{shots} shots per class asked, but the smallest class has only "
                             f"{self.max_shots()} training images after validation; use fewer "
                             "shots or a smaller --val-per-class")
        seen: dict[int, int] = {}
        chosen = []
        for i, label in enumerate(self.pool.labels.tolist()):
            if seen.get(label, 0) < shots:
                seen[label] = seen.get(label, 0) + 1
                chosen.append(i)
        return chosen

    def shots(self, shots: int | None) -> LabelledImages:
        return self.pool.subset(self.shot_indices(shots))


def _per_class_order(labels: torch.Tensor, rng: np.random.Generator) -> dict[int, list[int]]:
    order: dict[int, list[int]] = {}
    for c in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels.numpy() == c)
        order[c] = [int(i) for i in rng.permutation(members)]
    return order


def _interleave(order: dict[int, list[int]]) -> list[int]:
    """Round-robin over classes: the first K per class come before the (K+1)-th of any."""
    longest = max((len(v) for v in order.values()), default=0)
    return [v[i] for i in range(longest) for v in order.values() if i < len(v)]


def make_splits(data: LabelledImages, *, val_per_class: int = 10, test_fraction: float = 0.3,
                test_per_class: int | None = None, seed: int = 0) -> Splits:
    """Pool / validation / test, deterministic in ``seed``.

    Test: the data's ``test`` split (else ``val``), or — when it has neither — a stratified
    ``test_fraction`` of each class. ``test_per_class`` caps the test images per class (a
    shorter run). Validation: ``val_per_class`` images per class taken from the training pool.
    """
    rng = np.random.default_rng(seed)
    splits = set(data.splits)
    held_out = "test" if "test" in splits else "val" if "val" in splits else None
    if held_out is not None:
        train_idx = [i for i, s in enumerate(data.splits) if s not in (held_out, "val", "test")]
        test_idx = [i for i, s in enumerate(data.splits) if s == held_out]
        if held_out == "test":  # a separate val split joins the validation candidates
            train_idx += [i for i, s in enumerate(data.splits) if s == "val"]
    else:
        train_idx, test_idx = [], []
        for members in _per_class_order(data.labels, rng).values():
            n_test = max(1, round(len(members) * test_fraction)) if len(members) > 1 else 0
            test_idx += members[:n_test]
            train_idx += members[n_test:]
    train, test = data.subset(sorted(train_idx)), data.subset(sorted(test_idx))
    if len(test) == 0:
        raise ValueError("no test images: the data needs a test split or more images per class")
    if test_per_class is not None:
        order = _per_class_order(test.labels, rng)
        test = test.subset(sorted(i for v in order.values() for i in v[:test_per_class]))
    order = _per_class_order(train.labels, rng)
    missing = [train.classnames[c] for c in range(len(train.classnames)) if c not in order]
    if missing:
        raise ValueError(f"classes without training images: {missing[:5]}")
    small = [train.classnames[c] for c, v in order.items() if len(v) <= val_per_class]
    if small:
        raise ValueError(f"class(es) {small[:5]} have at most --val-per-class={val_per_class} "
                         "training images, leaving none to train on; lower --val-per-class")
    val_idx = [i for v in order.values() for i in v[:val_per_class]]
    pool_order = _interleave({c: v[val_per_class:] for c, v in order.items()})
    return Splits(train.subset(pool_order), train.subset(sorted(val_idx)), test)
