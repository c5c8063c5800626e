"""Serve a model over HTTP. A dual encoder: embeddings (OpenAI-shaped), zero-shot, search, a web
page. A VLM or language model: chat completions (OpenAI's chat API, streaming included).

    from imagefm.serve import create_app, run_server
    app = create_app(model, index=index)            # a FastAPI app (tests, embedding elsewhere)
    run_server(model, index=index, settings=ServeSettings(port=8000))
    run_server(vlm)                                 # POST /v1/chat/completions

Modules: ``settings`` (limits and defaults), ``batching`` (dynamic batching), ``engine`` (model,
decoding, zero-shot, search), ``security`` (size limit, headers, API key), ``schemas``
(request/response bodies), ``app`` (routes), ``chat`` (the chat completions app). FastAPI and
uvicorn are imported only here, never by ``import imagefm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagefm.serve.settings import ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServeSettings", "create_app", "run_server"]


def create_app(model: Any, processor: Any = None, index: Any = None,
               settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app; see ``imagefm.serve.app``."""
    try:
        from imagefm.serve.app import create_app as _create_app
    except ImportError as err:
        raise ImportError("serving needs FastAPI and uvicorn: pip install 'imagefm[serve]'"
                          ) from err
    return _create_app(model, processor, index, settings)


def run_server(model: Any, processor: Any = None, index: Any = None,
               settings: ServeSettings | None = None, *, log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn, one process: the model lives in it)."""
    import uvicorn

    settings = settings or ServeSettings()
    app = create_app(model, processor, index, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level,
                timeout_keep_alive=30, limit_max_requests=None)
