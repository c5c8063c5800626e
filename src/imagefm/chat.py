"""Chat templates: conversations (a list of ``{"role", "content"}`` messages) to prompt text.

A checkpoint's own Jinja template (``tokenizer.chat_template`` in GGUF, ``chat_template`` in HF
tokenizer_config.json) is rendered the way Hugging Face renders it: a sandboxed ``jinja2``
environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now`` and a
``tojson`` filter that keeps non-ASCII text. Without one, ChatML is used::

    <|im_start|>system
    You are ...<|im_end|>
    <|im_start|>user
    안녕?<|im_end|>
    <|im_start|>assistant

Message text is NFC-normalised first, so Korean typed as decomposed jamo gets the same tokens.
Content may be a string or a list of parts (``{"type": "text", "text": ...}``,
``{"type": "image"}``); ChatML writes each image part as ``image_token``.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """A conversation cannot be rendered: bad messages, or the template refused them."""


def normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked copies of ``messages`` with every text NFC-normalised."""
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f"message {index} must be a dict with 'role' and 'content', "
                                    f"got {message!r:.100}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatTemplateError(f"message {index}: role {role!r} is not one of "
                                    f"{', '.join(ROLES)}")
        out.append({**message, "content": _normalize_content(content, index)})
    return out


def _normalize_content(content: Any, index: int) -> Any:
    if isinstance(content, str):
        return unicodedata.normalize("NFC", content)
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise ChatTemplateError(f"message {index}: content parts must be dicts with a "
                                        f"'type', got {part!r:.100}")
            if part["type"] == "text":
                part = {**part, "text": unicodedata.normalize("NFC", str(part.get("text", "")))}
            parts.append(part)
        return parts
    raise ChatTemplateError(f"message {index}: content must be a string or a list of parts, "
                            f"got {type(content).__name__}")


def content_text(content: str | list[dict[str, Any]], image_token: str = IMAGE_TOKEN) -> str:
    """One message's content as text: text parts joined, image parts as ``image_token``."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if part["type"] == "text":
            pieces.append(part["text"])
        elif part["type"] in ("image", "image_url"):
            pieces.append(image_token)
        else:
            raise ChatTemplateError(f"content part type {part['type']!r} is not text or image")
    return "".join(pieces)


def chatml_segments(messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    image_token: str = IMAGE_TOKEN) -> list[tuple[str, bool]]:
    """ChatML as ``(text, is_assistant_reply)`` pieces, in order; joined they are the prompt.

    The assistant's own words and its closing ``<|im_end|>`` are marked, so training can put
    labels on exactly those tokens while the conversation is built.
    """
    segments: list[tuple[str, bool]] = []
    for message in normalize_messages(messages):
        text = content_text(message["content"], image_token)
        role = message["role"]
        if role == "assistant":
            segments.append((f"{IM_START}assistant\n", False))
            segments.append((f"{text}{IM_END}", True))
            segments.append(("\n", False))
        else:
            segments.append((f"{IM_START}{role}\n{text}{IM_END}\n", False))
    if add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    return segments


def render_chatml(messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                  image_token: str = IMAGE_TOKEN) -> str:
    """ChatML text of a conversation (the default template)."""
    return "".join(text for text, _ in chatml_segments(
        messages, add_generation_prompt=add_generation_prompt, image_token=image_token))


def _raise(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _generation_tag() -> type:
    """``{% generation %}...{% endgeneration %}`` (HF's marker of assistant text, e.g. in
    LLaVA-OneVision's template) renders its body unchanged."""
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag


def _compile(source: str) -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("rendering a checkpoint's chat template needs jinja2: "
                                "pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_tag()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as err:
        raise ChatTemplateError(f"the chat template does not compile: {err}") from None


@dataclass
class ChatTemplate:
    """A conversation renderer: the checkpoint's Jinja ``source``, or ChatML when None."""

    source: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    image_token: str = IMAGE_TOKEN

    def __post_init__(self) -> None:
        self._compiled = _compile(self.source) if self.source else None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends an assistant turn (ChatML's end marker; the EOS text otherwise)."""
        if self.source is None or IM_END in self.source:
            return (IM_END,)
        return (self.eos_token,) if self.eos_token else ()

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The prompt text; ``variables`` reach the Jinja template (e.g. ``tools``)."""
        checked = normalize_messages(messages)
        if self._compiled is None:
            return render_chatml(checked, add_generation_prompt=add_generation_prompt,
                                 image_token=self.image_token)
        from jinja2 import TemplateError

        try:
            return self._compiled.render(messages=checked,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token,
                                         **variables)
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template failed: {err}") from None

    @classmethod
    def for_model(cls, model: Any) -> ChatTemplate:
        """The template a loaded LM carries (``model.chat_template``), with its BOS/EOS text."""
        tokenizer, config = getattr(model, "tokenizer", None), model.config

        def text(index: int | None) -> str:
            if tokenizer is None or index is None:
                return ""
            return tokenizer.id_to_token(index) or ""

        eos = config.eos_token_ids[0] if config.eos_token_ids else None
        return cls(getattr(model, "chat_template", None), text(config.bos_token_id), text(eos))


def encode_chat(model: Any, messages: Sequence[dict[str, Any]], *,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation for ``model``, rendered with its template. The template
    writes its own special tokens, so the tokenizer adds none (as HF's apply_chat_template)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ChatTemplateError("this model has no tokenizer; load it from a checkpoint with one")
    text = ChatTemplate.for_model(model).render(messages,
                                                add_generation_prompt=add_generation_prompt)
    return tokenizer.with_settings(bos_id=None).encode(text)


def chat_stops(model: Any) -> tuple[list[int], tuple[str, ...]]:
    """What ends an assistant turn for ``model``: token ids (the config's EOS ids, plus the
    template's end marker when it is a single token) and stop strings (end markers that are not).

    A marker that is a special token must be stopped by id: decoding drops special tokens, so a
    stop string would never see it.
    """
    ids = list(model.config.eos_token_ids)
    strings = []
    tokenizer = getattr(model, "tokenizer", None)
    for marker in ChatTemplate.for_model(model).stop_strings:
        index = tokenizer.token_to_id(marker) if tokenizer is not None else None
        if index is None:
            strings.append(marker)
        elif index not in ids:
            ids.append(index)
    return ids, tuple(strings)


def reply_segments(template: ChatTemplate, messages: Sequence[dict[str, Any]]
                   ) -> list[tuple[str, bool]]:
    """A whole conversation as ``(text, is_reply)`` pieces, in order, rendered turn by turn with
    ``template``; joined they are its full rendering.

    Before each assistant turn the conversation so far is rendered as a generation prompt, then
    with that turn: the new text is the reply. The reply's words and its end-of-turn marker are
    marked (whitespace after the marker is markup); everything else — system and user turns,
    image placeholders, the template's own markup, the assistant opening — is not. Training puts
    labels on the marked pieces only, so nothing is reconstructed afterwards from token ids.

    Some templates open a turn that goes on differently from the generation prompt
    (LLaVA-OneVision's writes ``assistant \n`` in one and ``assistant\n`` in the other); the
    turn's opening is then the text its renderings with two different replies share.
    Raises ChatTemplateError for a template that does not render a conversation as a growing
    prefix (its earlier turns would change as the conversation grows).
    """
    messages = normalize_messages(messages)
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for end, message in enumerate(messages, start=1):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:end - 1], add_generation_prompt=True)
        full = template.render(messages[:end], add_generation_prompt=False)
        if not full.startswith(rendered):
            raise ChatTemplateError("the chat template does not render a conversation as a "
                                    "growing prefix; labels cannot be placed turn by turn")
        if prompt.startswith(rendered) and full.startswith(prompt):
            opening = prompt[len(rendered):]
        else:
            opening = _turn_opening(template, messages[:end - 1], message)[len(rendered):]
        reply = full[len(rendered) + len(opening):]
        answer = reply.rstrip()
        segments += [(opening, False), (answer, True), (reply[len(answer):], False)]
        rendered = full
    final = template.render(messages, add_generation_prompt=False)
    if final.startswith(rendered) and len(final) > len(rendered):
        segments.append((final[len(rendered):], False))  # e.g. a last user turn with no reply
    return [(text, is_reply) for text, is_reply in segments if text]


def _turn_opening(template: ChatTemplate, before: list[dict[str, Any]],
                  message: dict[str, Any]) -> str:
    """The rendering of ``before`` plus the opening of assistant turn ``message``: what the
    renderings with two different replies (private-use characters, in the content's own form)
    have in common."""
    def render(mark: str) -> str:
        content: Any = mark if isinstance(message["content"], str) else [
            {"type": "text", "text": mark}]
        return template.render([*before, {**message, "content": content}],
                               add_generation_prompt=False)

    first, second = render("\ue000"), render("\ue001")
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    return first[:shared]


def text_parts(text: str, marker: str = IMAGE_TOKEN) -> list[dict[str, Any]]:
    """``text`` split at each ``marker`` into text and image parts; the newline LLaVA writes
    right after a placeholder (``<image>\nWhat is it?``) belongs to it, not to the text."""
    parts: list[dict[str, Any]] = []
    for index, piece in enumerate(text.split(marker)):
        if index:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def with_image_parts(conversations: Sequence[Sequence[dict[str, Any]]],
                     images: Sequence[Any] = (), *,
                     marker: str = IMAGE_TOKEN) -> list[list[dict[str, Any]]]:
    """Conversations as the content-part processors take them (Qwen2-VL, LLaVA-OneVision,
    Idefics3): every content a list of parts, every image part ``{"type": "image", "image":
    <picture>}``.

    In string content each ``marker`` stands for the next of ``images``, and a newline right
    after it belongs to it (``"<image>\\nWhat is it?"``: an image, then the question, as LLaVA
    writes it); ``image`` / ``image_url`` parts without a picture take the next of ``images``
    too. When nothing marks an image and there is one image per conversation, each goes first
    in its conversation's first user turn. Raises ChatTemplateError when the marks and the
    images disagree.
    """
    pending = list(images)
    out = []
    for messages in conversations:
        rows = []
        for message in normalize_messages(messages):
            content = message["content"]
            if isinstance(content, str):
                parts = text_parts(content, marker)
            else:
                parts = []
                for part in content:
                    if part["type"] in ("image", "image_url"):
                        picture = part.get("image")
                        parts.append({"type": "image"} if picture is None else
                                     {"type": "image", "image": picture})
                    else:
                        parts.append(part)
            # Templates that read content[0] need a part even in an empty message.
            rows.append({**message, "content": parts or [{"type": "text", "text": ""}]})
        out.append(rows)
    marks = [part for rows in out for message in rows for part in message["content"]
             if part["type"] == "image" and "image" not in part]
    if not marks and pending and len(pending) == len(out):
        for rows in out:
            first = next((m for m in rows if m["role"] == "user"), None)
            if first is None:
                raise ChatTemplateError("an image goes with a user message; the conversation "
                                        "has none")
            mark = {"type": "image"}
            first["content"].insert(0, mark)
            marks.append(mark)
    if len(marks) != len(pending):
        raise ChatTemplateError(f"the conversations hold {len(marks)} image placeholder(s) but "
                                f"{len(pending)} image(s) were given")
    for mark, picture in zip(marks, pending, strict=True):
        mark["image"] = picture
    return out
