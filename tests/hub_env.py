"""Point huggingface_hub at a HubServer (tests/hub_server.py) and at a fresh cache.

huggingface_hub reads its environment variables once, at import, into `huggingface_hub.constants`;
other modules copy some of them (`from .constants import HF_HUB_CACHE`), the module-level
functions (`model_info`, `list_repo_files`, ...) share an `HfApi` built at import, and the HTTP
client and the redirect allow-list are built once too. Setting HF_ENDPOINT in a test is therefore
not enough: this module patches all of those, and undoes it. huggingface_hub is imported inside.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hub_server import HubServer

_PACKAGES = ("huggingface_hub", "transformers", "open_clip", "timm", "imagefm")


@contextmanager
def huggingface_hub_pointed_at(server: HubServer, home: Path,
                               monkeypatch=None) -> Iterator[HubServer]:
    """Environment and already-imported huggingface_hub pointed at `server`, cache under `home`.

    Sets HF_ENDPOINT / HF_HOME / HF_HUB_CACHE (...) and patches `huggingface_hub.constants`,
    the copies loaded modules of huggingface_hub, transformers, open_clip, timm and imagefm took
    of them (same name, same value), `huggingface_hub.hf_api.api` and the redirect allow-list.
    Tokens from the environment or a token file are hidden, telemetry (and its user-agent
    look-ups) is off, proxies are unset, and the shared HTTP client is rebuilt. Everything is
    restored on exit, or by `monkeypatch` (pytest's) when given, so that a test's own
    monkeypatch.setenv("HF_TOKEN", ...) unwinds in order.
    """
    home = Path(home)
    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    undo_env: list[tuple[str, str | None]] = []
    undo_attr: list[tuple[object, str, object]] = []

    def setenv(key: str, value: str | None) -> None:
        if monkeypatch is not None and value is None:
            monkeypatch.delenv(key, raising=False)
            return
        if monkeypatch is not None:
            monkeypatch.setenv(key, value)
            return
        undo_env.append((key, os.environ.get(key)))
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

    def setattr_(obj, name: str, value) -> None:
        if monkeypatch is not None:
            monkeypatch.setattr(obj, name, value)
            return
        undo_attr.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    paths = {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_ASSETS_CACHE": home / "assets",
             "HF_XET_CACHE": home / "xet", "HF_TOKEN_PATH": home / "token",
             "HF_MODULES_CACHE": home / "modules"}
    for key, value in paths.items():
        setenv(key, str(value))
    setenv("HF_ENDPOINT", server.url)
    setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "TRANSFORMERS_CACHE",
                "HF_OIDC_ID_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_DISABLE_IMPLICIT_TOKEN",
                "HUGGINGFACE_CO_STAGING", "HF_DATASETS_OFFLINE",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        setenv(key, None)
    setenv("NO_PROXY", "127.0.0.1,localhost")
    setenv("no_proxy", "127.0.0.1,localhost")

    http = None
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    if constants is not None:
        from huggingface_hub import hf_api
        from huggingface_hub.utils import _http as http

        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        new = {"ENDPOINT": server.url, "HUGGINGFACE_CO_URL_TEMPLATE": template,
               "HF_HOME": str(home), "HF_HUB_CACHE": str(cache),
               "HUGGINGFACE_HUB_CACHE": str(cache), "default_cache_path": str(cache),
               "HF_ASSETS_CACHE": str(home / "assets"),
               "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
               "default_assets_cache_path": str(home / "assets"),
               "HF_XET_CACHE": str(home / "xet"), "HF_TOKEN_PATH": str(home / "token"),
               "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
               "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
               "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
               "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
               "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True,
               "HF_HUB_DISABLE_IMPLICIT_TOKEN": False, "HF_MODULES_CACHE": str(home / "modules")}
        old = {name: getattr(constants, name) for name in new if hasattr(constants, name)}
        old_modules_cache = os.path.join(old.get("HF_HOME", ""), "modules")
        for name, value in new.items():
            if name in old:
                setattr_(constants, name, value)
        if hasattr(constants, "HF_URL_HOSTS"):
            setattr_(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        # Copies taken with `from .constants import NAME` (e.g. utils._cache_manager.HF_HUB_CACHE,
        # transformers.utils.hub.HF_MODULES_CACHE): same name and the value read at import.
        for mod_name, module in list(sys.modules.items()):
            if module is None or module is constants or not mod_name.startswith(_PACKAGES):
                continue
            namespace = getattr(module, "__dict__", {})
            for name, value in new.items():
                before = old.get(name, old_modules_cache if name == "HF_MODULES_CACHE" else None)
                if name in namespace and before is not None and namespace[name] == before \
                        and not isinstance(before, bool):
                    setattr_(module, name, value)
        setattr_(hf_api.api, "endpoint", server.url)  # built at import: model_info, list_repo_files
        if hasattr(http, "_HUB_ORIGINS"):
            setattr_(http, "_HUB_ORIGINS", http._HUB_ORIGINS | {http._url_origin(server.url)})
        detect = sys.modules.get("huggingface_hub.utils._detect_agent")
        if detect is not None and hasattr(detect, "_registry"):
            setattr_(detect, "_registry", {"standardEnvVars": [], "harnesses": {}})
        http.close_session()  # the shared client read proxy settings when it was built
    server.home = home
    try:
        yield server
    finally:
        server.home = None
        for obj, name, value in reversed(undo_attr):
            setattr(obj, name, value)
        for key, value in reversed(undo_env):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if http is not None:
            http.close_session()
