"""The one reader of WebDataset tar shards, built on the ``webdataset`` library.

A shard SPEC names shards the way webdataset and open_clip do:

* brace patterns: ``data/{00000..01023}.tar``; several specs joined by ``::``;
* local directories (every ``*.tar`` below them) and globs (``data/train-*.tar``);
* ``pipe:CMD`` (the command writes the tar to stdout, e.g. ``pipe:aws s3 cp s3://b/x.tar -``),
  ``http(s)://`` (read with curl) and any other scheme webdataset's ``gopen`` knows.

``iter_tar_samples(url)`` opens one shard with ``webdataset.gopen``, reads its members with
webdataset's ``tar_file_iterator`` and groups them into samples as its ``group_by_keys`` does:
``{"__key__", "__url__", ext: bytes...}``, the key ending at the basename's first dot
(``a.ko.txt`` → key ``a``, member ``ko.txt``; ``base_plus_ext``). A truncated or broken shard
raises ``ShardReadError`` after the complete samples before the damage (the sample being read
when it hit is dropped). Every reader of shards in imagefm (``formats.read_shards``, the
training stream, ``ShardDataset``) goes through this function.

webdataset is imported inside the functions: importing it imports torch, which the light
readers of ``imagefm.data.formats`` (and the CLI tools on top of them) should not pay for.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Recipes name their shards by split (train-000000.tar, test-000000.tar).
SPLIT_NAMES = ("train", "test", "val", "validation")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardReadError(OSError):
    """A shard file is unreadable (truncated or not a tar); the samples before the damage stand."""


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through a command or a network scheme rather than a local path."""
    return url.startswith("pipe:") or (_SCHEME.match(url) is not None
                                       and not url.startswith("file://"))


def local_path(url: str) -> Path | None:
    """The local file a shard URL names, or None for pipes and network URLs."""
    if is_remote(url):
        return None
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def expand_shard_spec(spec: str | Path | Iterable[str | Path], split: str | None = None
                      ) -> list[str]:
    """Every shard URL of ``spec`` (see the module docstring), in order.

    Local specs must name existing shards (``FileNotFoundError`` otherwise, before any work);
    remote ones are taken as written. With ``split``, a directory whose shards are named by
    split (``train-*.tar``, ``test-*.tar``...) gives only the ``{split}-*.tar`` ones, so training
    on a recipe folder never reads its held-out test shards.
    """
    if not isinstance(spec, (str, Path)):
        urls = [url for item in spec for url in expand_shard_spec(item, split)]
        if not urls:
            raise FileNotFoundError("no shards given")
        return urls
    import braceexpand

    urls = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        if is_remote(part):
            urls.extend(braceexpand.braceexpand(part))
        else:
            urls.extend(_local_shards(part, split))
    if not urls:
        raise FileNotFoundError(f"no shards found at {spec}")
    return urls


def _local_shards(part: str, split: str | None) -> list[str]:
    import braceexpand
    from webdataset.utils import glob_with_braces

    path = Path(part[len("file://"):] if part.startswith("file://") else part).expanduser()
    if path.is_dir():
        # os.walk, not rglob: data sets are often linked in (data/coco -> /mnt/coco), and
        # Path.rglob does not follow directory symlinks.
        found = sorted(Path(root) / name for root, _, names in os.walk(path, followlinks=True)
                       for name in names if name.endswith(".tar") and (Path(root) / name).is_file())
        if split is not None and any(p.name.startswith(tuple(f"{s}-" for s in SPLIT_NAMES))
                                     for p in found):
            named = [p for p in found if p.name.startswith(f"{split}-")]
            if not named:
                raise FileNotFoundError(
                    f"no '{split}-*.tar' shards in {path} (found "
                    f"{', '.join(sorted({p.name for p in found})[:5])})")
            found = named
        if not found:
            raise FileNotFoundError(f"no *.tar shards under {path}")
        return [str(p) for p in found]
    if _GLOB_CHARS.search(str(path)):
        matches = sorted(p for p in glob_with_braces(str(path)) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"no shards found at {part}")
        return matches
    names = list(braceexpand.braceexpand(str(path)))
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(names)} shard(s) of {part} do not "
                                f"exist (first: {missing[0]})")
    return names


def iter_tar_samples(url: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as dicts ``{"__key__", "__url__", ext: bytes...}`` (see above)."""
    from webdataset.gopen import gopen

    url = str(url)
    try:
        stream = gopen(url, "rb")
    except (OSError, ValueError) as err:  # missing file, unknown scheme...: unreadable
        raise ShardReadError(f"{url}: cannot open ({err})") from err
    finished = False
    try:
        yield from _grouped(stream, url)
        finished = True
    finally:
        try:
            stream.close()  # a pipe's command exiting with an error says so here
        except OSError as err:
            if finished:
                raise ShardReadError(f"{url}: {err}") from err


def _grouped(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """webdataset's ``group_by_keys`` over its ``tar_file_iterator``, plus one thing it cannot
    do: when the damage hits the first member of a sample, the sample before it is complete
    and stands (``group_by_keys`` only yields a sample once the next one's data is read)."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    announced: list[str] = []  # the member whose data is being read (named before the read)

    def note(name: str) -> bool:
        announced[:] = [name]
        return True

    current: dict[str, Any] | None = None
    try:
        for member in tar_file_iterator(stream, select_files=note):
            key, ext = base_plus_ext(member["fname"])
            if key is None:
                continue  # no extension (or a hidden file): not part of a sample
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current.setdefault(ext.lower(), member["data"])  # a repeated member: keep the first
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as err:
        next_key = base_plus_ext(announced[0])[0] if announced else None
        if current is not None and next_key is not None and next_key != current["__key__"]:
            yield current
        raise ShardReadError(f"{url}: unreadable shard ({err})") from err
    if current is not None:
        yield current
