"""Fixtures for the search and serving tests: a "colour model" whose right answers are known.

``ColourModel`` is a dual encoder in miniature: an image's embedding is its mean colour (in the
card's normalised pixel space, i.e. centred on grey) and a text's embedding is the colour of the
colour words it contains, English or Korean ("red", "빨간색"). So the query "빨간색" must find
the red image first, "blue" the blue one, and a zero-shot classifier must label a green image
"green". The tests below check the fixture itself before others rely on it.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from imagefm.config import ImageCard

# Far-apart colours (from the synthetic vocabulary) with English and Korean words for them.
COLOURS = {
    "red": ((220, 30, 35), ("red", "빨간색", "빨간")),
    "green": ((35, 155, 55), ("green", "초록색", "초록")),
    "blue": ((35, 75, 220), ("blue", "파란색", "파란")),
    "yellow": ((245, 215, 35), ("yellow", "노란색", "노란")),
    "purple": ((135, 50, 175), ("purple", "보라색", "보라")),
    "black": ((20, 20, 20), ("black", "검은색", "검은")),
}
NAMES = list(COLOURS)
CARD = ImageCard(image_size=16, resize_mode="shortest", interpolation="bilinear",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def colour_vector(name: str) -> np.ndarray:
    """The direction a colour's image embeds to: RGB in the card's normalised space."""
    rgb = np.asarray(COLOURS[name][0], dtype=np.float32) / 255.0
    return (rgb - 0.5) / 0.5


class ColourTokenizer:
    """Text → ids of the colour words it contains (1 + colour index), padded with 0."""

    length = 8

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.zeros(len(texts), self.length, dtype=torch.long)
        for row, text in enumerate(texts):
            text = unicodedata.normalize("NFC", text).lower()
            found = [i + 1 for i, name in enumerate(NAMES)
                     if any(word in text for word in COLOURS[name][1])][: self.length]
            ids[row, : len(found)] = torch.tensor(found, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


class ColourModel(nn.Module):
    """encode_image: mean normalised colour; encode_text: sum of the named colours' vectors."""

    def __init__(self) -> None:
        super().__init__()
        table = np.stack([np.zeros(3, np.float32)] + [colour_vector(n) for n in NAMES])
        self.colour_table = nn.Parameter(torch.from_numpy(table), requires_grad=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(50.0))), requires_grad=False)
        self.logit_bias = None
        self.card = CARD
        self.config = SimpleNamespace(model_type="clip", embed_dim=3)
        self.tokenizer = ColourTokenizer()
        self.image_calls: list[int] = []  # batch sizes seen, for the batching tests

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.image_calls.append(int(pixel_values.shape[0]))
        return pixel_values.float().mean(dim=(2, 3))

    def encode_text(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        vectors = self.colour_table[input_ids].sum(dim=1)
        # No colour word at all: a fixed direction (grey-ish) instead of a zero vector.
        empty = vectors.abs().sum(dim=-1, keepdim=True) == 0
        return torch.where(empty, torch.full_like(vectors, 1e-3), vectors)


def image_bytes(name: str, fmt: str = "PNG", size: tuple[int, int] = (24, 20),
                seed: int = 0) -> bytes:
    """An image filled with one colour (plus a little noise) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    rgb = np.asarray(COLOURS[name][0], dtype=np.int16)
    pixels = np.clip(rgb + rng.integers(-6, 7, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# One file per colour, in every format the walker must accept (and nested folders).
FORMATS = {"red": ("red.png", "PNG"), "green": ("sub/green.jpg", "JPEG"),
           "blue": ("sub/deeper/blue.webp", "WEBP"), "yellow": ("yellow.gif", "GIF"),
           "purple": ("purple.bmp", "BMP"), "black": ("sub/black.tiff", "TIFF")}


def make_colour_folder(root: Path) -> dict[str, str]:
    """Write one image per colour under ``root``; returns colour → relative path."""
    paths = {}
    for name, (rel, fmt) in FORMATS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(name, fmt))
        paths[name] = rel
    return paths


def tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random tiny CLIP with a small English + Korean BPE tokenizer, saved to ``directory``."""
    from imagefm.config import preset
    from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer
    from imagefm.tokenizer import train_bpe

    torch.manual_seed(seed)
    words = [w for name in NAMES for w in COLOURS[name][1]]
    texts = [f"a photo of a {w} car" for w in words] + [f"{w} 자동차 사진" for w in words]
    tokenizer = train_bpe(texts * 3, vocab_size=400, context_length=32)
    model = DualEncoder(fit_text_to_tokenizer(preset("tiny"), tokenizer))
    model.tokenizer = tokenizer
    model.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- the fixture's own tests ------------------------------------------------------------------

def test_colour_words_in_both_languages_embed_alike() -> None:
    model = ColourModel()
    tok = model.tokenizer(["a photo of something red", "빨간색 사진", "파란 하늘"])
    embeds = model.encode_text(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(embeds[0], embeds[1])
    assert torch.allclose(embeds[2], torch.from_numpy(colour_vector("blue")))


def test_an_image_embeds_to_its_colour() -> None:
    from imagefm.processor import Processor

    model = ColourModel()
    processor = Processor.for_model(model)
    pixels = processor(images=[image_bytes("green")])["pixel_values"]
    embed = model.encode_image(pixels)[0].numpy()
    cosine = embed @ colour_vector("green") / np.linalg.norm(embed) / np.linalg.norm(
        colour_vector("green"))
    assert cosine > 0.999
