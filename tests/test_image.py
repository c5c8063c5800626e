"""Image decoding and per-card preprocessing, checked against HF, open_clip and known pixels."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from imagefm.config import CLIP_MEAN_STD, HALF_MEAN_STD, ImageCard
from imagefm.data.image import ImageDecodeError, ImageProcessor, open_image

S = 224
CLIP_CARD = ImageCard(S, "shortest", "bicubic", *CLIP_MEAN_STD)
# One grey level after normalisation, for the narrowest std of the CLIP card.
ONE_LEVEL = 1 / 255 / min(CLIP_MEAN_STD[1])
ODD_SIZES = [(300, 200), (199, 257), (64, 64), (640, 480), (224, 227), (227, 224), (1000, 230),
             (224, 224)]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# --- parity with the reference implementations --------------------------------------------------

def hf_pil_processor(name: str, **kwargs):
    """HF's PIL-backed processor: ``XImageProcessorPil`` in transformers 5, ``XImageProcessor``
    before (where the plain class was the PIL one)."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, f"{name}ImageProcessorPil", None)
    if cls is None:
        cls = getattr(transformers, f"{name}ImageProcessor")
    return cls(**kwargs)


@pytest.mark.parametrize("size", ODD_SIZES)
def test_shortest_bicubic_matches_hf_clip_processor(size):
    reference = hf_pil_processor("CLIP", size={"shortest_edge": S},
                                 crop_size={"height": S, "width": S})
    image = random_image(*size)
    expected = reference(image, return_tensors="np")["pixel_values"][0]
    ours = ImageProcessor(CLIP_CARD)(image)[0].numpy()
    assert ours.shape == expected.shape == (3, S, S)
    assert np.abs(ours - expected).max() <= 1e-5


@pytest.mark.parametrize("size", ODD_SIZES)
def test_shortest_bicubic_matches_open_clip(size):
    open_clip = pytest.importorskip("open_clip")
    transform = open_clip.image_transform(S, is_train=False)
    processor = ImageProcessor(CLIP_CARD)
    image = random_image(*size)
    expected = transform(image).numpy()
    ours = processor(image)[0].numpy()
    new_width, new_height = processor.resized_size(*size)
    shifts = [(extent - S) % 4 == 3 for extent in (new_height, new_width)]
    if not any(shifts):
        assert np.abs(ours - expected).max() <= 1e-5
        return
    # torchvision's CenterCrop rounds (extent - S) / 2 half-to-even where HF floors it, so when
    # extent - S = 3 (mod 4) open_clip's crop sits one pixel further down/right; we follow HF.
    # The residual is exactly that shift: the overlapping S-1 rows/columns agree to 1e-5 (while
    # the unshifted difference is as large as neighbouring pixels differ: here several units).
    down, right = int(shifts[0]), int(shifts[1])
    overlap = np.abs(ours[:, down:, right:] - expected[:, :S - down, :S - right])
    assert overlap.max() <= 1e-5
    assert np.abs(ours - expected).max() > 0.5


def test_open_clip_shift_case_is_exercised():
    processor = ImageProcessor(CLIP_CARD)
    assert any((extent - S) % 4 == 3 for size in ODD_SIZES
               for extent in processor.resized_size(*size))


def test_shortest_bicubic_close_to_transformers_torchvision_backend():
    """transformers 5's default ``CLIPImageProcessor`` resizes uint8 tensors with torchvision's
    antialiased bicubic instead of PIL: at most one grey level apart, on a small share of pixels."""
    transformers = pytest.importorskip("transformers")
    cls = transformers.CLIPImageProcessor
    if "Torchvision" not in " ".join(base.__name__ for base in cls.__mro__):
        cls = getattr(transformers, "CLIPImageProcessorFast", None)
    if cls is None:
        pytest.skip("no torchvision-backed CLIP processor in this transformers")
    reference = cls(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    processor = ImageProcessor(CLIP_CARD)
    for size in ODD_SIZES:
        image = random_image(*size)
        expected = reference(image, return_tensors="pt")["pixel_values"][0].numpy()
        diff = np.abs(processor(image)[0].numpy() - expected)
        assert diff.max() <= 2 * ONE_LEVEL + 1e-5
        assert diff.mean() <= 1e-3


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(300, 200), (199, 257), (64, 64), (640, 480)])
def test_squash_matches_hf_siglip_processor(size, interpolation):
    # SigLIP checkpoints use bicubic (HF resample=3); SigLIP 2's fixed-size ones bilinear (2).
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    reference = hf_pil_processor("Siglip", size={"height": S, "width": S},
                                 resample=resample[interpolation])
    card = ImageCard(S, "squash", interpolation, *HALF_MEAN_STD)
    image = random_image(*size)
    expected = reference(image, return_tensors="np")["pixel_values"][0]
    ours = ImageProcessor(card)(image)[0].numpy()
    assert np.abs(ours - expected).max() <= 1e-5


def test_squash_bilinear_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    transform = open_clip.image_transform(S, is_train=False, mean=0.5, std=0.5,
                                          resize_mode="squash", interpolation="bilinear")
    processor = ImageProcessor(ImageCard(S, "squash", "bilinear", *HALF_MEAN_STD))
    for size in [(300, 200), (199, 257)]:
        image = random_image(*size)
        assert np.abs(processor(image)[0].numpy() - transform(image).numpy()).max() <= 1e-5


@pytest.mark.parametrize("size", [(10, 2000), (31, 999), (2000, 12)])
def test_elongated_images_resample_only_the_window(size):
    """Past 16:1 only the crop window is resampled (no giant intermediate); versus HF's full
    resize that leaves at most one grey level on under 1% of values."""
    reference = hf_pil_processor("CLIP", size={"shortest_edge": S},
                                 crop_size={"height": S, "width": S})
    image = random_image(*size)
    expected = reference(image, return_tensors="np")["pixel_values"][0]
    diff = np.abs(ImageProcessor(CLIP_CARD)(image)[0].numpy() - expected)
    assert diff.max() <= ONE_LEVEL + 1e-5
    assert (diff > 1e-5).mean() < 0.01


def test_extreme_aspect_ratio_does_not_build_the_full_resize():
    # 2 x 200000: a full "shortest" resize would be 224 x 22.4M pixels (15 GB).
    image = Image.fromarray(np.full((200_000, 2, 3), 77, dtype=np.uint8))
    out = ImageProcessor(CLIP_CARD).resize_and_crop(image)
    assert out.shape == (S, S, 3)
    assert (out == 77).all()


def test_real_photos_match_hf(shared_data: Path):
    photos = sorted((shared_data / "coco-mini" / "train2017").glob("*.jpg"))[:3]
    if not photos:
        pytest.skip("no coco-mini photos")
    reference = hf_pil_processor("CLIP", size={"shortest_edge": S},
                                 crop_size={"height": S, "width": S})
    processor = ImageProcessor(CLIP_CARD)
    for photo in photos:
        with Image.open(photo) as image:
            if image.getexif().get(0x0112, 1) != 1:
                continue  # HF does not apply EXIF orientation; we do
            expected = reference(image.convert("RGB"), return_tensors="np")["pixel_values"][0]
        assert np.abs(processor(photo)[0].numpy() - expected).max() <= 1e-5


# --- the processor's own behaviour ----------------------------------------------------------------

def test_normalisation_of_a_solid_colour():
    mean, std = np.array(CLIP_MEAN_STD[0]), np.array(CLIP_MEAN_STD[1])
    colour = np.array([10, 200, 255])
    image = Image.new("RGB", (300, 250), tuple(int(c) for c in colour))
    out = ImageProcessor(CLIP_CARD).preprocess_one(image)
    expected = (colour / 255 - mean) / std
    assert out.dtype == np.float32 and out.shape == (3, S, S)
    assert np.abs(out - expected[:, None, None]).max() <= 1e-5


def test_batch_accepts_every_source_kind(tmp_path: Path):
    processor = ImageProcessor(CLIP_CARD)
    image = random_image(260, 230)
    path = tmp_path / "a.png"
    image.save(path)
    png = encode(image, "PNG")
    sources = [path, str(path), png, io.BytesIO(png), image, np.asarray(image)]
    batch = processor(sources)
    assert isinstance(batch, torch.Tensor)
    assert batch.dtype == torch.float32 and batch.shape == (len(sources), 3, S, S)
    single = processor.preprocess_one(image)
    for row in batch:
        assert np.array_equal(row.numpy(), single)
    assert processor(image).shape == (1, 3, S, S)
    assert processor(np.stack([np.asarray(image)] * 2)).shape == (2, 3, S, S)


def test_square_array_fast_path_and_no_resize_at_target_size():
    processor = ImageProcessor(CLIP_CARD)
    pixels = np.asarray(random_image(S, S))
    assert processor.resize_and_crop(pixels) is pixels  # no PIL, no copy
    assert np.array_equal(processor.resize_and_crop(Image.fromarray(pixels)), pixels)
    assert np.array_equal(processor.preprocess_one(pixels),
                          processor.preprocess_one(Image.fromarray(pixels)))


def test_array_inputs_other_layouts():
    processor = ImageProcessor(ImageCard(32, "squash", "bilinear", *HALF_MEAN_STD))
    grey = np.full((40, 50), 100, dtype=np.uint8)
    assert (processor.resize_and_crop(grey) == 100).all()
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # fully transparent black → white
    assert (processor.resize_and_crop(rgba) == 255).all()
    with pytest.raises(ImageDecodeError, match="uint8"):
        processor(np.zeros((32, 32, 3), dtype=np.float32))


def test_nearest_interpolation_picks_source_pixels():
    card = ImageCard(4, "squash", "nearest", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    source = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    out = ImageProcessor(card).resize_and_crop(source)
    assert np.array_equal(out, source[1::2, 1::2])  # PIL samples pixel centres


# --- decoding: a corpus of good and bad files ----------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` (1-bit grey) but carries garbage pixel data:
    decoding it would fail, so a size refusal proves the check ran before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib")
            + chunk(b"IEND", b""))


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    """Bad and awkward files, written fresh for each test."""
    files: dict[str, bytes] = {}
    photo = random_image(64, 48)
    jpeg = encode(photo, "JPEG", quality=90)
    png = encode(photo, "PNG")
    files["truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["empty.png"] = b""
    files["text.png"] = b"this is not an image\n"
    files["random.jpg"] = np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()
    broken = bytearray(png)
    broken[len(png) // 2: len(png) // 2 + 64] = bytes(64)  # zeros over the pixel stream
    files["corrupt.png"] = bytes(broken)
    files["bad-header-crc.png"] = png[:16] + bytes([png[16] ^ 0xFF]) + png[17:]
    files["png-named.jpg"] = png
    files["bomb.png"] = png_header_only(10_000, 8_000)
    files["big-bomb.png"] = png_header_only(10_000, 10_000)
    files["huge-bomb.png"] = png_header_only(200_000, 200_000)
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    paths["photo"] = photo  # type: ignore[assignment]
    return paths


@pytest.mark.parametrize("name, reason", [
    ("truncated.jpg", "truncated"),
    ("empty.png", "empty"),
    ("text.png", "not a recognised image format"),
    ("random.jpg", "not a recognised image format"),
    ("corrupt.png", ""),
    ("bad-header-crc.png", ""),
])
def test_bad_files_raise_naming_the_file(corpus, name, reason):
    with pytest.raises(ImageDecodeError) as caught:
        open_image(corpus[name])
    assert str(corpus[name]) in str(caught.value)
    assert caught.value.name == str(corpus[name])
    assert reason in caught.value.reason
    # ... also through the processor, and from bytes with and without a name
    with pytest.raises(ImageDecodeError, match=name):
        ImageProcessor(CLIP_CARD)([corpus[name]])
    data = corpus[name].read_bytes()
    with pytest.raises(ImageDecodeError, match="<bytes>"):
        open_image(data)
    with pytest.raises(ImageDecodeError, match="shard-7/000123.jpg"):
        open_image(data, name="shard-7/000123.jpg")


def test_truncated_images_stay_refused_and_global_setting_untouched(corpus):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageDecodeError):
        open_image(corpus["truncated.jpg"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        open_image(tmp_path / "nope.jpg")


def test_content_decides_the_format_not_the_name(corpus):
    image = open_image(corpus["png-named.jpg"])
    assert np.array_equal(rgb(image), np.asarray(corpus["photo"]))


def test_bomb_refused_from_the_header(corpus):
    with pytest.raises(ImageDecodeError, match="decompression bomb") as caught:
        open_image(corpus["bomb.png"], max_pixels=50_000_000)
    assert "10000x8000" in caught.value.reason  # our check, with the limit of the call
    assert str(corpus["bomb.png"]) in str(caught.value)
    # 1e8 pixels is over the default limit, where Pillow itself only warns; with warnings as
    # errors Pillow's DecompressionBombWarning must still come out as ImageDecodeError.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match="decompression bomb"):
            open_image(corpus["big-bomb.png"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match="10000x10000"):
            open_image(corpus["big-bomb.png"])


def test_bomb_above_pillows_own_limit(corpus):
    # 4e10 pixels: Pillow raises DecompressionBombError itself while opening.
    with pytest.raises(ImageDecodeError, match="decompression bomb") as caught:
        open_image(corpus["huge-bomb.png"], max_pixels=10**12)
    assert isinstance(caught.value.__cause__, Image.DecompressionBombError)


def test_small_1bit_file_with_big_canvas():
    image = Image.new("1", (3000, 2000))
    data = encode(image, "PNG")
    assert len(data) < 10_000  # small file, 6 Mpx canvas
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        open_image(data, max_pixels=5_000_000)
    assert open_image(data, max_pixels=6_000_000).size == (3000, 2000)


def test_cmyk_jpeg():
    colours = {(0, 255, 255, 0): (255, 0, 0), (255, 0, 0, 0): (0, 255, 255),
               (0, 0, 0, 128): (127, 127, 127), (0, 0, 0, 0): (255, 255, 255)}
    for cmyk, expected in colours.items():
        data = encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=95)
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.mode == "CMYK"
        out = rgb(open_image(data))
        assert np.abs(out - np.array(expected)).max() <= 6, (cmyk, out[0, 0])


def test_16bit_grey_png_is_scaled_not_clipped():
    values = np.array([[0, 1, 257, 1000, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode.startswith("I")
    out = rgb(open_image(data))
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5)
    assert out[0, :, 0].tolist() == expected[0].tolist() == [0, 0, 1, 4, 128, 255]
    assert (out == out[:, :, :1]).all()  # grey


def test_other_high_depth_modes():
    big_endian = Image.fromarray(np.array([[0, 32768, 65535]], dtype=">u2"))
    assert big_endian.mode == "I;16B"
    assert rgb(open_image(big_endian))[0, :, 0].tolist() == [0, 128, 255]
    int32 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert int32.mode == "I"
    assert rgb(open_image(int32))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0, 2**31 - 1, 2**24]], dtype=np.int32))
    assert rgb(open_image(wide))[0, :, 0].tolist() == [0, 127, 1]  # 32-bit range
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert rgb(open_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    levels = Image.fromarray(np.array([[0.0, 100.0, 300.0, -5.0]], dtype=np.float32))
    assert rgb(open_image(levels))[0, :, 0].tolist() == [0, 100, 255, 0]


def test_low_depth_and_colour_space_modes():
    assert rgb(open_image(Image.new("L", (2, 2), 100)))[0, 0].tolist() == [100, 100, 100]
    one_bit = Image.new("1", (2, 1))
    one_bit.putpixel((1, 0), 1)
    assert rgb(open_image(one_bit))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    ycbcr = Image.new("YCbCr", (2, 2), (128, 128, 128))
    assert np.abs(rgb(open_image(ycbcr)) - 128).max() <= 1
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putpixel((1, 0), 1)
    assert rgb(open_image(palette))[0].tolist() == [[10, 20, 30], [200, 100, 0]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_goes_over_white(fmt):
    image = Image.new("P", (4, 1))
    image.putpalette([0, 0, 255, 255, 0, 0])  # 0: blue (transparent), 1: red
    image.putpixel((2, 0), 1)
    image.putpixel((3, 0), 1)
    data = encode(image, fmt, transparency=0)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "P" and raw.info.get("transparency") == 0
    out = rgb(open_image(data))
    assert out[0].tolist() == [[255, 255, 255]] * 2 + [[255, 0, 0]] * 2


def test_la_and_rgba_go_over_white():
    la = Image.new("LA", (3, 1))
    for x, alpha in enumerate([0, 255, 128]):
        la.putpixel((x, 0), (50, alpha))
    out = rgb(open_image(encode(la, "PNG")))[0]
    assert out[0].tolist() == [255] * 3
    assert out[1].tolist() == [50] * 3
    assert np.abs(out[2] - (50 * 128 + 255 * 127) / 255).max() <= 1

    rgba = Image.new("RGBA", (3, 1))
    for x, pixel in enumerate([(0, 0, 0, 0), (10, 20, 30, 255), (200, 0, 100, 128)]):
        rgba.putpixel((x, 0), pixel)
    out = rgb(open_image(encode(rgba, "PNG")))[0]
    assert out[0].tolist() == [255, 255, 255]  # transparent black is white, not black
    assert out[1].tolist() == [10, 20, 30]
    blend = (np.array([200, 0, 100]) * 128 + 255 * 127) / 255
    assert np.abs(out[2] - blend).max() <= 1


def test_exif_orientation_6_rotates_clockwise():
    stored = np.zeros((32, 64, 3), dtype=np.uint8)  # 64 wide, 32 high
    stored[:, :32] = (255, 0, 0)  # left half red
    stored[:, 32:] = (0, 0, 255)  # right half blue
    stored[:8, :8] = (0, 255, 0)  # top-left corner green, to tell rotations from flips
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = open_image(data)
    assert out.size == (32, 64)  # width and height swapped
    expected = np.rot90(stored, k=-1)  # clockwise
    assert np.abs(rgb(out) - expected).mean() < 3
    assert rgb(out)[2, 28].tolist() == pytest.approx([0, 255, 0], abs=12)  # corner → top-right
    assert rgb(out)[10, 10, 0] > 200 and rgb(out)[50, 10, 2] > 200  # red on top, blue below


def test_exif_orientation_leaves_the_callers_image_alone():
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(io.BytesIO(encode(random_image(40, 20), "JPEG", exif=exif.tobytes()))) as im:
        out = open_image(im)
        assert im.size == (40, 20) and out.size == (20, 40)


def test_pil_inputs_are_not_copied_or_modified():
    image = random_image(20, 10)
    assert open_image(image) is image  # already RGB and upright
    rgba = Image.new("RGBA", (5, 5), (0, 0, 0, 0))
    out = open_image(rgba)
    assert rgba.mode == "RGBA" and out.mode == "RGB"


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 255, 0),
                                                              (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.n_frames == 3
    assert (rgb(open_image(data)) == [255, 0, 0]).all()


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(0, 255, 0), (255, 0, 0)]]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.n_frames == 2
    assert (rgb(open_image(data)) == [0, 255, 0]).all()


def test_eps_is_refused_before_ghostscript_runs():
    data = encode(Image.new("RGB", (8, 8)), "EPS")
    with pytest.raises(ImageDecodeError, match="EPS"):
        open_image(data)


def test_streams_and_error_pickling(corpus):
    with open(corpus["png-named.jpg"], "rb") as stream:
        assert open_image(stream).size == (64, 48)
        assert not stream.closed  # the caller's stream stays the caller's
    error = ImageDecodeError("a/b.jpg", "truncated data")
    copy = pickle.loads(pickle.dumps(error))  # DataLoader workers send errors across processes
    assert (copy.name, copy.reason, str(copy)) == (error.name, error.reason, str(error))
    assert isinstance(copy, ValueError)


@pytest.mark.parametrize("size", [(300, 200), (199, 257), (64, 64), (17, 500), (224, 224)])
def test_pad_letterboxes_on_white_like_pillow(size):
    from PIL import ImageOps

    card = ImageCard(S, "pad", "bilinear", *HALF_MEAN_STD)
    image = random_image(*size)
    expected = ImageOps.pad(image, (S, S), method=Image.Resampling.BILINEAR,
                            color=(255, 255, 255))
    processor = ImageProcessor(card)
    assert np.array_equal(processor.resize_and_crop(image), np.asarray(expected))
    pixels = processor(image)[0]
    torch.testing.assert_close(pixels, torch.from_numpy(
        (np.asarray(expected, dtype=np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5))


def test_pad_keeps_a_cut_out_whole_on_white():
    stamp = Image.new("RGBA", (100, 400), (0, 0, 0, 0))  # a tall transparent stamp...
    stamp.paste((200, 0, 0, 255), (0, 0, 100, 400))  # ...that is all red
    pixels = ImageProcessor(ImageCard(S, "pad", "bilinear", *HALF_MEAN_STD)).resize_and_crop(
        encode(stamp, "PNG"))
    assert pixels.shape == (S, S, 3)
    assert (pixels[:, :50] == 255).all() and (pixels[:, -50:] == 255).all()  # white margins
    assert (pixels[:, 90:130] == (200, 0, 0)).all()  # the whole height of the stamp is kept
