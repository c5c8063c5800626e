"""The HTTP API and web page (FastAPI).

    POST /v1/embeddings   text and image embeddings, OpenAI-shaped
    POST /v1/classify     zero-shot classification of an image among given labels
    POST /v1/search       text or image query against the index
    GET  /v1/models       the served model, OpenAI-shaped
    POST /v1/chat/completions  (a served VLM or language model instead: see serve/chat.py)
    GET  /v1/thumbnails/{id}, /v1/images/{id}   files of the index, by row id only
    GET  /healthz         liveness, index size, queue depths, batching counters
    GET  /                the web page (static/index.html + app.js + style.css)

Errors are JSON ``{"error": {"message", "type", "code"}}`` with the matching status: 400 bad
input, 401 missing/wrong key, 404 unknown model/image/route, 413 too large, 422 malformed
request, 429 queue full (with Retry-After), 504 timed out. Files are only ever served by id from
the index (no path in any URL is opened), after checking that they still lie inside the indexed
folder.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagefm.serve import schemas
from imagefm.serve.batching import QueueFullError
from imagefm.serve.engine import BadInput, Engine, decode_base64_image
from imagefm.serve.security import LimitsAndHeaders, key_matches
from imagefm.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

STATIC_FILES = {  # the only files the page needs; nothing else under static/ is reachable
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
               ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp",
               ".tif": "image/tiff", ".tiff": "image/tiff"}


class ApiError(Exception):
    """An error answered as JSON with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _error(status: int, message: str, kind: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(model: Any, processor: Any = None, index: Any = None,
               settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (and searching ``index`` when given). A VLM or
    language model gets the chat completions API instead (``imagefm.serve.chat``)."""
    from imagefm.apps.vlm_chat import is_chat_model

    settings = settings or ServeSettings()
    name = settings.model_name or _default_model_name(model, index)
    if is_chat_model(model):
        if index is not None:
            raise ValueError(f"an index is searched with a dual encoder; a "
                             f"{type(model).__name__} generates text")
        from imagefm.serve.chat import create_chat_app

        return create_chat_app(model, processor, settings, name)
    engine = Engine(model, processor, index, settings, name)
    created = int(time.time())

    app = new_app(settings, engine)
    check_model = model_checker(name)
    v1 = v1_router(settings)

    @v1.post("/embeddings", response_model=schemas.EmbeddingResponse)
    async def embeddings(body: schemas.EmbeddingRequest) -> Response:
        check_model(body.model)
        items = [body.input] if isinstance(body.input, str) else list(body.input)
        if not items:
            raise ApiError(400, "input is empty")
        if len(items) > settings.max_inputs:
            raise ApiError(413, f"{len(items)} inputs is more than the limit of "
                                f"{settings.max_inputs} per request", "request_too_large")
        if body.dimensions is not None and body.dimensions != engine.embed_dim:
            raise ApiError(400, f"dimensions={body.dimensions} is not supported: this model's "
                                f"embeddings have {engine.embed_dim}")
        texts, images = _split_inputs(items, body.input_type, engine)
        vectors: list[np.ndarray | None] = [None] * len(items)
        tokens = 0
        if texts:
            text_vectors, tokens = await engine.embed_texts([t for _, t in texts])
            for (i, _), vector in zip(texts, text_vectors, strict=True):
                vectors[i] = vector
        if images:
            image_vectors = await engine.embed_images([b for _, b in images],
                                                      [f"input[{i}]" for i, _ in images])
            for (i, _), vector in zip(images, image_vectors, strict=True):
                vectors[i] = vector
        data = [schemas.Embedding(index=i, embedding=_encode_vector(v, body.encoding_format))
                for i, v in enumerate(vectors)]
        reply = schemas.EmbeddingResponse(data=data, model=name,
                                          usage=schemas.Usage(prompt_tokens=tokens,
                                                              total_tokens=tokens))
        # Serialised here: FastAPI would validate the reply against response_model again and
        # encode it through jsonable_encoder, 0.22 ms per 512-d vector against 0.05 ms.
        return Response(reply.model_dump_json(), media_type="application/json")

    @v1.post("/classify", response_model=schemas.ClassifyResponse)
    async def classify(body: schemas.ClassifyRequest) -> schemas.ClassifyResponse:
        check_model(body.model)
        if len(body.labels) > settings.max_labels:
            raise ApiError(413, f"{len(body.labels)} labels is more than the limit of "
                                f"{settings.max_labels}", "request_too_large")
        labels = [engine.check_text(label, f"labels[{i}]") for i, label in enumerate(body.labels)]
        if len(set(labels)) != len(labels):
            raise ApiError(400, "labels must be distinct")
        blob = decode_base64_image(body.image, "image")
        scores, multi_label = await engine.classify(blob, labels, body.lang)
        if body.top_k is not None:
            scores = scores[: body.top_k]
        return schemas.ClassifyResponse(
            model=name, multi_label=multi_label,
            labels=[schemas.LabelScore(label=label, probability=p, logit=logit)
                    for label, p, logit in scores])

    @v1.post("/search", response_model=schemas.SearchResponse)
    async def search(body: schemas.SearchRequest) -> schemas.SearchResponse:
        check_model(body.model)
        started = time.perf_counter()
        if (body.query is None) == (body.image is None):
            raise ApiError(400, "give exactly one of 'query' (text) or 'image' (base64)")
        if body.k > settings.max_k:
            raise ApiError(400, f"k={body.k} is more than the limit of {settings.max_k}")
        if engine.index is None:
            raise ApiError(404, "this server has no index: start it with --index INDEX",
                           "not_found_error")
        if body.query is not None:
            query_type = "text"
            vector = (await engine.embed_texts([engine.check_text(body.query, "query")]))[0][0]
        else:
            query_type = "image"
            blob = decode_base64_image(body.image or "", "image")
            vector = (await engine.embed_images([blob], ["image"]))[0]
        hits = await engine.search(vector, body.k)
        results = [schemas.SearchResult(id=h.id, path=h.path, score=h.score, width=h.width,
                                        height=h.height, thumbnail_url=f"/v1/thumbnails/{h.id}",
                                        image_url=f"/v1/images/{h.id}") for h in hits]
        return schemas.SearchResponse(query_type=query_type, results=results,
                                      took_ms=round((time.perf_counter() - started) * 1000, 2))

    @v1.get("/models", response_model=schemas.ModelList, response_model_exclude_none=True)
    async def models() -> schemas.ModelList:
        card = engine.image_processor.card
        model_type = getattr(getattr(model, "config", None), "model_type", "clip")
        return schemas.ModelList(data=[schemas.ModelCard(
            id=name, created=created, model_type=model_type, embed_dim=engine.embed_dim,
            image_size=card.image_size)])

    @v1.get("/thumbnails/{image_id}")
    async def thumbnail(image_id: int, size: int = Query(256, ge=16, le=1024)) -> Response:
        data = await engine.thumbnail(image_id, size)
        if data is None:
            raise ApiError(404, f"no image with id {image_id} in the index", "not_found_error")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @v1.get("/images/{image_id}")
    async def image(image_id: int) -> Response:
        path = engine.index.image_path(image_id) if engine.index is not None else None
        media_type = IMAGE_TYPES.get(path.suffix.lower()) if path is not None else None
        if path is None or media_type is None:
            raise ApiError(404, f"no image with id {image_id} in the index", "not_found_error")
        return FileResponse(path, media_type=media_type,
                            headers={"Cache-Control": "private, max-age=3600"})

    app.include_router(v1)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        index_info = None
        if engine.index is not None:
            index_info = {"images": len(engine.index), "kind": engine.index.kind}
        return {"status": "ok", "model": name, "index": index_info,
                "auth": bool(settings.api_key),
                "queue": {"text": engine.text_batcher.queued,
                          "image": engine.image_batcher.queued},
                "batching": {"max_batch": settings.max_batch,
                             "text": engine.text_batcher.stats.to_dict(),
                             "image": engine.image_batcher.stats.to_dict()}}

    @app.get("/")
    async def page() -> Response:
        return _static("index.html")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, "not found", "not_found_error")
        return _static(name)

    return app


def new_app(settings: ServeSettings, engine: Any) -> FastAPI:
    """A FastAPI app with the size limit, security headers and JSON error handlers, whose
    lifespan starts ``engine`` (where it has a ``start``) and stops it; ``app.state.engine``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)
        if start is not None:
            await start()
        try:
            yield
        finally:
            await engine.stop()

    # No /docs or /redoc: they load their scripts from a CDN, which the page policy forbids.
    app = FastAPI(title="imagefm", version=_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.add_middleware(LimitsAndHeaders, max_bytes=settings.max_request_bytes)
    _install_error_handlers(app)
    app.state.engine = engine
    return app


def v1_router(settings: ServeSettings) -> APIRouter:
    """The /v1 router, guarded by the API key when one is set."""
    return APIRouter(prefix="/v1", dependencies=[Depends(key_dependency(settings))])


def key_dependency(settings: ServeSettings) -> Callable[..., Awaitable[None]]:
    """The dependency that guards /v1/* with the API key, when one is set."""

    async def require_key(authorization: str | None = Header(None),
                          x_api_key: str | None = Header(None)) -> None:
        if settings.api_key and not key_matches(settings.api_key, authorization, x_api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})

    return require_key


def model_checker(name: str) -> Callable[[str | None], None]:
    """Refuses (404) a request naming another model than the one served."""

    def check_model(requested: str | None) -> None:
        if requested and requested != name:
            raise ApiError(404, f"model {requested!r} not found; this server serves {name!r}",
                           "not_found_error")

    return check_model


def _static(name: str) -> Response:
    data = (resources.files("imagefm.serve") / "static" / name).read_bytes()
    return Response(data, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


def _split_inputs(items: list[Any], input_type: str | None, engine: Engine
                  ) -> tuple[list[tuple[int, str]], list[tuple[int, bytes]]]:
    """``(index, text)`` and ``(index, image bytes)`` of the inputs, each checked."""
    texts, images = [], []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, schemas.InputItem):
            if (item.text is None) == (item.image is None):
                raise ApiError(400, f"{where}: give exactly one of 'text' or 'image'")
            if item.image is not None:
                images.append((i, decode_base64_image(item.image, where)))
            else:
                texts.append((i, engine.check_text(item.text, where)))
        elif input_type == "image" or (input_type is None
                                       and item[:11].lower() == "data:image/"):
            images.append((i, decode_base64_image(item, where)))
        else:
            texts.append((i, engine.check_text(item, where)))
    return texts, images


def _encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.kind, err.headers)

    @app.exception_handler(BadInput)
    async def bad_input(_: Request, err: BadInput) -> JSONResponse:
        kind = "request_too_large" if err.status == 413 else (
            "not_found_error" if err.status == 404 else "invalid_request_error")
        return _error(err.status, str(err), kind)

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, err: QueueFullError) -> JSONResponse:
        return _error(429, f"the server is busy ({err}); retry shortly", "overloaded_error",
                      {"Retry-After": "1"})

    @app.exception_handler(TimeoutError)
    async def timed_out(_: Request, err: TimeoutError) -> JSONResponse:
        return _error(504, f"timed out waiting for the model ({err})", "timeout_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(err), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else "request failed"
        kinds = {404: "not_found_error", 405: "invalid_request_error",
                 413: "request_too_large"}
        return _error(err.status_code, message, kinds.get(err.status_code,
                                                          "invalid_request_error"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        # Log the details here; never send internals (paths, tracebacks) to the client.
        logger.exception("error handling %s %s", request.method, request.url.path)
        return _error(500, "internal server error", "server_error")


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for problem in err.errors()[:5]:
        where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {problem.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _default_model_name(model: Any, index: Any) -> str:
    path = getattr(index, "model_path", None) if index is not None else None
    source = getattr(model, "name_or_path", None) or path
    if source:
        from pathlib import PurePath

        return PurePath(str(source)).name or "model"
    return type(model).__name__.lower()


def _version() -> str:
    from imagefm.version import __version__

    return __version__

