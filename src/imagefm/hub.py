"""Hugging Face Hub ids → local folders, through ``huggingface_hub`` and its cache.

    resolve_hub("google/siglip-base-patch16-224")          # → .../snapshots/<commit>/
    resolve_hub("hf-hub:timm/ViT-B-16-SigLIP", revision="v1.0")

Everything is ``huggingface_hub``'s: its cache layout (``HF_HUB_CACHE`` / ``HF_HOME``), offline
mode (``HF_HUB_OFFLINE=1``: no network call, the cache only), ``HF_ENDPOINT``, tokens
(``HF_TOKEN``, ``hf auth login`` or ``token=``) and revisions (branch, tag or commit).

Only the files a format needs are fetched: first the small ones (configs, tokenizer, chat
template), which say what the checkpoint is; then its weights, safetensors first — a pickle
(``pytorch_model.bin``) only when a repo has nothing else, read with
``torch.load(weights_only=True)`` (imagefm.checkpoint says so when it does). Every failure a user
can meet (unknown or private repo, gated repo, missing revision, no network and nothing cached)
is one :class:`HubError` line naming the repo and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imagefm.checkpoint import CheckpointError

HUB_PREFIX = "hf-hub:"
# org/name as the Hub spells repo ids (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# The small files that say what a checkpoint is and how to feed it (never weights).
METADATA_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
# Weight files in the order we take them: safetensors, then a pickle when there is nothing else.
_HF_WEIGHTS = (("model.safetensors",), ("model.safetensors.index.json",),
               ("pytorch_model.bin",), ("pytorch_model.bin.index.json",))
_OPEN_CLIP_WEIGHTS = (("open_clip_model.safetensors",), ("open_clip_pytorch_model.bin",))


class HubError(CheckpointError):
    """A hub id could not be turned into a local folder: the message names the repo and the fix."""


def parse_hub_id(source: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for a hub id — ``org/name``, ``hf-hub:org/name``, either with
    ``@revision`` — or None for a local path. A folder or file that exists always wins:
    ``runs/model`` on disk is a path, not a repo."""
    text = str(source)
    prefixed = text.startswith(HUB_PREFIX)
    if prefixed:
        text = text[len(HUB_PREFIX):]
    elif Path(text).exists():
        return None
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.match(repo_id) or (_ and not revision):
        if prefixed:
            raise HubError(f"{source!r} is not a hub id: expected hf-hub:org/name[@revision]")
        return None
    return repo_id, revision or None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache(cache_dir: str | Path | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _explain(err: Exception, repo_id: str, revision: str | None,
             cache_dir: str | Path | None) -> HubError:
    """One line for each way a download fails, saying what to do."""
    from huggingface_hub import errors

    where = f"{_endpoint()}/{repo_id}"
    if isinstance(err, errors.GatedRepoError):
        return HubError(f"{repo_id} is gated: accept its conditions at {where} with your Hub "
                        f"account, then log in (`hf auth login`, HF_TOKEN or token=)")
    if isinstance(err, errors.RepositoryNotFoundError):
        return HubError(f"{repo_id}: no such model on the Hub ({_endpoint()}), or it is private: "
                        f"check the id; for a private repo log in (`hf auth login`, HF_TOKEN or "
                        f"token=)")
    if isinstance(err, errors.RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {revision!r}: give a branch, tag or full "
                        f"commit hash that exists ({where}/commits/main)")
    if isinstance(err, errors.LocalEntryNotFoundError):
        if _offline():
            return HubError(f"{repo_id} (revision {revision or 'main'}) is not in the Hub cache "
                            f"({_cache(cache_dir)}) and HF_HUB_OFFLINE is set: fill the cache "
                            f"with `imagefm download {repo_id}` where there is network, or unset "
                            f"HF_HUB_OFFLINE")
        return HubError(f"cannot reach the Hub ({_endpoint()}) to download {repo_id}, and it is "
                        f"not in the cache ({_cache(cache_dir)}): check the network or "
                        f"HF_ENDPOINT, or fill the cache ahead with `imagefm download {repo_id}`")
    if isinstance(err, errors.EntryNotFoundError):
        return HubError(f"{repo_id}: a file imagefm needs is not in the repo "
                        f"({str(err).splitlines()[0][:200]})")
    first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
    return HubError(f"{repo_id}: the Hub download failed: {first}")


def _snapshot(repo_id: str, revision: str | None, patterns: list[str],
              cache_dir: str | Path | None, token: str | bool | None) -> Path:
    from huggingface_hub import errors, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      cache_dir=cache_dir, token=token))
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
            OSError) as err:
        raise _explain(err, repo_id, revision, cache_dir) from None


def _repo_files(repo_id: str, folder: Path, token: str | bool | None) -> list[str]:
    """Every file of the commit ``folder`` holds: asked of the Hub when it can be reached,
    otherwise (offline, no network) the files already in the cache."""
    local = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if _offline():
        return local
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(repo_id, revision=folder.name, token=token)
    except Exception:  # noqa: BLE001 - unreachable Hub: the cache is what we have
        return local


def _first_present(files: set[str], choices: Iterable[tuple[str, ...]]) -> list[str]:
    for names in choices:
        if all(name in files for name in names):
            return list(names)
    return []


def weight_files(folder: Path, files: list[str], filename: str | None = None) -> list[str]:
    """The weight files a checkpoint needs, chosen from the repo's ``files`` after its small
    files (in ``folder``) said what format it is."""
    present = set(files)
    if filename is not None:
        if filename not in present:
            raise HubError(f"{folder.name}: no file {filename!r} in the repo; it has "
                           f"{', '.join(sorted(present))[:400]}")
        return [filename]
    if "imagefm.json" in present:
        return ["model.safetensors"]
    if "open_clip_config.json" in present:
        return _first_present(present, _OPEN_CLIP_WEIGHTS)
    if "config.json" in present:
        chosen = _first_present(present, _HF_WEIGHTS)
        for name in list(chosen):
            if name.endswith(".index.json"):
                index = json.loads((folder / name).read_text(encoding="utf-8"))
                chosen += sorted(set(index.get("weight_map", {}).values()))
        return chosen
    ggufs = sorted(f for f in present if f.endswith(".gguf"))
    if len(ggufs) > 1:
        raise HubError(f"the repo holds {len(ggufs)} GGUF files ({', '.join(ggufs[:8])}"
                       f"{' ...' if len(ggufs) > 8 else ''}): pick one with filename=... "
                       f"(--filename on the command line)")
    return ggufs


def resolve_hub(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                token: str | bool | None = None, filename: str | None = None) -> Path:
    """Download (or find in the cache) what imagefm needs of ``repo_id``; the local folder.

    ``filename`` picks one weight file (a GGUF repo holds one per quantisation); the result is
    then that file's path instead of the folder.
    """
    folder = _snapshot(repo_id, revision, METADATA_PATTERNS, cache_dir, token)
    files = _repo_files(repo_id, folder, token)
    weights = weight_files(folder, files, filename)
    if not weights:
        raise HubError(f"{repo_id} holds no checkpoint imagefm reads (no imagefm.json, "
                       f"config.json, open_clip_config.json or .gguf file among "
                       f"{len(files)} files)")
    # Pinned to the commit just resolved, so the weights match the configs we read.
    folder = _snapshot(repo_id, folder.name, weights, cache_dir, token)
    if weights[0].endswith(".gguf"):
        return folder / weights[0]
    return folder


TEXT_MODEL_PATTERNS = ["config.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json"]


def fetch_text_model_files(name: str, *, cache_dir: str | Path | None = None,
                           token: str | bool | None = None) -> Path:
    """The config.json and tokenizer files of the Hugging Face text model ``name`` (an open_clip
    checkpoint names its text tower this way, e.g. ``xlm-roberta-base``), from the Hub cache or
    the Hub; never its weights (the open_clip checkpoint holds them)."""
    return _snapshot(name, None, TEXT_MODEL_PATTERNS, cache_dir, token)


def describe_download(path: Path) -> dict[str, Any]:
    """What a downloaded snapshot holds (for ``imagefm download``'s summary)."""
    files = [p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()]
    return {"path": str(path), "files": len(files),
            "bytes": sum(p.stat().st_size for p in files)}
