"""int8 versions of the exported ONNX graphs, made with onnxruntime's own quantisation tools.

``dynamic`` (``quantize_dynamic``): MatMul / Gemm weights become int8, one scale per output
channel; activations are quantised at run time from each batch's own range (MatMulInteger).
Needs no data. The patch-embedding convolution stays float: one small layer, and older
onnxruntime releases lack an int8-weight ConvInteger kernel (1.32 has one).

``static`` (``quantize_static``, QDQ format): weights int8 per channel as above, and each MatMul's
activation inputs get a fixed scale from their range over a calibration set (min/max over a few
batches of images and texts, run through the float graph). Only MatMul / Gemm / Conv inputs are
quantised: residual additions, LayerNorm and softmax stay float, where int8 costs the most
accuracy for the least speed.

The quantised graphs are written beside the float ones as ``*.int8.onnx``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagefm.checkpoint import atomic_write
from imagefm.config import ConfigError
from imagefm.data.formats import SkipCounter
from imagefm.data.image import ImageDecodeError, ImageProcessor

INT8_MODES = ("dynamic", "static")
INT8_SUFFIX = ".int8.onnx"
DYNAMIC_OPS = ["MatMul", "Gemm"]
STATIC_OPS = ["MatMul", "Gemm", "Conv"]


@dataclass
class Calibration:
    """What static quantisation measures activation ranges on: images (anything the image
    processor takes: paths, bytes, PIL images, uint8 arrays) and texts, fed in batches."""

    images: Sequence[Any]
    texts: Sequence[str]
    batch_size: int = 8
    skips: SkipCounter = field(default_factory=SkipCounter)  # images that did not decode

    def __post_init__(self) -> None:
        if not self.images or not self.texts:
            raise ConfigError(f"calibration needs images and texts, got {len(self.images)} "
                              f"images and {len(self.texts)} texts")
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch_size must be >= 1, got {self.batch_size}")


def calibration_from_records(records: Iterable[Any], limit: int = 64,
                             batch_size: int = 8) -> Calibration:
    """A :class:`Calibration` from the first ``limit`` records with an image: their images and
    captions (every language), or, for records without captions, "a photo of a {label}."."""
    images: list[Any] = []
    texts: list[str] = []
    for record in records:
        if record.image is None:
            continue
        images.append(record.image)
        captions = [c.text for c in record.captions]
        texts.extend(captions or ([f"a photo of a {record.label_name}."]
                                  if record.label_name else []))
        if len(images) >= limit:
            break
    return Calibration(images, texts[:max(limit, 1)], batch_size)


def int8_path(path: str | Path) -> Path:
    """``image_encoder.onnx`` → ``image_encoder.int8.onnx``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".onnx") + INT8_SUFFIX)


def quantize_int8(graphs: dict[str, Path], mode: str, *,
                  calibration: Calibration | None = None, card: Any = None,
                  tokenizer: Any = None) -> dict[str, Path]:
    """Write an ``*.int8.onnx`` beside each of ``graphs`` (``{"image_encoder": path,
    "text_encoder": path}``, as :func:`imagefm.convert.onnx_export.export_onnx` wrote them).

    ``static`` needs ``calibration`` plus the model's image ``card`` and ``tokenizer`` (to turn
    the calibration images and texts into the graphs' inputs). Returns the paths by name
    (``image_encoder_int8``, ``text_encoder_int8``).
    """
    if mode not in INT8_MODES:
        raise ConfigError(f"int8 = {mode!r}: choose one of {', '.join(INT8_MODES)}")
    if mode == "dynamic":
        with _without_preprocess_hint():
            return {f"{name}_int8": _quantize_dynamic(path) for name, path in graphs.items()}
    if calibration is None or card is None or tokenizer is None:
        raise ConfigError("int8 = 'static' needs calibration images and texts, and a model "
                          "with its image card and tokenizer to prepare them")
    feeds = {"image_encoder": list(image_batches(calibration, card)),
             "text_encoder": list(text_batches(calibration, tokenizer))}
    with _without_preprocess_hint():
        return {f"{name}_int8": _quantize_static(path, feeds[name])
                for name, path in graphs.items()}


@contextlib.contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    """Drop onnxruntime's "Please consider pre-processing before quantization" warning.

    Its pre-processing (symbolic shape inference + graph optimisation) is for graphs without
    shape information; the dynamo exporter's graphs carry it and come optimised, and the
    symbolic shape inference fails on the text graph's dynamic sequence axis anyway."""
    class Hint(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    hint, root = Hint(), logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def image_batches(calibration: Calibration, card: Any) -> Iterator[dict[str, np.ndarray]]:
    """The calibration images as the image graph's inputs, batch by batch. Images that do not
    decode are skipped and counted in ``calibration.skips``."""
    processor = ImageProcessor(card)
    pixels = []
    for image in calibration.images:
        try:
            pixels.append(processor.preprocess_one(image))
        except ImageDecodeError as err:
            calibration.skips.add("undecodable image", str(err))
            continue
        calibration.skips.ok()
    if not pixels:
        raise ConfigError(f"no calibration image could be decoded "
                          f"({calibration.skips.summary()})")
    size = calibration.batch_size
    for start in range(0, len(pixels), size):
        yield {"pixel_values": np.stack(pixels[start:start + size])}


def text_batches(calibration: Calibration, tokenizer: Any) -> Iterator[dict[str, np.ndarray]]:
    """The calibration texts as the text graph's inputs, batch by batch."""
    texts, size = list(calibration.texts), calibration.batch_size
    for start in range(0, len(texts), size):
        batch = tokenizer(texts[start:start + size])
        yield {"input_ids": batch["input_ids"].numpy(),
               "attention_mask": batch["attention_mask"].numpy()}


def _quantize_dynamic(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(tmp: Path) -> None:
        quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=DYNAMIC_OPS)

    return atomic_write(int8_path(path), write)


def _quantize_static(path: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    def write(tmp: Path) -> None:
        # (The calibrator's augmented copy of the graph goes to a temporary directory of its own.)
        quantize_static(path, tmp, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True, op_types_to_quantize=STATIC_OPS,
                        calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=["CPUExecutionProvider"])

    return atomic_write(int8_path(path), write)
