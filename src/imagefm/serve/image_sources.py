"""Where the images of a chat request come from: its ``image_url`` parts, as OpenAI sends them.

- ``data:image/...;base64,...`` URLs: always;
- ``http://`` / ``https://`` URLs: only from the hosts in ``ServeSettings.image_url_hosts``
  (none by default: a server that fetches whatever URL it is sent can be made to reach the
  machines behind it). Fetched beside the event loop, redirects not followed, at most
  ``max_request_bytes``, within ``timeout_s``;
- files (``file:///...`` URLs or plain paths, relative ones under the folder): only inside
  ``ServeSettings.image_dir`` (unset by default), symlinks and ``..`` resolved before the check.

:func:`image_source` applies these rules when the request arrives (400 at once, nothing
fetched); :meth:`ImageSource.read` fetches or reads on the prompt pool.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from imagefm.serve.engine import BadInput, decode_base64_image
from imagefm.serve.settings import ServeSettings

DATA_EXAMPLE = "data:image/png;base64,..."


@dataclass(frozen=True)
class ImageSource:
    """One image of a request: its bytes already (a data URL), a URL to fetch or a file."""

    where: str
    data: bytes | None = None
    url: str | None = None
    path: Path | None = None

    def read(self, settings: ServeSettings) -> bytes | Path:
        """The image's bytes (or its file); BadInput when it cannot be had."""
        if self.data is not None:
            return self.data
        if self.path is not None:
            return _check_file(self.path, self.where, settings)
        assert self.url is not None
        return _fetch(self.url, self.where, settings)


def image_source(url: str, where: str, settings: ServeSettings) -> ImageSource:
    """The source an ``image_url`` names, if the server's settings allow it (else BadInput)."""
    if not url:
        raise BadInput(f"{where}: image_url.url is missing")
    if url[:5].lower() == "data:":
        return ImageSource(where, data=decode_base64_image(url, f"{where}.image_url"))
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        hosts = settings.image_url_hosts
        if not hosts:
            raise BadInput(f"{where}: {_accepted(settings)}; this server fetches no URLs "
                           f"({scheme!r} given)")
        host = (parts.hostname or "").lower()
        if "*" not in hosts and host not in {h.lower() for h in hosts}:
            raise BadInput(f"{where}: this server fetches images from {', '.join(hosts)} only, "
                           f"not from {host!r}")
        return ImageSource(where, url=url)
    if scheme == "file" or (not scheme and url[:1] not in ("", "#")):
        if settings.image_dir is None:
            given = "a file" if scheme == "file" or not scheme else repr(scheme)
            raise BadInput(f"{where}: {_accepted(settings)}; this server reads no local files "
                           f"({given} given)")
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise BadInput(f"{where}: a file URL names no host (file:///path)")
        path = Path(urllib.parse.unquote(parts.path) if scheme == "file" else url)
        return ImageSource(where, path=_inside(path, settings.image_dir, where))
    raise BadInput(f"{where}: {_accepted(settings)} ({scheme!r} given)")


def _accepted(settings: ServeSettings) -> str:
    kinds = [f"data URLs ({DATA_EXAMPLE})"]
    if settings.image_url_hosts:
        kinds.append(f"http(s) URLs from {', '.join(settings.image_url_hosts)}")
    if settings.image_dir is not None:
        kinds.append("files in the server's image folder")
    return "only " + " and ".join(kinds) + " are accepted"


def _inside(path: Path, root: str, where: str) -> Path:
    """``path`` (relative ones under ``root``) resolved, when it lies inside ``root``."""
    base = Path(root).expanduser().resolve()
    resolved = (base / path).resolve()  # an absolute path stays itself
    if not resolved.is_relative_to(base):
        raise BadInput(f"{where}: the file is outside the server's image folder")
    return resolved


def _check_file(path: Path, where: str, settings: ServeSettings) -> Path:
    if not path.is_file():
        raise BadInput(f"{where}: no image file {path.name!r} in the server's image folder", 404)
    size = path.stat().st_size
    if size > settings.max_request_bytes:
        raise BadInput(f"{where}: the file is {size} bytes, more than the limit of "
                       f"{settings.max_request_bytes}", 413)
    return path


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead anywhere, past the host list: it is an error instead."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _fetch(url: str, where: str, settings: ServeSettings) -> bytes:
    limit = settings.max_request_bytes
    opener = urllib.request.build_opener(_NoRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "imagefm",
                                                   "Accept": "image/*"})
    try:
        with opener.open(request, timeout=settings.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise BadInput(f"{where}: the image is {declared} bytes, more than the limit "
                               f"of {limit}", 413)
            data = response.read(limit + 1)
    except urllib.error.HTTPError as err:
        raise BadInput(f"{where}: fetching the image failed: HTTP {err.code}"
                       + (" (redirects are not followed)" if 300 <= err.code < 400 else "")
                       ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise BadInput(f"{where}: fetching the image failed: {reason}") from None
    if len(data) > limit:
        raise BadInput(f"{where}: the image is more than the limit of {limit} bytes", 413)
    if not data:
        raise BadInput(f"{where}: the image is empty")
    return data
