"""Request and response bodies. ``/v1/embeddings`` follows the OpenAI embeddings API and
``/v1/chat/completions`` its chat API, so their clients work unchanged; images travel as base64 or
``data:image/...;base64,`` URLs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # A misspelt field is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


class InputItem(_Strict):
    """One input given explicitly as a text or an image."""

    text: str | None = None
    image: str | None = Field(None, description="base64 or a data:image/...;base64, URL")


class EmbeddingRequest(BaseModel):
    """OpenAI-shaped: ``input`` is a string or a list. A string that is a ``data:image/`` URL is
    an image; ``input_type="image"`` makes plain base64 strings images too; ``{"text": ...}``
    and ``{"image": ...}`` items say it per input."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    input: str | list[str | InputItem]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    input_type: Literal["text", "image"] | None = None
    dimensions: int | None = None
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI does


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ClassifyRequest(_Strict):
    """Zero-shot classification of one image among ``labels`` (in ``lang``: en, ko...)."""

    image: str = Field(..., description="base64 or a data:image/...;base64, URL")
    labels: list[str] = Field(..., min_length=1)
    lang: str = "en"
    top_k: int | None = Field(None, ge=1)
    model: str | None = None


class LabelScore(BaseModel):
    label: str
    probability: float
    logit: float


class ClassifyResponse(BaseModel):
    model: str
    multi_label: bool  # probabilities are independent sigmoids (SigLIP), else a softmax
    labels: list[LabelScore]


class SearchRequest(_Strict):
    """Search the index by ``query`` (text) or ``image`` (base64 / data URL): exactly one."""

    query: str | None = None
    image: str | None = None
    k: int = Field(10, ge=1)
    model: str | None = None


class SearchResult(BaseModel):
    id: int
    path: str  # relative to the indexed folder
    score: float  # cosine similarity
    width: int
    height: int
    thumbnail_url: str
    image_url: str


class SearchResponse(BaseModel):
    query_type: Literal["text", "image"]
    results: list[SearchResult]
    took_ms: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "imagefm"
    model_type: str  # clip, siglip... for embedding models; vlm, llama, qwen2 for generators
    embed_dim: int | None = None  # embedding models
    image_size: int | None = None  # models that take images
    context_length: int | None = None  # models that generate text


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- chat completions (OpenAI's chat API) -----------------------------------------------------
# Requests ignore fields we do not use, as OpenAI clients send some by default; fields that would
# change the answer and are not supported are refused by the route, not ignored.

class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageUrl(_Lenient):
    url: str
    detail: str | None = None


class InputAudio(_Lenient):
    """A spoken clip as OpenAI sends it: base64 of the file and its format."""

    data: str
    format: str = "wav"


class ContentPart(_Lenient):
    """``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url": ...}}``
    (a ``data:image/...;base64,`` URL; http(s) URLs and files only where the server's settings
    allow them, :mod:`imagefm.serve.image_sources`), or, for a VLM with an audio tower,
    ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}``."""

    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None
    input_audio: InputAudio | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # the older name of max_completion_tokens
    temperature: float | None = Field(None, ge=0, le=2)  # default 1 (sampling), as OpenAI; 0 greedy
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: list[dict[str, Any]] | None = None
    # Beyond OpenAI, as vLLM and llama.cpp servers take them (openai client: extra_body=...).
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
