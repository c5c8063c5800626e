"""``POST /v1/chat/completions`` for a served VLM (any family: LLaVA-style, Qwen2-VL / Qwen2.5-VL,
LLaVA-OneVision, Idefics3 / SmolVLM) or language model (OpenAI's chat API).

    request ─► messages checked (text, image_url parts) ─► images fetched or read, decoded and
    the prompt tokenised on the prompt pool ─► decoded on the generation thread, together with
    the other requests being answered (continuous batching, :mod:`imagefm.serve.continuous`:
    ``chat_slots`` at once; ``chat_slots=1``: one reply at a time) ─► a ``chat.completion``, or
    ``text/event-stream`` ``chat.completion.chunk`` events ending in ``data: [DONE]``

Generation never runs on the event loop, so health checks and new requests are answered while a
reply is being written. Each request is decoded as it would be alone (its own cache, options
and seed): the same tokens (bit for bit with quantised layers; float32 BLAS may round a batch's
rows differently in the last bit). An ``image_url`` is a ``data:`` URL, or, where the settings
allow it, an http(s) URL of a listed host or a file in the image folder
(:mod:`imagefm.serve.image_sources`: by default the server fetches and reads nothing). A message
may hold several images; they are placed before its text (``<image>\nquestion``, the training
format). A VLM with an audio tower also takes ``input_audio`` parts (base64 of a WAV, MP3, FLAC
or OGG file, as OpenAI's API sends them): each becomes an ``<audio>`` placeholder after the
message's images and before its text (``<image>\n<audio>``: a question asked aloud).
A client that goes away mid-stream stops its generation at the next token (its slot goes to the
next request waiting). Errors use the app's JSON format: 400 bad input, 404 unknown model, 413
over a limit, 422 malformed request, 429 (with ``Retry-After``) ``max_chat_queue`` requests
already decoding or waiting, 504 waited longer than ``timeout_s`` for a slot.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import threading
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from imagefm.apps.vlm_chat import (
    GenerationOptions,
    Prompt,
    PromptTooLong,
    Reply,
    build_prompt,
    chat_processor,
    context_length,
    language_model,
)
from imagefm.serve import schemas
from imagefm.serve.app import ApiError, model_checker, new_app, v1_router
from imagefm.serve.batching import QueueFullError
from imagefm.serve.continuous import ContinuousBatcher
from imagefm.serve.engine import BadInput
from imagefm.serve.image_sources import ImageSource, image_source
from imagefm.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as OpenAI
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")  # input_audio formats (soundfile decodes them)
Clips = tuple[tuple[bytes, str], ...]  # input_audio file bytes and where each was, in order
_STARTED, _END = object(), object()


class Generation:
    """One reply generated on the worker thread, read on the event loop as an async iterator of
    text pieces; ``reply`` holds the counts once it is done. The worker calls ``begin``, ``emit``
    and ``end`` (the :class:`~imagefm.serve.continuous.Sink` of the continuous batcher)."""

    def __init__(self, reply: Reply, loop: asyncio.AbstractEventLoop) -> None:
        self.reply = reply
        self.cancel = threading.Event()
        reply.cancel = self.cancel
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def begin(self) -> None:
        self._put(_STARTED)

    def emit(self, piece: str) -> None:
        self._put(piece)

    def end(self, error: Exception | None = None) -> None:
        if error is not None:  # reported to the request, which logs it
            self._put(error)
        self._put(_END)

    def run(self) -> None:
        """The worker thread's part, one reply at a time (``chat_slots=1``)."""
        if self.cancel.is_set():  # the request gave up while waiting for its turn
            return
        self.begin()
        try:
            for piece in self.reply:
                self.emit(piece)
        except Exception as err:
            self.end(err)
            return
        self.end()

    async def started(self, timeout: float) -> None:
        """Wait until the worker takes this generation up (TimeoutError after ``timeout``)."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            self.cancel.set()
            raise TimeoutError(f"no turn on the generation thread within {timeout:g} s"
                               ) from None
        if item is not _STARTED:  # pragma: no cover - run() always starts with it
            raise RuntimeError("generation did not start")

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancel.set()  # a client gone mid-stream stops the worker at the next token


class ChatEngine:
    """The model behind the chat route: prompts built on a small pool, generation on one thread
    (``chat_slots`` replies decoded together), at most ``max_chat_queue`` requests admitted."""

    def __init__(self, model: Any, processor: Any, settings: ServeSettings) -> None:
        self.model = model.eval()
        self.processor = processor or chat_processor(model)
        self.settings = settings
        self.takes_images = self.processor is not None
        self.takes_audio = bool(getattr(self.processor, "takes_audio", False))
        self.context_length = context_length(model)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="imagefm-generate")
        self.prompt_pool = ThreadPoolExecutor(settings.decode_threads,
                                              thread_name_prefix="imagefm-prompt")
        self.batcher = None
        if settings.chat_slots > 1:
            self.batcher = ContinuousBatcher(model, slots=settings.chat_slots,
                                             max_queue=settings.max_chat_queue)
        self._lock = threading.Lock()
        self.active = 0  # admitted: generating or waiting for the worker (one at a time)
        self.requests = 0
        self.completion_tokens = 0

    async def stop(self) -> None:
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
        self.worker.shutdown(wait=False, cancel_futures=True)
        self.prompt_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def model_type(self) -> str:
        """``vlm`` (LLaVA-style), qwen2_vl, qwen2_5_vl, llava_onevision, idefics3, smolvlm; a
        language model's own (llama, qwen2...)."""
        if not self.takes_images:
            return language_model(self.model).config.model_type
        return getattr(self.model.config, "model_type", None) or self.model.architecture

    @property
    def image_size(self) -> int | None:
        """The side images are resized to, for families that use one size (None for native
        resolution or tiles)."""
        card = getattr(self.processor, "card", None) if self.takes_images else None
        return card.image_size if card is not None else None

    async def prompt(self, messages: list[dict[str, Any]], sources: list[ImageSource],
                     clips: Clips = ()) -> Prompt:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prompt_pool, self._build, messages, sources,
                                          clips)

    def _build(self, messages: list[dict[str, Any]], sources: list[ImageSource],
               clips: Clips = ()) -> Prompt:
        from imagefm.data.audio import AudioError, load_audio
        from imagefm.data.image import ImageDecodeError, open_image

        images = []
        for source in sources:
            where = source.where
            blob = source.read(self.settings)  # fetched or read here, off the event loop
            try:
                images.append(open_image(blob, name=where,
                                         max_pixels=self.settings.max_image_pixels))
            except ImageDecodeError as err:
                status = 413 if "decompression bomb" in err.reason else 400
                raise BadInput(f"{where}: cannot decode the image: {err.reason}", status
                               ) from None
        waves = []
        for blob, where in clips:  # decoded here, off the event loop
            audio = self.processor.audio
            try:
                waves.append(load_audio(blob, audio.sampling_rate, max_seconds=audio.seconds))
            except AudioError as err:
                raise BadInput(f"{where}: cannot decode the audio: {err}") from None
        try:
            return build_prompt(self.model, messages, images, self.processor, waves)
        except PromptTooLong as err:
            raise BadInput(f"{err}", 400) from None
        except ValueError as err:  # the template refused the conversation...
            raise BadInput(f"messages: {err}") from None

    async def generate(self, prompt: Prompt, options: GenerationOptions) -> Generation:
        """Admit the request (429 when ``max_chat_queue`` are decoding or waiting), queue it and
        wait for its turn (504 after ``timeout_s``)."""
        generation = Generation(Reply(self.model, prompt, options), asyncio.get_running_loop())
        if self.batcher is not None:
            try:
                self.batcher.submit(generation.reply, generation)
            except QueueFullError as err:
                raise _too_many(err) from None
            self.requests += 1
            await generation.started(self.settings.timeout_s)
            return generation
        with self._lock:
            if self.active >= self.settings.max_chat_queue:
                raise _too_many(f"{self.active} chat requests are generating or waiting")
            self.active += 1
            self.requests += 1

        def job() -> None:
            try:
                generation.run()
            finally:
                with self._lock:
                    self.active -= 1
                    self.completion_tokens += generation.reply.completion_tokens

        try:
            self.worker.submit(job)
        except RuntimeError:  # shutting down
            with self._lock:
                self.active -= 1
            raise
        await generation.started(self.settings.timeout_s)
        return generation

    def health(self) -> dict[str, Any]:
        if self.batcher is None:
            return {"active": self.active, "max_queue": self.settings.max_chat_queue,
                    "requests": self.requests, "completion_tokens": self.completion_tokens}
        return {"active": self.batcher.admitted, "max_queue": self.settings.max_chat_queue,
                "requests": self.requests, "completion_tokens": self.batcher.completion_tokens,
                "batching": self.batcher.stats()}


def _too_many(why: object) -> ApiError:
    """429: the client should retry (OpenAI's clients do, after ``Retry-After``)."""
    return ApiError(429, f"the server is busy ({why}); retry shortly", "rate_limit_error",
                    {"Retry-After": "1"})


def create_chat_app(model: Any, processor: Any, settings: ServeSettings, name: str) -> FastAPI:
    """The app serving a VLM or language model: chat completions, models, health."""
    engine = ChatEngine(model, processor, settings)
    created = int(time.time())

    app = new_app(settings, engine)
    check_model = model_checker(name)
    v1 = v1_router(settings)

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(body: schemas.ChatCompletionRequest
                               ) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        requested = _check_options(body, settings)
        messages, sources, clips = _read_messages(body.messages, engine)
        prompt = await engine.prompt(messages, sources, clips)
        room = engine.context_length - prompt.tokens
        if requested is not None and requested > room:
            raise ApiError(400, f"the prompt is {prompt.tokens} tokens and max_tokens is "
                                f"{requested}: together more than the model's context of "
                                f"{engine.context_length}; ask for fewer tokens or send less")
        options = GenerationOptions(
            max_new_tokens=min(requested or settings.max_new_tokens, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p or 1.0, top_k=body.top_k or 0,
            repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed,
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()))
        generation = await engine.generate(prompt, options)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _events(generation, completion_id, name, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = "".join([piece async for piece in generation])
        reply = generation.reply
        completion = schemas.ChatCompletion(
            id=completion_id, created=int(time.time()), model=name,
            choices=[schemas.ChatChoice(message=schemas.AssistantMessage(content=text),
                                        finish_reason=reply.finish_reason)],
            usage=_usage(reply))
        return JSONResponse(completion.model_dump())

    @v1.get("/models", response_model=schemas.ModelList, response_model_exclude_none=True)
    async def models() -> schemas.ModelList:
        return schemas.ModelList(data=[schemas.ModelCard(
            id=name, created=created, model_type=engine.model_type, image_size=engine.image_size,
            context_length=engine.context_length)])

    app.include_router(v1)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": name, "auth": bool(settings.api_key),
                "generation": engine.health()}

    return app


def _check_options(body: schemas.ChatCompletionRequest, settings: ServeSettings) -> int | None:
    """Refuse what this server does not do (rather than ignore it); the requested token count."""
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n}: this server writes one choice per request")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported")
    if body.tools:
        raise ApiError(400, "tools (function calling) are not supported")
    for field in ("frequency_penalty", "presence_penalty"):
        if getattr(body, field):
            raise ApiError(400, f"{field} is not supported; repetition_penalty is (send it in "
                                f"the body, e.g. the openai client's extra_body)")
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > settings.max_new_tokens:
        raise ApiError(400, f"max_tokens={requested} is more than this server's limit of "
                            f"{settings.max_new_tokens}")
    return requested


def _read_messages(messages: list[schemas.ChatMessage], engine: ChatEngine
                   ) -> tuple[list[dict[str, Any]], list[ImageSource], Clips]:
    """Messages for the chat template (text with the image marker where each image was, the
    audio marker where each clip was), where the images come from, each checked against the
    settings, and the clips' file bytes with where each was, in order."""
    placeholder = engine.processor.image_marker if engine.takes_images else None
    audio_marker = engine.processor.audio_marker if engine.takes_audio else None
    out: list[dict[str, Any]] = []
    sources: list[ImageSource] = []
    clips: list[tuple[bytes, str]] = []
    chars = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None:
            if role != "assistant":
                raise ApiError(400, f"{where}: content is missing")
            content = ""
        parts = [schemas.ContentPart(type="text", text=content)] if isinstance(content, str) \
            else content
        texts, images, spoken = [], [], []
        for j, part in enumerate(parts):
            at = f"{where}.content[{j}]" if isinstance(content, list) else f"{where}.content"
            if part.type == "text":
                text = unicodedata.normalize("NFC", part.text or "")
                if placeholder and placeholder in text:
                    raise ApiError(400, f"{at}: the text contains {placeholder!r}, which stands "
                                        f"for an image here; send images as image_url parts")
                if audio_marker and audio_marker in text:
                    raise ApiError(400, f"{at}: the text contains {audio_marker!r}, which "
                                        f"stands for audio here; send audio as input_audio parts")
                chars += len(text)
                texts.append(text)
            elif part.type == "image_url":
                sources.append(_image_source(part, at, role, engine))
                images.append(f"{placeholder}\n")
            elif part.type == "input_audio":
                clips.append((_audio_bytes(part, at, role, engine), at))
                spoken.append(audio_marker)
            else:
                known = "text, image_url and input_audio" if audio_marker else "text and image_url"
                raise ApiError(400, f"{at}: content parts of type {part.type!r} are not "
                                    f"supported ({known} are)")
        # A message's images go before its text, as the model saw them in training
        # ("<image>\nquestion") and as LLaVA's own chat templates place them; its clips go
        # between the two ("<image>\n<audio>": a question asked aloud, as in training).
        voice = "\n".join(spoken) + ("\n" if spoken and texts else "")
        out.append({"role": role, "content": "".join(images + [voice] + texts)})
    if chars > engine.settings.max_prompt_chars:
        raise ApiError(413, f"the messages hold {chars} characters, more than the limit of "
                            f"{engine.settings.max_prompt_chars}", "request_too_large")
    if len(sources) > engine.settings.max_chat_images:
        raise ApiError(413, f"{len(sources)} images is more than the limit of "
                            f"{engine.settings.max_chat_images} per request", "request_too_large")
    if len(clips) > engine.settings.max_chat_images:
        raise ApiError(413, f"{len(clips)} audio clips is more than the limit of "
                            f"{engine.settings.max_chat_images} per request", "request_too_large")
    return out, sources, tuple(clips)


def _audio_bytes(part: schemas.ContentPart, where: str, role: str, engine: ChatEngine) -> bytes:
    """The file bytes of an ``input_audio`` part (decoded later, on the prompt pool)."""
    if not engine.takes_audio:
        raise ApiError(400, f"{where}: content parts of type 'input_audio' are not supported: "
                            f"this model has no audio tower")
    if role != "user":
        raise ApiError(400, f"{where}: audio belongs in user messages")
    clip = part.input_audio
    if clip is None or not clip.data:
        raise ApiError(400, f"{where}: an input_audio part needs input_audio.data (base64)")
    if clip.format.lower() not in AUDIO_FORMATS:
        raise ApiError(400, f"{where}: input_audio.format {clip.format!r} is not one of "
                            f"{', '.join(AUDIO_FORMATS)}")
    try:
        raw = base64.b64decode(clip.data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: input_audio.data is not valid base64") from None
    if not raw:
        raise ApiError(400, f"{where}: the audio is empty")
    return raw


def _image_source(part: schemas.ContentPart, where: str, role: str, engine: ChatEngine
                  ) -> ImageSource:
    if not engine.takes_images:
        raise ApiError(400, f"{where}: this model is a language model without a vision tower; "
                            f"it takes no images")
    if role != "user":
        raise ApiError(400, f"{where}: images belong in user messages")
    image_url = part.image_url
    url = image_url.url if isinstance(image_url, schemas.ImageUrl) else image_url
    return image_source(url or "", where, engine.settings)


def _usage(reply: Reply) -> schemas.CompletionUsage:
    return schemas.CompletionUsage(prompt_tokens=reply.prompt_tokens,
                                   completion_tokens=reply.completion_tokens,
                                   total_tokens=reply.prompt_tokens + reply.completion_tokens)


async def _events(generation: Generation, completion_id: str, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: the role, the text pieces, the finish reason,
    (the usage,) then ``[DONE]``."""
    created = int(time.time())

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def choice(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    yield event([choice({"role": "assistant", "content": ""})])
    try:
        async for piece in generation:
            yield event([choice({"content": piece})])
    except Exception:  # the status line is sent: report in the stream, as OpenAI does
        logger.exception("generation failed mid-stream")
        error = {"message": "internal server error", "type": "server_error", "code": 500}
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
    reply = generation.reply
    yield event([choice({}, reply.finish_reason)])
    if include_usage:
        yield event([], _usage(reply).model_dump())
    yield "data: [DONE]\n\n"
