"""A Hugging Face Hub of our own on 127.0.0.1, for tests that load models by hub id.

No test may reach the real Hub, so this module answers the requests `huggingface_hub` makes
(checked against huggingface_hub 2.5; older versions make a subset of them) the way the Hub does:

  HEAD/GET /{repo}/resolve/{rev}/{file}    file metadata (ETag, X-Repo-Commit, sizes) and bytes;
                                           weight-like files are "LFS": a 302 to a second server on
                                           another port (the CDN) with X-Linked-Etag (sha256) and
                                           X-Linked-Size, as the Hub redirects to its CDN
  GET /api/models/{repo}[/revision/{rev}]  model_info / repo_info: id, sha, siblings, gated, ...
  GET /api/models/{repo}/tree/{rev}[/dir]  list_repo_tree / list_repo_files / snapshot_download
  GET /api/models/{repo}/refs              list_repo_refs

Errors carry the Hub's `X-Error-Code` header, which `hf_raise_for_status` turns into
RepositoryNotFoundError (401 without a token, 404 with one), GatedRepoError (401/403),
RevisionNotFoundError and RemoteEntryNotFoundError (404). No Xet headers, so huggingface_hub
downloads over plain HTTP. Revisions: branch names, tags and full commit shas.

tests/hub_env.py points huggingface_hub at it (the `hub` fixture in conftest.py uses both).
Stdlib only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_TOKEN = "hf_imagefmTestToken"
# Files the Hub's default .gitattributes sends to LFS (and so to the CDN).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5",
                ".msgpack", ".model", ".npy", ".npz", ".pkl", ".zip", ".tar", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024
_COMMIT_COUNTER = itertools.count()
_DATE = "2024-01-01T00:00:00.000Z"


class HubRequest(NamedTuple):
    """One request either server answered. `path` is unquoted and has no query string."""

    method: str
    path: str
    query: str
    server: str  # "hub" or "cdn"
    status: int
    authorization: str | None
    repo_id: str | None = None
    filename: str | None = None  # set for /resolve/ and CDN requests


@dataclass
class _File:
    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()

    @cached_property
    def blob_id(self) -> str:
        """The git blob sha1 (of the LFS pointer for LFS files), as the Hub's `oid`."""
        body = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class _Repo:
    repo_id: str
    gated: bool = False
    private: bool = False
    token: str = DEFAULT_TOKEN
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    default_branch: str = "main"

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        return revision if revision in self.commits else None


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


def _read_files(files: dict[str, bytes | str] | Path, lfs) -> dict[str, _File]:
    if isinstance(files, (str, Path)):
        root = Path(files)
        if not root.is_dir():
            raise ValueError(f"add_repo: {root} is not a folder")
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                 if p.is_file() and ".git" not in p.relative_to(root).parts}
    out = {}
    for name, data in files.items():
        data = data.encode() if isinstance(data, str) else bytes(data)
        is_lfs = lfs(name, data) if lfs is not None else (
            name.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE)
        out[name] = _File(data, bool(is_lfs))
    return out


class _NoSleep:
    """The time module with a sleep that returns at once (see HubServer.stopped)."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


class HubServer:
    """A Hub on 127.0.0.1 (port 0 unless given) plus its CDN on a second port.

    `add_repo` publishes commits; `requests` / `log` / `downloaded()` tell what clients asked for.
    Use as a context manager or with start()/stop(); `url` is what HF_ENDPOINT should hold.
    """

    def __init__(self, port: int = 0):
        self._repos: dict[str, _Repo] = {}
        self._log: list[HubRequest] = []
        self._lock = threading.Lock()
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self._ports = {"hub": port, "cdn": 0}
        self.home: Path | None = None  # set by huggingface_hub_pointed_at

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubServer:
        for name in ("cdn", "hub"):
            if name in self._servers:
                continue
            handler = type(f"_{name}_handler", (_Handler,), {"hub": self, "server_name": name})
            server = ThreadingHTTPServer(("127.0.0.1", self._ports[name]), handler)
            server.daemon_threads = True
            self._ports[name] = server.server_address[1]  # a restart keeps the same url
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True, name=f"hub-server-{name}").start()
            self._servers[name] = server
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        self._servers.clear()

    @property
    def running(self) -> bool:
        return bool(self._servers)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._ports['hub']}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._ports['cdn']}"

    # ---- content ---------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes | str] | Path, revision: str = "main",
                 tags: tuple[str, ...] | list[str] = (), gated: bool = False,
                 token: str | None = None, private: bool = False, lfs=None) -> str:
        """Commit `files` (the whole tree of the new commit) on branch `revision` of `repo_id`;
        returns the commit sha. Earlier commits stay reachable by sha; `tags` point at the new
        commit. `gated`/`private` repos serve files only to `Authorization: Bearer <token>`
        (`token` defaults to DEFAULT_TOKEN); gated repos keep metadata and listings public, as
        the Hub does. `lfs(name, data) -> bool` overrides which files go through the CDN."""
        if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
            raise ValueError("add_repo: revision must be a branch name, not a commit sha")
        tree = _read_files(files, lfs)
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                repo = self._repos[repo_id] = _Repo(repo_id, default_branch=revision)
            repo.gated, repo.private, repo.token = gated, private, token or DEFAULT_TOKEN
            parent = repo.branches.get(revision, "")
            digest = hashlib.sha1(f"{repo_id}\n{revision}\n{parent}\n{next(_COMMIT_COUNTER)}\n"
                                  .encode())
            for name in sorted(tree):
                digest.update(f"{name}\0{tree[name].etag}\n".encode())
            sha = digest.hexdigest()
            repo.commits[sha] = tree
            repo.branches[revision] = sha
            for tag in tags:
                repo.tags[tag] = sha
        return sha

    def snapshot_dir(self, repo_id: str, commit: str) -> Path:
        """Where huggingface_hub puts `commit` of `repo_id` in the cache this server's env uses."""
        if self.home is None:
            raise RuntimeError("snapshot_dir needs huggingface_hub_pointed_at (the `hub` fixture)")
        return self.home / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit

    # ---- what clients asked for ------------------------------------------------------------
    @property
    def log(self) -> list[HubRequest]:
        with self._lock:
            return list(self._log)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request to the Hub or its CDN, oldest first."""
        return [(r.method, r.path) for r in self.log]

    def downloaded(self, repo_id: str | None = None) -> list[str]:
        """Files whose bytes were sent (GET answered 200/206 by the Hub or the CDN), in order."""
        return [r.filename for r in self.log if r.method == "GET" and r.status in (200, 206)
                and r.filename is not None and (repo_id is None or r.repo_id == repo_id)]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def _record(self, request: HubRequest) -> None:
        with self._lock:
            self._log.append(request)

    # ---- no network ------------------------------------------------------------------------
    @contextmanager
    def stopped(self, wait_retries: bool = False) -> Iterator[None]:
        """The Hub unreachable (connection refused), as with no network; restarted after.

        On a connection error with nothing cached, hf_hub_download retries 5 times with backoff
        (~23 s of sleep); unless `wait_retries`, those sleeps are skipped (the retries still run).
        """
        was_running = self.running
        self.stop()
        patched = []
        if not wait_retries:
            for name in ("huggingface_hub.utils._http", "huggingface_hub.file_download"):
                module = sys.modules.get(name)
                if module is not None and getattr(module, "time", None) is time:
                    patched.append(module)
                    module.time = _NoSleep()
        try:
            yield
        finally:
            for module in patched:
                module.time = time
            if was_running:
                self.start()

    @contextmanager
    def offline(self, stop_server: bool = True) -> Iterator[None]:
        """HF_HUB_OFFLINE=1 (environment and huggingface_hub.constants), and the server stopped
        so a load must come from the cache; both restored after. `stop_server=False` keeps it
        listening, so a test can assert that `requests` stayed empty."""
        old_env = os.environ.get("HF_HUB_OFFLINE")
        constants = sys.modules.get("huggingface_hub.constants")
        old_flag = getattr(constants, "HF_HUB_OFFLINE", None)
        os.environ["HF_HUB_OFFLINE"] = "1"
        if constants is not None:
            constants.HF_HUB_OFFLINE = True
        try:
            if stop_server:
                with self.stopped():
                    yield
            else:
                yield
        finally:
            if old_env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old_env
            if constants is not None:
                constants.HF_HUB_OFFLINE = old_flag

    # ---- answers ---------------------------------------------------------------------------
    def _repo(self, repo_id: str, auth: str | None, files: bool) -> _Repo:
        repo = self._repos.get(repo_id)
        token = auth[7:] if auth and auth.lower().startswith("bearer ") else None
        if repo is None or (repo.private and token != repo.token):
            # The Hub cannot tell "missing" from "private": 401 to anonymous users, 404 otherwise.
            raise _Error(401 if auth is None else 404, "RepoNotFound", "Repository not found")
        if files and repo.gated and token != repo.token:
            if auth is None:
                raise _Error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must "
                             "have access to it and be authenticated to access it. Please log in.")
            raise _Error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are "
                         f"not in the authorized list. Visit {self.url}/{repo_id} to ask for "
                         "access.")
        return repo

    def _commit(self, repo: _Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
        """`org/name/<rest>` or a legacy one-part `name/<rest>`: a known two-part id first."""
        if parts and parts[0] in self._repos and "/".join(parts[:2]) not in self._repos:
            return parts[0], parts[1:]
        return "/".join(parts[:2]), parts[2:]

    def _model_info(self, repo: _Repo, sha: str, query: dict[str, list[str]]) -> dict:
        tree = repo.commits[sha]
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, f in sorted(tree.items()):
            entry = {"rfilename": name}
            if blobs:
                entry.update(size=len(f.data), blobId=f.blob_id)
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": len(f.data),
                                    "pointerSize": len(f.pointer)}
            siblings.append(entry)
        info = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0] if "/" in
                repo.repo_id else None, "sha": sha, "lastModified": _DATE, "createdAt": _DATE,
                "private": repo.private, "gated": "manual" if repo.gated else False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "spaces": [], "usedStorage": sum(len(f.data) for f in tree.values())}
        try:  # the Hub lifts these two out of config.json
            config = json.loads(tree["config.json"].data)
            info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        except (KeyError, ValueError, TypeError):
            pass
        expand = query.get("expand") or query.get("expand[]")
        if expand:  # only the fields asked for, as the Hub answers `expand=`
            info = {k: v for k, v in info.items() if k in expand or k in ("_id", "id")}
        return info

    def _tree(self, repo: _Repo, sha: str, path: str, recursive: bool) -> list[dict]:
        entries: dict[str, dict] = {}
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        for name, f in repo.commits[sha].items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # folders on the way
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    oid = hashlib.sha1(f"tree {sha} {folder}".encode()).hexdigest()
                    entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0,
                                                "path": folder})
            if recursive or len(rest) == 1:
                entry = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": name}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data),
                                    "pointerSize": len(f.pointer)}
                entries[name] = entry
        if prefix and not entries:
            raise _Error(404, "EntryNotFound", f"{path} does not exist on this revision")
        return [entries[k] for k in sorted(entries)]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    server_name: str
    server_version = "imagefm-test-hub/1"

    def log_message(self, format, *args) -> None:  # quiet: the log is HubServer.log
        pass

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def _handle(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        auth = self.headers.get("Authorization")
        self._repo_id = self._filename = None
        try:
            if self.server_name == "cdn":
                status, headers, body = self._cdn(parts)
            else:
                status, headers, body = self._hub(parts, parse_qs(url.query), auth)
        except _Error as e:
            status = e.status
            body = json.dumps({"error": e.message}).encode()
            headers = {"Content-Type": "application/json; charset=utf-8",
                       "X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
        status, headers, body = self._apply_range(status, headers, body)
        self.hub._record(HubRequest(self.command, unquote(url.path), url.query, self.server_name,
                                    status, auth, self._repo_id, self._filename))
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _apply_range(self, status: int, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        spec = self.headers.get("Range")
        if status != 200 or not spec or not spec.startswith("bytes=") or "," in spec:
            return status, headers, body
        start_s, _, end_s = spec[6:].partition("-")
        start = int(start_s) if start_s else max(len(body) - int(end_s), 0)
        end = int(end_s) if start_s and end_s else len(body) - 1
        if start >= len(body):
            return 416, {"Content-Range": f"bytes */{len(body)}"}, b""
        end = min(end, len(body) - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
        return 206, headers, body[start:end + 1]

    def _json(self, data) -> tuple[int, dict, bytes]:
        return 200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(data).encode()

    def _hub(self, parts: list[str], query: dict, auth: str | None) -> tuple[int, dict, bytes]:
        hub = self.hub
        if parts[:2] == ["api", "models"]:
            repo_id, rest = hub._split_repo(parts[2:])
            self._repo_id = repo_id
            with hub._lock:
                repo = hub._repo(repo_id, auth, files=False)
                if not rest or rest == [""]:
                    return self._json(hub._model_info(repo, hub._commit(repo, repo.default_branch),
                                                      query))
                if rest[0] == "revision" and len(rest) == 2:
                    return self._json(hub._model_info(repo, hub._commit(repo, rest[1]), query))
                if rest[0] == "tree" and len(rest) >= 2:
                    recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                    return self._json(hub._tree(repo, hub._commit(repo, rest[1]),
                                                "/".join(rest[2:]), recursive))
                if rest == ["refs"]:
                    def refs(kind, names):
                        return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s}
                                for n, s in sorted(names.items())]
                    return self._json({"branches": refs("heads", repo.branches), "converts": [],
                                       "tags": refs("tags", repo.tags), "pullRequests": []})
            raise _Error(404, None, f"Not Found: /{'/'.join(parts)}")
        repo_id, rest = hub._split_repo(parts)
        if len(rest) < 3 or rest[0] != "resolve":
            raise _Error(404, None, f"Not Found: /{'/'.join(parts)}")
        self._repo_id, self._filename = repo_id, "/".join(rest[2:])
        with hub._lock:
            repo = hub._repo(repo_id, auth, files=True)
            sha = hub._commit(repo, rest[1])
            f = repo.commits[sha].get(self._filename)
        if f is None:
            raise _Error(404, "EntryNotFound", "Entry not found", commit=sha)
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if f.lfs:  # the Hub redirects LFS files to its CDN, naming the blob in X-Linked-*
            headers.update({"Location": f"{hub.cdn_url}/lfs/{f.sha256}/{quote(repo_id, safe='')}/"
                            f"{quote(self._filename)}", "ETag": f'"{f.blob_id}"',
                            "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))})
            return 302, headers, b""
        headers.update({"ETag": f'"{f.blob_id}"', "Content-Type": "application/octet-stream"})
        return 200, headers, f.data

    def _cdn(self, parts: list[str]) -> tuple[int, dict, bytes]:
        # /lfs/{sha256}/{quoted repo id}/{filename}: only the sha256 matters, the rest is for logs
        if len(parts) < 4 or parts[0] != "lfs":
            raise _Error(404, None, "NoSuchKey")
        sha256, self._repo_id, self._filename = parts[1], parts[2], "/".join(parts[3:])
        with self.hub._lock:
            blobs = (f for repo in self.hub._repos.values() for tree in repo.commits.values()
                     for f in tree.values() if f.lfs and f.sha256 == sha256)
            f = next(blobs, None)
        if f is None:
            raise _Error(404, None, "NoSuchKey")
        return 200, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes",
                     "Content-Type": "application/octet-stream"}, f.data
