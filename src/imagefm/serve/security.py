"""Request-size limit, security headers and the optional API key.

The size limit is an ASGI middleware because it must hold whether or not a client sends
``Content-Length`` (chunked bodies are counted as they arrive) and before any route parses JSON.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The page loads only its own script and style; images may be data:/blob: URLs (thumbnails
# fetched with the API key header become blob: URLs). Nothing may frame the page.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
]


def error_json(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


class LimitsAndHeaders:
    """Refuse bodies over ``max_bytes`` with 413 and add security headers to every response."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message["headers"] = headers
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send_with_headers, declared)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing (anything else
                    # becomes "400 error parsing the body") to the JSON error handlers.
                    raise HTTPException(413, self.message(received))
            return message

        try:
            await self.app(scope, counting_receive, send_with_headers)
        except HTTPException as err:  # raised where no handler sees it
            if started or err.status_code != 413:
                raise
            await self._refuse(send_with_headers, received)

    def message(self, size: int) -> str:
        return (f"request body of {size} bytes or more is larger than the limit of "
                f"{self.max_bytes} bytes")

    async def _refuse(self, send: Send, size: int) -> None:
        body = error_json(413, self.message(size), "request_too_large")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def key_matches(expected: str, authorization: str | None, x_api_key: str | None) -> bool:
    """True when ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` carries the key
    (compared in constant time)."""
    given = None
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    elif x_api_key:
        given = x_api_key.strip()
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
