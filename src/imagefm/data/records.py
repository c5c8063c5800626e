"""The record: one image and everything known about it, shared by every data source.

Sources (folders, CSV/JSONL, WebDataset shards, the synthetic engine, recipes) all yield
``Record``s; processors and tasks read them. In a WebDataset shard a record is stored as
``<key>.<ext>`` (the encoded image) plus ``<key>.json`` (everything else, see ``to_json``).
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
IMAGE_TOKEN = "<image>"


@dataclass
class Caption:
    """A caption and its language tag (BCP-47 short form: ``en``, ``ko``...)."""

    text: str
    lang: str = "en"

    def __post_init__(self) -> None:
        self.text = unicodedata.normalize("NFC", self.text)


@dataclass
class Turn:
    """One message of a conversation; user content may hold ``<image>`` placeholders."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"conversation role must be one of {ROLES}, got {self.role!r}")
        self.content = unicodedata.normalize("NFC", self.content)


@dataclass
class Box:
    """An axis-aligned box in pixel coordinates of the stored image, with an optional label."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str = ""


@dataclass
class Record:
    """One training/evaluation example.

    ``image`` holds the encoded image bytes (PNG/JPEG/...) so records stay cheap to copy and
    can be written to shards unchanged; decode with ``imagefm.data.image.open_image``.
    """

    key: str
    image: bytes | None = None
    image_ext: str = "png"  # extension of the encoded bytes: png, jpg, webp...
    captions: list[Caption] = field(default_factory=list)
    label: int | None = None
    label_name: str | None = None
    conversation: list[Turn] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    mask: bytes | None = None  # PNG-encoded single-channel mask (e.g. defect pixels), same size
    split: str = "train"
    source: str = ""
    license: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def captions_in(self, lang: str) -> list[str]:
        return [c.text for c in self.captions if c.lang == lang]

    def to_json(self) -> dict[str, Any]:
        """Everything but the image and mask bytes, as JSON-serialisable data."""
        data = asdict(self)
        for name in ("image", "mask", "key"):
            data.pop(name)
        data["has_mask"] = self.mask is not None
        return data

    @classmethod
    def from_json(cls, key: str, data: dict[str, Any], image: bytes | None = None,
                  image_ext: str | None = None, mask: bytes | None = None) -> Record:
        data = dict(data)
        data.pop("has_mask", None)
        return cls(
            key=key,
            image=image,
            image_ext=image_ext or data.pop("image_ext", "png"),
            captions=[Caption(**c) for c in data.pop("captions", [])],
            conversation=[Turn(**t) for t in data.pop("conversation", [])],
            boxes=[Box(**b) for b in data.pop("boxes", [])],
            mask=mask,
            **{k: v for k, v in data.items() if k != "image_ext"},
        )
