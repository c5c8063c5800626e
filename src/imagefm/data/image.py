"""Images in, pixel values out: robust decoding and per-model-card preprocessing.

Two steps, kept apart so that data sources can decode once and count failures:

* ``open_image`` turns a path, bytes, a stream or a PIL image into a fully loaded RGB image, or
  raises ``ImageDecodeError`` naming the file and the reason. It reads the format from the
  content (a PNG named ``.jpg`` decodes fine), refuses decompression bombs before decoding any
  pixel, refuses truncated files, applies the EXIF orientation, composites transparency over
  white and scales 16/32-bit images by their bit depth.
* ``ImageProcessor`` applies one model card (``imagefm.config.ImageCard``): resize, centre crop,
  ``/255``, ``(x - mean) / std``. Its arithmetic reproduces Hugging Face's PIL image processors
  bit for bit (``CLIPImageProcessor`` before transformers 5, ``CLIPImageProcessorPil`` /
  ``SiglipImageProcessorPil`` after), which is how the published CLIP/SigLIP checkpoints were
  evaluated; torchvision/open_clip on PIL images agree except for one rounding convention of the
  centre crop, see ``ImageProcessor.crop_offsets``.

No torchvision: PIL does the resampling (its bicubic/bilinear filters antialias when shrinking),
numpy the arithmetic, torch only holds the final batch.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imagefm.config import ImageCard

logger = logging.getLogger(__name__)

ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO | Image.Image

# Same number as Pillow's own warning threshold (Image.MAX_IMAGE_PIXELS): ~ 9459 x 9459.
DEFAULT_MAX_PIXELS = 89_478_485

# Pillow hands EPS files to Ghostscript when they are loaded; never run that on untrusted data.
_REFUSED_FORMATS = frozenset({"EPS"})

_RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# "shortest" resizing of a very elongated image (say 3 x 4000) would build a huge intermediate
# image (224 x 298666 here) only to crop most of it away. Past this ratio of the resized long side
# to the crop we resample just the crop window instead (see ImageProcessor._resize_and_crop).
_CROP_FIRST_RATIO = 16

_warned_truncated = False


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the file (or ``<bytes>``) and why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot decode image {name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # DataLoader workers pickle exceptions; the default would call __init__(message) only.
        return (type(self), (self.name, self.reason))


# --- decoding ------------------------------------------------------------------------------------

def open_image(source: ImageSource, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` into a fully loaded RGB ``PIL.Image``.

    ``source`` is a path, encoded bytes, a binary stream, or an already opened PIL image.
    ``name`` is used in error messages (defaults to the path, the stream's name, or
    ``<bytes>``). Images with more than ``max_pixels`` pixels are refused from their header,
    before any pixel is decoded; Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``) still
    applies above that. Animated images give their first frame. Every failure, whatever Pillow
    raised (including its decompression-bomb error), becomes ``ImageDecodeError``.
    A PIL image passed in is never modified; it is returned as is when already RGB and upright.
    """
    label = name or _describe(source)
    try:
        if isinstance(source, Image.Image):
            _check_pixel_count(source.size, max_pixels, label)
            source.load()
            image = _apply_orientation(source, in_place=False)
        else:
            image = _decode(source, max_pixels, label)
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as err:  # Pillow raises many types for bad data; all mean "skip this one"
        raise ImageDecodeError(label, _reason(err)) from err


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return str(getattr(source, "name", "") or "<stream>")


def _decode(source: Any, max_pixels: int, label: str) -> Image.Image:
    _warn_if_truncated_images_allowed()
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError(label, "empty data (0 bytes)")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file() and path.stat().st_size == 0:
            raise ImageDecodeError(label, "empty file (0 bytes)")
    # Image.open reads the header only; a stream the caller passed in is left open.
    with Image.open(source) as image:
        _check_pixel_count(image.size, max_pixels, label)
        if image.format in _REFUSED_FORMATS:
            raise ImageDecodeError(label, f"{image.format} files are not accepted")
        image.load()  # decodes the first frame; truncated data raises here
        _apply_orientation(image, in_place=True)
        return image


def _check_pixel_count(size: tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(label, f"{width}x{height} = {width * height} pixels is more than "
                                      f"the limit of {max_pixels} (possible decompression bomb)")
    if width <= 0 or height <= 0:
        raise ImageDecodeError(label, f"invalid size {width}x{height}")


def _reason(err: Exception) -> str:
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels (possible decompression bomb): {err}"
    if isinstance(err, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    text = str(err)
    if "truncated" in text:
        return f"truncated data ({text})"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _warn_if_truncated_images_allowed() -> None:
    # The switch is global in Pillow and we never touch it; if some other library turned it on,
    # truncated files would decode into partly grey images, so say so once.
    global _warned_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
        _warned_truncated = True
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on (set by some other code): "
                       "truncated images will be accepted instead of refused")


def _apply_orientation(image: Image.Image, *, in_place: bool) -> Image.Image:
    """Rotate/flip per the EXIF orientation tag (a camera's 'this side up')."""
    try:
        orientation = image.getexif().get(0x0112, 1)  # 0x0112: Orientation
        if orientation not in range(2, 9):
            return image  # upright (or a bogus value): nothing to do, and no copy
        if in_place:
            ImageOps.exif_transpose(image, in_place=True)
            return image
        return ImageOps.exif_transpose(image)
    except Exception as err:
        # Unreadable EXIF says nothing about the pixels, which are fine: keep them as stored.
        logger.debug("ignoring unreadable EXIF orientation: %s", err)
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and image.info.get("transparency") is None:
        return image
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        return _high_depth_to_rgb(image)
    bands = image.getbands()
    if "A" in bands or "a" in bands or image.info.get("transparency") is not None:
        # Transparent pixels become white, as in HF's convert_rgb: black would turn logos and
        # cut-outs into dark blobs. Pillow's convert applies a palette/colour-key transparency.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX...


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey images → 8-bit RGB, scaled by range rather than clipped.

    Pillow's own ``convert("L")`` clips everything above 255 to white.
    """
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0  # floats in [0, 1]: the usual convention
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        opaque = None
    else:
        values = _integer_pixels(image)
        bits = _bit_depth(image, values)
        transparency = image.info.get("transparency")
        opaque = values != transparency if isinstance(transparency, int) else None
        if values.size and values.min() < 0:
            values = values + (1 << (bits - 1))  # signed data: shift to unsigned first
        top = (1 << bits) - 1
        # round(v * 255 / top) in exact integer arithmetic: 65535 → 255, 32768 → 128.
        grey = ((2 * 255 * values + top) // (2 * top)).clip(0, 255).astype(np.uint8)
    if opaque is not None:
        grey = np.where(opaque, grey, np.uint8(255))
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _integer_pixels(image: Image.Image) -> np.ndarray:
    try:
        values = np.asarray(image)
    except (TypeError, ValueError, KeyError):  # a raw mode numpy has no dtype for
        values = np.asarray(image.convert("I"))
    return values.astype(np.int64)


def _bit_depth(image: Image.Image, values: np.ndarray) -> int:
    if image.mode.startswith("I;16"):
        return 16
    tag = getattr(image, "tag_v2", None)  # TIFF says how many bits each sample has
    if tag is not None:
        bits = tag.get(258)
        bits = bits[0] if isinstance(bits, tuple) else bits
        if isinstance(bits, int) and 8 <= bits <= 32:
            return bits
    # Mode "I" without a declared depth: 16 bits when the values fit (16-bit PNG/PPM), else 32.
    if values.size == 0 or (values.min() >= 0 and values.max() <= 0xFFFF):
        return 16
    return 32


# --- preprocessing -------------------------------------------------------------------------------

class ImageProcessor:
    """Images → normalised ``float32`` pixel values ``[B, 3, S, S]`` for one model card.

    ``resize_mode="shortest"`` resizes the shorter side to ``S`` (the longer one to
    ``int(S * long / short)``, truncated, as HF and torchvision do) and centre-crops ``S x S``;
    ``"squash"`` resizes straight to ``S x S``; ``"pad"`` (letterbox) resizes the longer side to
    ``S`` and centres the picture on a white ``S x S`` canvas (white, as transparency is
    composited: cut-out pictures such as clip art and stamps keep their whole outline).
    Resampling is PIL's ``interpolation`` filter.
    Accepts anything ``open_image`` accepts, plus ``uint8`` numpy arrays ``HxW``, ``HxWx3`` or
    ``HxWx4`` (an ``SxSx3`` array skips PIL entirely).
    """

    def __init__(self, card: ImageCard, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if card.resize_mode == "naflex":
            raise ValueError("a NaFlex card gives patches, not square images: use "
                             "imagefm.data.naflex.NaFlexImageProcessor (or imagefm.Processor)")
        self.card = card
        self.size = card.image_size
        self.max_pixels = max_pixels
        self._resample = _RESAMPLING[card.interpolation]
        self._table = _normalisation_table(card.mean, card.std)

    def __call__(self, images: ImageSource | np.ndarray | Sequence[Any]) -> torch.Tensor:
        """A batch ``[B, 3, S, S]`` (a single image gives ``B = 1``)."""
        if isinstance(images, (list, tuple)):
            items = images
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        else:
            items = [images]
        batch = np.empty((len(items), 3, self.size, self.size), dtype=np.float32)
        for index, image in enumerate(items):
            self._normalise_into(self.resize_and_crop(image), batch[index])
        return torch.from_numpy(batch)

    def preprocess_one(self, image: ImageSource | np.ndarray) -> np.ndarray:
        """One image as normalised ``float32`` ``[3, S, S]``."""
        out = np.empty((3, self.size, self.size), dtype=np.float32)
        self._normalise_into(self.resize_and_crop(image), out)
        return out

    def resize_and_crop(self, image: ImageSource | np.ndarray) -> np.ndarray:
        """The card's geometry only: ``uint8`` RGB pixels ``[S, S, 3]`` (may be a view)."""
        if isinstance(image, np.ndarray):
            pixels = _rgb_array(image)
            if pixels is not None:
                if pixels.shape[:2] == (self.size, self.size):
                    return pixels
                pil = Image.fromarray(pixels)
            else:
                pil = open_image(_array_to_pil(image), name="<array>",
                                 max_pixels=self.max_pixels)
        else:
            pil = open_image(image, max_pixels=self.max_pixels)
        return self._resize_and_crop(pil)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, before cropping."""
        size = self.size
        if self.card.resize_mode == "squash":
            return size, size
        if self.card.resize_mode == "pad":  # the longer side to S, rounded
            scale = size / max(width, height)
            return max(1, round(width * scale)), max(1, round(height * scale))
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size

    def crop_offsets(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop of a ``width x height`` resized image.

        HF's ``center_crop`` floors ``(extent - S) / 2``; torchvision's ``CenterCrop`` (used by
        open_clip) rounds it half-to-even, so when ``extent - S`` is 3 mod 4 torchvision's crop
        sits one pixel further right/down. We follow HF.
        """
        return (width - self.size) // 2, (height - self.size) // 2

    def _resize_and_crop(self, pil: Image.Image) -> np.ndarray:
        size = self.size
        width, height = pil.size
        new_width, new_height = self.resized_size(width, height)
        if self.card.resize_mode == "pad":
            if (new_width, new_height) != (width, height):
                pil = pil.resize((new_width, new_height), self._resample)
            canvas = Image.new("RGB", (size, size), (255, 255, 255))
            # Offsets rounded half to even, as Pillow's ImageOps.pad places them.
            canvas.paste(pil, (round((size - new_width) / 2), round((size - new_height) / 2)))
            return np.asarray(canvas)
        left, top = self.crop_offsets(new_width, new_height)
        if max(new_width, new_height) > _CROP_FIRST_RATIO * size:
            return self._resample_window(pil, new_width, new_height, left, top)
        if (new_width, new_height) != (width, height):
            pil = pil.resize((new_width, new_height), self._resample)
        pixels = np.asarray(pil)
        return pixels[top:top + size, left:left + size]

    def _resample_window(self, pil: Image.Image, new_width: int, new_height: int, left: int,
                         top: int) -> np.ndarray:
        """Resample only the crop window of the resized image, same filter and scale.

        Two explicit passes, horizontal then vertical, because that is the order of Pillow's
        full resize (given a box, Pillow may run the vertical pass first, which rounds the 8-bit
        intermediate differently: up to ~20 grey levels). Left: the window's fractional origin
        makes Pillow's fixed-point weights differ in the last bit now and then, i.e. about 0.2%
        of pixels one grey level off the full resize.
        """
        size = self.size
        width, height = pil.size
        x0, x1 = left * width / new_width, (left + size) * width / new_width
        y0, y1 = top * height / new_height, (top + size) * height / new_height
        # Only the source rows the vertical pass will read (the window plus the filter's reach,
        # at most 3 px for these filters, scaled when shrinking) need the horizontal pass.
        reach = 3 * max(1.0, height / new_height) + 2
        first, last = max(0, math.floor(y0 - reach)), min(height, math.ceil(y1 + reach))
        if first > 0 or last < height:
            pil = pil.crop((0, first, width, last))
            y0, y1, height = y0 - first, y1 - first, last - first
        rows = pil.resize((size, height), self._resample, box=(x0, 0, x1, height))
        return np.asarray(rows.resize((size, size), self._resample, box=(0, y0, size, y1)))

    def _normalise_into(self, pixels: np.ndarray, out: np.ndarray) -> None:
        # A 256-entry table per channel: one gather per pixel, and exactly HF's float32 values.
        for channel in range(3):
            np.take(self._table[channel], pixels[:, :, channel], out=out[channel], mode="clip")

    def __repr__(self) -> str:
        return f"ImageProcessor({self.card})"


def _normalisation_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``table[c, v]`` = pixel value ``v`` of channel ``c`` rescaled and normalised.

    Computed as HF does it (``v * (1/255)`` in float64, cast to float32, then ``(x - mean) / std``
    in float32), so table look-ups reproduce its output bit for bit.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return np.ascontiguousarray((levels[None, :] - mean32) / std32, dtype=np.float32)


def _rgb_array(array: np.ndarray) -> np.ndarray | None:
    """The array itself when it is already ``uint8`` ``HxWx3`` (the fast path), else None."""
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        return array
    return None


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageDecodeError("<array>", f"expected a uint8 array, got {array.dtype} (convert "
                                          "floats with (x * 255).round().astype(np.uint8))")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (2, 4)):
        return Image.fromarray(np.ascontiguousarray(array))  # L, LA or RGBA
    raise ImageDecodeError("<array>", f"expected HxW, HxWx1, HxWx3 or HxWx4, got {array.shape}")
