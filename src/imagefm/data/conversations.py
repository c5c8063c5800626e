"""Conversation files for fine-tuning a VLM on your own data: the LLaVA format and OpenAI's
messages format, one conversation per JSON object, in a JSON list (``.json``) or one per line
(``.jsonl``); the two formats may be mixed.

LLaVA::

    {"image": "a.jpg" | ["a.jpg", "b.jpg"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                       {"from": "gpt", "value": "A cat."}]}

Each ``<image>`` marks where an image goes, in order; a conversation with images and no
``<image>`` gets them all at the start of its first user turn (as LLaVA does).

OpenAI::

    {"messages": [{"role": "user", "content": [
                      {"type": "image_url", "image_url": {"url": "a.jpg"}},
                      {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": "A cat."}]}

(``url``: a path, or ``data:image/...;base64,...``.)

Image paths are relative to an image folder (default: the file's folder); ``file://`` URLs and
``data:`` URLs (base64) work too, web URLs do not (training fetches nothing).

Both become a :class:`Conversation`: messages whose content is a list of parts
(``{"type": "image"}`` and ``{"type": "text", "text": ...}``), the form chat templates of the
Qwen-VL, LLaVA-OneVision and Idefics3 families read, plus the image sources in order. A file that
breaks the format is refused as a whole before anything trains, with one line naming the file and
line (:class:`ConversationFileError`); a missing or undecodable image is not the file's fault:
:func:`open_conversation_image` raises and the caller skips and counts that conversation.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from imagefm.chat import text_parts
from imagefm.config import ConfigError

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}
OPENAI_ROLES = ("system", "user", "assistant")


class ConversationFileError(ConfigError):
    """A conversation file breaks the format; the message names the file and line."""


@dataclass
class Conversation:
    """One training conversation. ``messages``: ``{"role", "content": [parts]}``; ``images``:
    the sources (a path or a ``data:`` URL) of its image parts, in order; ``where``: file:line."""

    messages: list[dict[str, Any]]
    images: list[str]
    where: str

    def text_messages(self, image_token: str) -> list[dict[str, str]]:
        """The messages with string content, each image written as ``image_token`` (followed by
        a newline when text comes after it, as LLaVA writes ``<image>\\n...``)."""
        out = []
        for message in self.messages:
            pieces, parts = [], message["content"]
            for index, part in enumerate(parts):
                if part["type"] == "text":
                    pieces.append(part["text"])
                else:
                    following = parts[index + 1:index + 2]
                    pieces.append(image_token + ("\n" if following and
                                                 following[0]["type"] == "text" else ""))
            out.append({"role": message["role"], "content": "".join(pieces)})
        return out


def read_conversations(path: str | Path, images: str | Path | None = None) -> list[Conversation]:
    """Every conversation of a ``.json``/``.jsonl`` file; image paths relative to ``images``
    (default: the file's folder). Raises :class:`ConversationFileError` on the first entry that
    breaks the format, ``FileNotFoundError`` when there is no such file."""
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConversationFileError(f"{path}: not UTF-8 text ({err.reason} at byte "
                                    f"{err.start})") from None
    conversations = [parse_conversation(entry, root, f"{path}:{line}")
                     for line, entry in _entries(text, path)]
    if not conversations:
        raise ConversationFileError(f"{path}: holds no conversations")
    return conversations


def parse_conversation(entry: Any, root: str | Path, where: str) -> Conversation:
    """The :class:`Conversation` of one decoded LLaVA or OpenAI entry (image paths relative to
    ``root``; ``where`` names it in errors). Raises :class:`ConversationFileError` when it breaks
    the format. Streams read files one entry at a time with it (train/conversation_stream.py)."""
    root = Path(root)
    if not isinstance(entry, dict):
        raise ConversationFileError(f"{where}: expected a JSON object with 'conversations' "
                                    f"(LLaVA) or 'messages' (OpenAI), got "
                                    f"{type(entry).__name__}")
    if "conversations" in entry:
        conversation = _llava(entry, root, where)
    elif "messages" in entry:
        conversation = _openai(entry, root, where)
    else:
        raise ConversationFileError(f"{where}: no 'conversations' (LLaVA) or 'messages' "
                                    f"(OpenAI) key; keys are {sorted(entry)}")
    if not any(m["role"] == "assistant" and _has_text(m) for m in conversation.messages):
        raise ConversationFileError(f"{where}: no assistant reply to learn from")
    return conversation


def _entries(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of each entry of a JSON list or of a JSON-lines file."""
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConversationFileError(f"{path}:{number}: not valid JSON ({err.msg}, "
                                                f"column {err.colno})") from None
        return
    decoder, position, line = json.JSONDecoder(), start + 1, 1 + text.count("\n", 0, start)

    def skip(position: int, line: int) -> tuple[int, int]:
        end = position
        while end < len(text) and text[end] in " \t\r\n":
            end += 1
        return end, line + text.count("\n", position, end)

    position, line = skip(position, line)
    if text.startswith("]", position):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise ConversationFileError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, "
                                        f"column {err.colno})") from None
        yield line, value
        line += text.count("\n", position, end)
        position, line = skip(end, line)
        if text.startswith(",", position):
            position, line = skip(position + 1, line)
        elif text.startswith("]", position):
            return
        else:
            raise ConversationFileError(f"{path}:{line}: not valid JSON (expected ',' or ']' "
                                        f"between entries)")


def _has_text(message: dict[str, Any]) -> bool:
    return any(p["type"] == "text" and p["text"].strip() for p in message["content"])


def _text_parts(text: str) -> list[dict[str, Any]]:
    """A turn's text split at its ``<image>`` placeholders (:func:`imagefm.chat.text_parts`)."""
    return text_parts(text, IMAGE_PLACEHOLDER)


def _llava(entry: dict[str, Any], root: Path, where: str) -> Conversation:
    turns = entry["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ConversationFileError(f"{where}: 'conversations' must be a non-empty list of "
                                    f"{{'from', 'value'}} turns")
    image = entry.get("image", entry.get("images"))
    sources = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(sources, list) or not all(isinstance(s, str) and s for s in sources):
        raise ConversationFileError(f"{where}: 'image' must be a file name or a list of them")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConversationFileError(f"{where}: turn {number} must be {{'from': ..., "
                                        f"'value': <text>}}")
        role = LLAVA_ROLES.get(str(turn.get("from")))
        if role is None:
            raise ConversationFileError(f"{where}: turn {number} is from {turn.get('from')!r}; "
                                        f"use human, gpt or system")
        if role != "user" and IMAGE_PLACEHOLDER in turn["value"]:
            raise ConversationFileError(f"{where}: turn {number} ({turn['from']}) holds "
                                        f"{IMAGE_PLACEHOLDER}; images go in human turns")
        messages.append({"role": role, "content": _text_parts(turn["value"])})
    placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
    if placeholders == 0 and sources:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ConversationFileError(f"{where}: images but no human turn to put them in")
        first["content"] = [{"type": "image"} for _ in sources] + first["content"]
    elif placeholders != len(sources):
        raise ConversationFileError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} "
                                    f"placeholder(s) but {len(sources)} image(s)")
    return Conversation(messages, [_image_source(s, root, where) for s in sources], where)


def _openai(entry: dict[str, Any], root: Path, where: str) -> Conversation:
    raw = entry["messages"]
    if not isinstance(raw, list) or not raw:
        raise ConversationFileError(f"{where}: 'messages' must be a non-empty list")
    messages, sources = [], []
    for number, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in OPENAI_ROLES:
            raise ConversationFileError(f"{where}: message {number} must have a role of "
                                        f"{', '.join(OPENAI_ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ConversationFileError(f"{where}: message {number}: content must be text or a "
                                        f"list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image"):
                if message["role"] != "user":
                    raise ConversationFileError(f"{where}: message {number} "
                                                f"({message['role']}) holds an image; images "
                                                f"go in user messages")
                url = part.get(kind)
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise ConversationFileError(f"{where}: message {number}: an {kind} part "
                                                f"needs a URL or path")
                sources.append(_image_source(url, root, where))
                parts.append({"type": "image"})
            else:
                raise ConversationFileError(f"{where}: message {number}: a content part must "
                                            f"be {{'type': 'text', 'text': ...}} or "
                                            f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}")
        messages.append({"role": message["role"], "content": parts})
    return Conversation(messages, sources, where)


def _image_source(url: str, root: Path, where: str) -> str:
    """A ``data:`` URL as it is, a path (or ``file://`` URL) resolved against ``root``."""
    if url.startswith("data:"):
        return url
    scheme = urlparse(url).scheme
    if scheme == "file":
        return unquote(urlparse(url).path)
    if scheme in ("http", "https", "ftp"):
        raise ConversationFileError(f"{where}: {url[:80]} is a web URL; training fetches "
                                    f"nothing: download the image and name the file")
    return str(root / url)


class MissingImage(FileNotFoundError):
    """An image file of a conversation does not exist."""


def open_conversation_image(source: str) -> Any:
    """The RGB PIL image of a path or ``data:`` URL. Raises :class:`MissingImage` for a file
    that is not there and ``ImageDecodeError`` for one that does not decode."""
    from imagefm.data.image import ImageDecodeError, open_image

    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageDecodeError(source[:40], "only base64 data: URLs are read")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageDecodeError(source[:40], "not valid base64") from None
        return open_image(data, name=f"{header},...")
    if not Path(source).is_file():
        raise MissingImage(f"no image file {source}")
    return open_image(source)
