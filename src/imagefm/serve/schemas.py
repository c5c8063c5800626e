"""Request and response bodies. ``/v1/embeddings`` follows the OpenAI embeddings API, so its
clients work unchanged; images travel as base64 or ``data:image/...;base64,`` URLs."""

from __future__ import annotations

from typing import Literal

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
    model_type: str
    embed_dim: int
    image_size: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
