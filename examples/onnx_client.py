"""Zero-shot classification with an exported dual encoder, WITHOUT imagefm: onnxruntime,
tokenizers, PIL and numpy, following the export's preprocess.json (docs/deploy.md).

    imagefm export MODEL --format onnx --out exported/
    python examples/onnx_client.py exported/ photo.jpg "a dog" "a cat" "a bird"

``client_pixels`` and ``client_tokens`` reproduce imagefm's processor exactly (pixels within
1e-6, the same token ids: tests/test_onnx_export.py checks them against it).
"""

from __future__ import annotations

import json
import re
import string
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def client_pixels(card: dict[str, Any], image: Any) -> np.ndarray:
    """[3, S, S] float32 from a PIL RGB image, following preprocess.json alone."""
    spec = card["image"]
    size, mode = spec["size"], spec["resize"]["mode"]
    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST}
    width, height = image.size
    if mode == "squash":
        new = (size, size)
    elif width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    if new != image.size:
        image = image.resize(new, filters[spec["resize"]["interpolation"]])
    pixels = np.asarray(image)
    if spec["crop"] is not None:
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        pixels = pixels[top:top + size, left:left + size]
    scaled = (pixels.astype(np.float64) * spec["rescale"]).astype(np.float32)
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return ((scaled - mean) / std).transpose(2, 0, 1)


def client_tokens(card: dict[str, Any], directory: Path, texts: list[str]) -> dict[str, Any]:
    """input_ids / attention_mask from tokenizer.json and preprocess.json alone."""
    from tokenizers import Tokenizer

    spec = card["text"]
    backend = Tokenizer.from_file(str(directory / spec["tokenizer"]["file"]))
    rows = []
    for text in texts:
        text = unicodedata.normalize("NFC", text)
        if any(step.startswith("canonicalize") for step in spec["normalize"]):
            text = text.translate(str.maketrans("", "", string.punctuation))
            text = re.sub(r"\s+", " ", text).strip()
        if any(step.startswith("lowercase") for step in spec["normalize"]):
            text = text.lower()
        pieces = backend.encode(text, add_special_tokens=False).ids
        head = [spec["bos_id"]] if spec["bos_id"] is not None else []
        tail = [spec["eos_id"]] if spec["eos_id"] is not None else []
        rows.append(head + pieces[:spec["context_length"] - len(head) - len(tail)] + tail)
    length = (spec["context_length"] if spec["padding"] == "max_length"
              else max(len(r) for r in rows))
    ids = np.full((len(rows), length), spec["pad_id"], dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


def classify(directory: Path, image_path: str, labels: list[str]) -> list[tuple[str, float]]:
    """(label, probability) for one image, best first (softmax for CLIP, sigmoid for SigLIP)."""
    import onnxruntime as ort

    card = json.loads((directory / "preprocess.json").read_text())
    image = Image.open(image_path).convert("RGB")
    pixels = client_pixels(card, image)[None]
    tokens = client_tokens(card, directory, labels)
    graphs = card["graphs"]
    image_embeds = ort.InferenceSession(str(directory / graphs["image"]["file"])).run(
        None, {"pixel_values": pixels})[0]
    text_embeds = ort.InferenceSession(str(directory / graphs["text"]["file"])).run(
        None, tokens)[0]
    image_embeds /= np.linalg.norm(image_embeds, axis=-1, keepdims=True)
    text_embeds /= np.linalg.norm(text_embeds, axis=-1, keepdims=True)
    logits = (card["logits"]["logit_scale"] * image_embeds @ text_embeds.T
              + (card["logits"]["logit_bias"] or 0.0))[0]
    if card["logits"]["probabilities"].startswith("softmax"):  # CLIP: one label among these
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
    else:  # SigLIP: each label on its own
        probs = 1.0 / (1.0 + np.exp(-logits))
    return sorted(zip(labels, probs.tolist(), strict=True), key=lambda p: -p[1])


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: python onnx_client.py EXPORT_DIR IMAGE LABEL [LABEL ...]")
    for label, prob in classify(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]):
        print(f"{prob:7.3f}  {label}")
