"""Writing synthetic records straight into WebDataset tar shards, plus a ``manifest.json``.

Layout per record (the same as ``imagefm.data.formats`` reads): ``<key>.png`` (image),
``<key>.json`` (``Record.to_json()``) and, when there is a mask, ``<key>.mask.png``.
Tar headers carry fixed times and owners, so the same seed gives byte-identical shards.
(This small writer and the general one in ``imagefm.data.formats`` could be merged later.)
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefm.data.records import Record
from imagefm.data.synthetic.generator import LICENSE, generate_results, resolve_workers

SHARD_PATTERN = "shard-{:06d}.tar"


def record_members(record: Record) -> list[tuple[str, bytes]]:
    """The tar members of one record: (file name, bytes)."""
    if "." in record.key:
        raise ValueError(f"record key {record.key!r} contains a dot; WebDataset splits keys there")
    members = []
    if record.image is not None:
        members.append((f"{record.key}.{record.image_ext}", record.image))
    text = json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True)
    members.append((f"{record.key}.json", text.encode("utf-8")))
    if record.mask is not None:
        members.append((f"{record.key}.mask.png", record.mask))
    return members


class TarShardWriter:
    """Writes records into ``shard-000000.tar``, ``shard-000001.tar``... of ``shard_size`` each.

    A shard is written under a temporary name and renamed when complete, so a crashed job never
    leaves a truncated shard that looks finished.
    """

    def __init__(self, out_dir: str | Path, shard_size: int = 1000) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _open_next(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._path = self.out_dir / name
        self._tar = tarfile.open(self._path.with_suffix(".tar.tmp"), "w", format=tarfile.PAX_FORMAT)
        self.shards.append({"name": name, "count": 0})

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._path.with_suffix(".tar.tmp"), self._path)
            self._tar = None

    def write(self, record: Record) -> None:
        if self._tar is None or self.shards[-1]["count"] >= self.shard_size:
            self._finish_shard()
            self._open_next()
        assert self._tar is not None
        for name, data in record_members(record):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.shards[-1]["count"] += 1
        self._count += 1

    def close(self) -> list[dict[str, Any]]:
        self._finish_shard()
        return self.shards

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # a failed job leaves no half-written shard behind
            self._tar.close()
            self._path.with_suffix(".tar.tmp").unlink(missing_ok=True)
            self.shards.pop()
            self._tar = None


@dataclass
class SynthSpec:
    """A request for synthetic data: what ``generate`` would be called with."""

    kind: str
    n: int
    seed: int = 0
    image_size: int = 64
    split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _tally(counts: dict[str, Counter], record: Record) -> None:
    # Counts a user may want to check at a glance: classes, languages, layouts, surfaces.
    scene = record.meta.get("scene") or {}
    for group, value in (("label_name", record.label_name), ("layout", scene.get("layout")),
                         ("chat_lang", record.meta.get("lang")),
                         ("text_lang", record.meta.get("text_lang")),
                         ("surface", record.meta.get("surface"))):
        if value is not None:
            counts.setdefault(group, Counter())[str(value)] += 1


def write_shards(source: SynthSpec | Iterable[Record], out_dir: str | Path, *,
                 shard_size: int = 1000, workers: int | None = None, progress: bool = False,
                 overwrite: bool = False, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write records (or a ``SynthSpec`` generated on ``workers`` cores) as shards + manifest.

    Refuses a folder that already has shards unless ``overwrite`` (stale shards from a bigger
    earlier run would otherwise be read along with the new ones). Returns the manifest.
    """
    out = Path(out_dir)
    old = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} shards; choose another folder "
                              "or pass overwrite=True (--overwrite)")
    for path in old:
        path.unlink()

    manifest: dict[str, Any] = {"format": "webdataset", "generator": "imagefm.data.synthetic",
                                "license": LICENSE, "shard_size": shard_size,
                                "members": {"png": "image", "json": "Record.to_json()",
                                            "mask.png": "defect mask (defects only)"}}
    if isinstance(source, SynthSpec):
        results = generate_results(source.kind, source.n, seed=source.seed,
                                   image_size=source.image_size, split=source.split,
                                   workers=workers, **source.options)
        manifest.update(kind=source.kind, n_requested=source.n, seed=source.seed,
                        image_size=source.image_size, split=source.split,
                        options=_jsonable(source.options))
        total = source.n
        log_workers = resolve_workers(workers)
    else:
        results = ((i, record, "") for i, record in enumerate(source))
        total, log_workers = None, None
    if info:
        manifest.update(_jsonable(info))

    counts: dict[str, Counter] = {}
    errors: list[str] = []
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=total, unit="img", desc=f"writing {out.name}",
                       postfix={"workers": log_workers} if log_workers else None)
    with TarShardWriter(out, shard_size) as writer:
        for index, record, error in results:
            if record is None:
                errors.append(f"sample {index}: {error}")
                continue
            writer.write(record)
            _tally(counts, record)
    manifest.update(count=sum(s["count"] for s in writer.shards), skipped=len(errors),
                    errors=errors[:20], shards=writer.shards,
                    counts={group: dict(sorted(c.items())) for group, c in sorted(counts.items())})
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
                                       encoding="utf-8")
    if errors and not manifest["count"]:
        raise RuntimeError(f"every sample failed; first error: {errors[0]}")
    return manifest
