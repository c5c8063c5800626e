"""Captions, questions and multi-turn chat with a VLM of any family (LLaVA-style, Qwen2-VL /
Qwen2.5-VL, LLaVA-OneVision, Idefics3 / SmolVLM) or a plain language model, streaming.

    caption(vlm, "cat.jpg")                      # in English
    caption(vlm, "cat.jpg", lang="ko")           # 한국어로
    ask(vlm, "cat.jpg", "이 사진에 무엇이 있나요?")  # answered in the question's language
    session = ChatSession(vlm)
    for piece in session.send("What is this?", images=["cat.jpg"]):
        print(piece, end="", flush=True)

Everything goes one way, the same for every family (:mod:`imagefm.vlm_runtime`): messages +
images → :func:`build_prompt` (the family's processor and the model's chat template expand each
image into its placeholder tokens) → :class:`Reply`, which runs the vision tower once
(``model.generation_inputs``), decodes with the KV cache and yields text pieces as they are
generated (never half a UTF-8 character, never a stop string), then knows its token counts and
why it ended. The HTTP server (``imagefm.serve.chat``) uses the same two calls.

In string content ``<image>`` marks an image (``"<image>\nWhat is it?"``); content may also be a
list of parts (``{"type": "text", "text"}``, ``{"type": "image"}``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from imagefm.chat import chat_stops, content_text, encode_chat, normalize_messages
from imagefm.models.decoder import DecoderLM
from imagefm.models.generation import TextStream
from imagefm.train.vlm_data import DESCRIBE
from imagefm.vlm_runtime import ChatProcessor, generation_inputs, is_vlm
from imagefm.vlm_runtime import chat_processor as vlm_processor

Messages = Sequence[dict[str, Any]]


class PromptTooLong(ValueError):
    """The conversation leaves no room to answer within the model's context."""


def is_chat_model(model: Any) -> bool:
    """True for models that generate text: a VLM (any family) or a decoder LM."""
    return is_vlm(model) or isinstance(model, DecoderLM)


def chat_processor(model: Any) -> ChatProcessor | None:
    """The VLM's processor (tokenizer, template, image processing); None for a plain LM."""
    if is_vlm(model):
        return vlm_processor(model)
    if isinstance(model, DecoderLM):
        if model.tokenizer is None:
            raise ValueError("this language model has no tokenizer; load it from a checkpoint "
                             "with one")
        return None
    raise TypeError(f"a {type(model).__name__} does not generate text: use a VLM or a "
                    f"language model")


def language_model(model: Any) -> DecoderLM:
    """The decoder that generates (a VLM's carries its tokenizer and chat template)."""
    return model.lm if is_vlm(model) else model


def context_length(model: Any) -> int:
    return language_model(model).config.context_length


@dataclass(frozen=True)
class GenerationOptions:
    """How a reply is decoded. ``temperature=0`` is greedy; ``stop`` adds stop strings to the
    chat template's own end-of-turn marker (text from a stop string on is never returned)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0 and repetition_penalty > 0")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))


@dataclass
class Prompt:
    """One conversation ready to answer: its ids [1, L] (image placeholders expanded) and the
    rest of what the family's processor made (``attention_mask``, the preprocessed images:
    ``pixel_values`` and, per family, ``image_grid_thw``, ``image_sizes``,
    ``pixel_attention_mask``...)."""

    input_ids: torch.Tensor
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.inputs.get("pixel_values")


def build_prompt(model: Any, messages: Messages, images: Sequence[Any] = (),
                 processor: ChatProcessor | None = None, audios: Sequence[Any] = ()) -> Prompt:
    """Render ``messages`` with the model's chat template and tokenise them.

    Message content is a string (each ``<image>`` in it stands for the next image) or a list of
    parts (``{"type": "text", "text"}``, ``{"type": "image"}``); ``images`` are paths, bytes,
    PIL images or uint8 arrays, in placeholder order. A conversation without any placeholder
    and exactly one image gets it at the start of the first user turn. Raises ValueError when
    the placeholders and images disagree or the prompt alone fills the context. ``audios``
    (a VLM with an audio tower) are spoken clips (waveforms, audio files or their bytes) in the
    order of the ``<audio>`` placeholders.
    """
    checked = normalize_messages(messages)
    if is_vlm(model):
        processor = processor or vlm_processor(model)
        clips = {}
        if audios:
            if not getattr(processor, "takes_audio", False):
                raise ValueError("this model has no audio tower: it takes no audio")
            clips = {"audios": list(audios)}
        batch = dict(processor.prompt([checked], list(images), **clips))
        prompt = Prompt(batch.pop("input_ids"), batch)
    else:
        chat_processor(model)  # checks it is an LM with a tokenizer
        has_image_parts = any(isinstance(m["content"], list) and any(
            part["type"] != "text" for part in m["content"]) for m in checked)
        if images or audios or has_image_parts:
            raise ValueError("this is a language model without a vision tower: it takes no "
                             "images" + (" or audio" if audios else ""))
        flat = [{**m, "content": content_text(m["content"])} for m in checked]
        prompt = Prompt(torch.tensor([encode_chat(model, flat)]))
    if prompt.tokens >= context_length(model):
        raise PromptTooLong(f"the conversation is {prompt.tokens} tokens, which fills the "
                            f"model's context of {context_length(model)}: shorten it (or start "
                            f"a new one)")
    return prompt


class Reply:
    """One reply being generated. Iterate for its text pieces (once); afterwards ``text``,
    ``prompt_tokens``, ``completion_tokens`` (tokens the model produced, the end token
    included) and ``finish_reason`` (``"stop"``: end of turn or a stop string, ``"length"``:
    ``max_new_tokens`` reached, ``"cancelled"``: ``cancel`` was set) are filled in.

    ``max_new_tokens`` is cut to what the context has room for.
    """

    def __init__(self, model: Any, prompt: Prompt, options: GenerationOptions | None = None, *,
                 cancel: threading.Event | None = None) -> None:
        self.model, self.prompt = model, prompt
        self.options = options or GenerationOptions()
        self.cancel = cancel
        self.text = ""
        self.prompt_tokens = prompt.tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._started = False

    @property
    def max_new_tokens(self) -> int:
        room = context_length(self.model) - self.prompt_tokens
        return max(0, min(self.options.max_new_tokens, room))

    def decoding_arguments(self) -> dict[str, Any]:
        """Everything decoding this reply takes, as keyword arguments of ``TextStream`` (and of
        the server's ``BatchDecoder.add``): the prompt (a VLM's vision tower runs here, once;
        decoding then only sees embeddings and, for Qwen-VL, the M-RoPE positions of the prompt
        and the deltas that continue them), length, end tokens, stop strings, sampling."""
        lm = language_model(self.model)
        options = self.options
        eos_ids, template_stops = chat_stops(lm)
        device = lm.embed_tokens.weight.device
        input_ids = self.prompt.input_ids.to(device)
        extra: dict[str, Any] = {}
        if is_vlm(self.model):
            extra = generation_inputs(self.model, {"input_ids": input_ids,
                                                   **self.prompt.inputs})
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=device).manual_seed(options.seed)
        return {"input_ids": input_ids, **extra, "max_new_tokens": self.max_new_tokens,
                "do_sample": options.temperature > 0, "temperature": options.temperature or 1.0,
                "top_k": options.top_k, "top_p": options.top_p,
                "repetition_penalty": options.repetition_penalty, "eos_token_id": eos_ids,
                "stop_strings": tuple(template_stops) + options.stop, "generator": generator}

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Reply can be iterated only once")
        self._started = True
        lm = language_model(self.model)
        arguments = self.decoding_arguments()
        stream = TextStream(lm, lm.tokenizer, arguments.pop("input_ids"), **arguments,
                            cancel=self.cancel)
        try:
            yield from stream
        finally:
            self.text, self.finish_reason = stream.text, stream.finish_reason
            self.completion_tokens = stream.tokens


def stream_reply(model: Any, messages: Messages, images: Sequence[Any] = (), *,
                 processor: ChatProcessor | None = None, audios: Sequence[Any] = (),
                 **options: Any) -> Reply:
    """A :class:`Reply` to ``messages`` (see :func:`build_prompt`); ``options`` are
    :class:`GenerationOptions` fields. The prompt is checked now, generation starts when the
    reply is iterated."""
    prompt = build_prompt(model, messages, images, processor, audios)
    return Reply(model, prompt, GenerationOptions(**options))


def caption(vlm: Any, image: Any, lang: str = "en", **options: Any) -> str:
    """A description of ``image`` in ``lang`` (``en`` or ``ko``), asked with the same request the
    training data uses."""
    if lang not in DESCRIBE:
        raise ValueError(f"lang = {lang!r}: choose from {', '.join(DESCRIBE)}")
    return ask(vlm, image, DESCRIBE[lang], **options)


def ask(vlm: Any, image: Any, question: str, **options: Any) -> str:
    """The model's answer to ``question`` about ``image`` (in whatever language it answers)."""
    if not is_vlm(vlm):
        raise TypeError(f"asking about an image needs a VLM, got a {type(vlm).__name__}")
    return "".join(stream_reply(vlm, [{"role": "user", "content": question}], [image],
                                **options))


class ChatSession:
    """A conversation with a VLM or LM: images attach to user turns; replies stream.

        session = ChatSession(vlm, system="Answer briefly.", max_new_tokens=64)
        session.attach("cat.jpg")                     # goes with the next message
        reply = "".join(session.send("What is this?"))
        session.send("이건 무슨 색이에요?")               # iterate it to generate
        session.reset()

    The whole conversation is re-read each turn (no KV cache is kept between turns), so a long
    one slows down and finally raises :class:`PromptTooLong`; ``reset`` starts over.
    """

    def __init__(self, model: Any, system: str | None = None, **options: Any) -> None:
        self.model, self.system = model, system
        self.processor = chat_processor(model)
        GenerationOptions(**options)  # refuse bad options now, not at the first turn
        self.options = options
        self.messages: list[dict[str, Any]] = []  # user/assistant turns, placeholders in text
        self.images: list[Any] = []  # the images of those turns, in placeholder order
        self.pending: list[Any] = []  # attached, waiting for the next user message
        self.last_reply: Reply | None = None

    @property
    def takes_images(self) -> bool:
        return self.processor is not None

    def attach(self, image: Any) -> None:
        """Add an image (path, bytes, PIL image or array) to the next user message. It is
        decoded now, so an unreadable file fails here (``ImageDecodeError``) and not later."""
        from imagefm.data.image import open_image

        if not self.takes_images:
            raise ValueError("this is a language model without a vision tower: it takes no "
                             "images")
        if not hasattr(image, "shape"):  # arrays go to the processor as they are
            image = open_image(image)
        self.pending.append(image)

    def reset(self) -> None:
        """Forget the conversation and any attached images."""
        self.messages, self.images, self.pending = [], [], []
        self.last_reply = None

    def send(self, text: str, images: Sequence[Any] = ()) -> Iterator[str]:
        """Text pieces of the reply to ``text`` (with ``images`` and any attached ones). The
        prompt is checked now; the turn joins the conversation once the reply is read (what was
        generated so far, if reading stops early)."""
        for image in images:
            self.attach(image)
        new_images = list(self.pending)
        placeholder = self.processor.image_marker if self.processor is not None else ""
        user = {"role": "user", "content": f"{placeholder}\n" * len(new_images) + text}
        system = [{"role": "system", "content": self.system}] if self.system else []
        prompt = build_prompt(self.model, system + self.messages + [user],
                              self.images + new_images, self.processor)
        reply = Reply(self.model, prompt, GenerationOptions(**self.options))
        self.pending = []
        self.last_reply = reply
        return self._stream(reply, user, new_images)

    def _stream(self, reply: Reply, user: dict[str, Any], new_images: list[Any]
                ) -> Iterator[str]:
        try:
            yield from reply
        finally:
            self.messages += [user, {"role": "assistant", "content": reply.text}]
            self.images += new_images
