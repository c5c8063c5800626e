"""Medical images (DICOM series, NIfTI volumes) as 8-bit RGB pictures a vision tower can read.

    volume = read_dicom_series(files)              # or read_dicom(path), read_nifti(path)
    image = render(volume, View(plane="axial", index="middle", window="lung"))

What happens on the way, in the order the DICOM standard gives (PS3.3 C.11):

1. **Stored values → modality values**: ``RescaleSlope``/``RescaleIntercept`` (or a Modality LUT)
   turn CT's stored integers into Hounsfield units; pydicom's ``apply_modality_lut`` does it.
2. **Modality values → display**: a *window* (centre/width; the standard's linear function) or
   the file's own *VOI LUT*. ``window`` may be a CT preset (``brain``, ``lung``, ``bone``,
   ``abdomen``, ``soft-tissue``...), ``"c,w"`` numbers, ``auto`` (the file's VOI LUT, else its
   ``WindowCenter``/``WindowWidth``, else a CT soft-tissue window for CT, else the 0.5–99.5th
   percentiles) or ``minmax``. Three presets joined by ``+`` (``lung+soft-tissue+bone``) make one
   window per colour channel, a common way to hand a CT slice to an RGB network.
3. **Photometric interpretation**: MONOCHROME1 (low values bright) is inverted so every picture
   reads "bright = dense"; RGB / YBR (pydicom converts YBR to RGB) and PALETTE COLOR (through its
   LUT) keep their colour; 16-bit colour is scaled to 8 bits by ``BitsStored``.

A series is the files sharing a ``SeriesInstanceUID``, stacked in the order of their position
along the slice normal (``ImagePositionPatient`` · normal of ``ImageOrientationPatient``), else
``InstanceNumber``. NIfTI volumes are brought to the closest canonical (RAS+) orientation first,
so "axial" means the same thing for both: a volume is held as ``[slice, row, column]`` with slice
0 inferior, rows anterior → posterior and columns patient right → left (the radiological view).

Nothing here writes files or keeps patient-identifying fields: ``Volume.info`` holds only
technical facts (modality, size, spacing); de-identified DICOM copies are ``medical_deid``'s job.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# (centre, width) in HU; the usual radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft-tissue": (50.0, 400.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
}
PLANES = ("axial", "coronal", "sagittal")
PROJECTIONS = ("mip", "mean", "minip")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class MedicalReadError(ValueError):
    """A file or series that cannot become a picture; ``reason`` is a short label for counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Volume:
    """Pixels ``[slices, rows, cols]`` (grey, float32 modality values) or ``[..., 3]`` (RGB, 0-255).

    ``spacing`` is (slice, row, column) in mm where known; ``window`` the file's own (centre,
    width); ``voi`` a dataset holding the file's VOI LUT (applied by ``window="auto"``).
    """

    pixels: np.ndarray
    modality: str = ""
    rgb: bool = False
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    window: tuple[float, float] | None = None
    voi: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape[:3])  # type: ignore[return-value]


@dataclass(frozen=True)
class View:
    """Which picture to take from a volume: a slice (``index``: an int, ``"middle"`` or a fraction
    in [0, 1]) or a ``projection`` (mip | mean | minip) through ``plane``, shown in ``window``."""

    plane: str = "axial"
    index: int | float | str = "middle"
    projection: str | None = None
    window: str = "auto"

    @classmethod
    def parse(cls, text: str, window: str = "auto") -> View:
        """``axial`` / ``coronal:0.3`` / ``sagittal:12`` / ``axial:mip`` (plane[:index|proj])."""
        plane, _, rest = text.strip().partition(":")
        if plane not in PLANES:
            raise ValueError(f"view {text!r}: plane must be one of {PLANES}")
        if not rest or rest == "middle":
            return cls(plane, "middle", None, window)
        if rest in PROJECTIONS:
            return cls(plane, "middle", rest, window)
        try:
            index: int | float = int(rest) if rest.lstrip("-").isdigit() else float(rest)
        except ValueError:
            raise ValueError(f"view {text!r}: after ':' write a slice number, a fraction, "
                             f"'middle' or one of {PROJECTIONS}") from None
        return cls(plane, index, None, window)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def read_dataset(source: str | Path | bytes, stop_before_pixels: bool = False) -> Any:
    """A pydicom Dataset, or MedicalReadError("not dicom") for anything pydicom cannot parse."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    name = "<bytes>" if isinstance(source, bytes) else str(source)
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd-but-readable file
            return pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise MedicalReadError("not dicom", f"{name}: not a readable DICOM file ({err})") from None


def _float_pair(ds: Any, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None  # several windows: the first is the default
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _frames(ds: Any, name: str) -> np.ndarray:
    """Decoded pixels as [frames, rows, cols(, 3)] in modality units (grey) or 0-255 (colour)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MedicalReadError("no pixels", f"{name}: DICOM file without pixel data "
                               f"({ds.get('Modality', '?')})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001  (decoders raise anything: missing plugin, truncation)
        raise MedicalReadError("undecodable pixels", f"{name}: {err}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float32)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        arr = rgb * (255.0 / (2 ** bits - 1))
    elif arr.shape[-1] == 3 and arr.ndim >= 3 and int(ds.get("SamplesPerPixel", 1)) == 3:
        bits = int(ds.get("BitsStored", 8))
        arr = arr.astype(np.float32) * (255.0 / (2 ** bits - 1))
    else:
        arr = apply_modality_lut(arr, ds).astype(np.float32)
    colour = int(ds.get("SamplesPerPixel", 1)) == 3 or photometric == "PALETTE COLOR"
    if frames == 1 or arr.ndim == (3 if colour else 2):
        arr = arr[None]
    return arr


def _spacing(ds: Any) -> tuple[float, float]:
    value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        return (float(value[0]), float(value[1])) if value else (1.0, 1.0)
    except (TypeError, ValueError, IndexError):
        return (1.0, 1.0)


def _info(ds: Any) -> dict[str, Any]:
    """Technical, non-identifying facts only (the basic profile keeps these)."""
    keep = ("Modality", "BodyPartExamined", "PhotometricInterpretation", "BitsStored",
            "Rows", "Columns", "SliceThickness")
    return {k: str(ds.get(k)) for k in keep if ds.get(k) not in (None, "")}


def _volume(ds: Any, pixels: np.ndarray, slice_spacing: float) -> Volume:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    rgb = pixels.ndim == 4
    if photometric == "MONOCHROME1":
        # Low values are bright: flip the values (max + min - x) so "auto" windows and presets
        # give MONOCHROME2 pictures (bright = dense); the file's window flips with them.
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = (hi + lo) - pixels
    centre, width = _float_pair(ds, "WindowCenter"), _float_pair(ds, "WindowWidth")
    window = (centre, width) if centre is not None and width is not None and width > 0 else None
    if window is not None and photometric == "MONOCHROME1":
        window = (float(pixels.max() + pixels.min()) - window[0], window[1])
    voi = ds if ("VOILUTSequence" in ds and not rgb and photometric != "MONOCHROME1") else None
    row, col = _spacing(ds)
    return Volume(pixels.astype(np.float32), str(ds.get("Modality", "")), rgb,
                  (slice_spacing, row, col), window, voi, _info(ds))


def read_dicom(source: str | Path | bytes) -> Volume:
    """One DICOM file (single or multi-frame) as a Volume (frames stacked as slices)."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    ds = read_dataset(source)
    pixels = _frames(ds, name)
    thickness = _float_pair(ds, "SpacingBetweenSlices") or _float_pair(ds, "SliceThickness")
    return _volume(ds, pixels, thickness or 1.0)


def _position(ds: Any) -> float | None:
    """Where the slice lies along its normal (mm), from ImagePositionPatient/OrientationPatient."""
    pos, ori = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if not pos or not ori or len(pos) != 3 or len(ori) != 6:
        return None
    normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
    return float(np.dot(normal, np.asarray(pos, float)))


def group_series(paths: Iterable[str | Path], skips: Any = None) -> dict[str, list[Path]]:
    """Files grouped by ``SeriesInstanceUID`` (headers only); unreadable files counted in
    ``skips`` (a SkipCounter) or raised."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        try:
            ds = read_dataset(path, stop_before_pixels=True)
        except MedicalReadError as err:
            if skips is None:
                raise
            skips.add(err.reason, str(err))
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "unknown")), []).append(Path(path))
    return groups


def read_dicom_series(paths: Sequence[str | Path], skips: Any = None) -> Volume:
    """The files of ONE series stacked into a volume, slice 0 lowest along the normal.

    Slices that fail to decode or whose size differs from the majority are skipped and counted
    in ``skips`` (without ``skips`` they raise); an empty result raises MedicalReadError.
    """
    slices: list[tuple[float, int, Any, np.ndarray]] = []
    for n, path in enumerate(paths):
        try:
            ds = read_dataset(path)
            pixels = _frames(ds, str(path))
        except MedicalReadError as err:
            if skips is None:
                raise
            skips.add(err.reason, str(err))
            continue
        position = _position(ds)
        number = ds.get("InstanceNumber")
        order = position if position is not None else float(number if number is not None else n)
        slices.extend((order, n, ds, frame[None]) for frame in pixels)
    if not slices:
        raise MedicalReadError("empty series", f"no readable slice among {len(paths)} files")
    shapes = [s[3].shape for s in slices]
    common = max(set(shapes), key=shapes.count)
    for s in slices:
        if s[3].shape != common:
            message = f"a slice of {s[3].shape[1:]} in a series of {common[1:]}"
            if skips is None:
                raise MedicalReadError("slice size differs", message)
            skips.add("slice size differs", message)
    slices = sorted((s for s in slices if s[3].shape == common), key=lambda s: (s[0], s[1]))
    positions = [s[0] for s in slices]
    steps = np.diff(positions)
    first = slices[0][2]
    spacing = float(np.median(np.abs(steps))) if len(steps) and np.any(steps) else (
        _float_pair(first, "SliceThickness") or 1.0)
    volume = _volume(first, np.concatenate([s[3] for s in slices]), spacing)
    volume.info["slices"] = len(slices)
    return volume


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def read_nifti(path: str | Path) -> Volume:
    """A NIfTI (or Analyze) volume in canonical orientation; 4-D files give their first volume."""
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # noqa: BLE001  (nibabel raises many types for a bad file)
        raise MedicalReadError("not nifti", f"{path}: not a readable NIfTI file ({err})") from None
    while data.ndim > 3:
        data = data[..., 0]
    if data.ndim < 3:
        data = data.reshape(data.shape + (1,) * (3 - data.ndim))
    zooms = [float(z) for z in image.header.get_zooms()[:3]] + [1.0] * 3
    # RAS+: x grows toward the patient's right, y anterior, z superior. Our layout is
    # [slice (inferior first), row (anterior first), column (patient right first)].
    pixels = data[::-1, ::-1, :].transpose(2, 1, 0)
    return Volume(np.ascontiguousarray(pixels), "NIfTI", False, (zooms[2], zooms[1], zooms[0]),
                  info={"shape": list(pixels.shape), "source": "nifti"})


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: str | Path, skips: Any = None) -> Volume:
    """A NIfTI file, a DICOM file, or a folder of DICOM files (its largest series)."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")
                 and p.suffix.lower() in DICOM_SUFFIXES]
        series = group_series(files, skips)
        if not series:
            raise MedicalReadError("no dicom", f"{path}: no readable DICOM file")
        return read_dicom_series(max(series.values(), key=len), skips)
    if is_nifti(path):
        return read_nifti(path)
    return read_dicom(path)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def apply_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """The DICOM linear VOI function (PS3.3 C.11.2.1.2.1) to 0-255 floats."""
    width = max(float(width), 1.0)
    scaled = ((values - (centre - 0.5)) / (width - 1.0) + 0.5) if width > 1 else (
        (values > centre - 0.5).astype(np.float32))
    return np.clip(scaled, 0.0, 1.0) * 255.0


def parse_window(text: str) -> list[str | tuple[float, float]]:
    """``lung`` / ``auto`` / ``40,400`` / ``lung+soft-tissue+bone`` → one or three windows."""
    parts = [p.strip() for p in str(text).split("+") if p.strip()]
    if len(parts) not in (1, 3):
        raise ValueError(f"window {text!r}: one window or three joined by '+' (R+G+B)")
    out: list[str | tuple[float, float]] = []
    for part in parts:
        if part in CT_WINDOWS or part in ("auto", "minmax"):
            out.append(part)
            continue
        try:
            centre, width = (float(v) for v in part.split(","))
        except ValueError:
            raise ValueError(f"window {part!r}: a preset ({', '.join(CT_WINDOWS)}), auto, "
                             f"minmax or 'centre,width'") from None
        out.append((centre, width))
    return out


def _grey(volume: Volume, values: np.ndarray, window: str | tuple[float, float]) -> np.ndarray:
    if isinstance(window, tuple):
        return apply_window(values, *window)
    if window in CT_WINDOWS:
        return apply_window(values, *CT_WINDOWS[window])
    if window == "auto" and volume.voi is not None:
        from pydicom.pixels import apply_voi

        # A LUT is indexed by integers: the modality values of a file with one are integral.
        lut = apply_voi(np.rint(values).astype(np.int32), volume.voi).astype(np.float32)
        bits = int(volume.voi.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(lut * (255.0 / (2 ** bits - 1)), 0, 255)
    if window == "auto" and volume.window is not None:
        return apply_window(values, *volume.window)
    if window == "auto" and volume.modality == "CT":
        return apply_window(values, *CT_WINDOWS["soft-tissue"])
    lo, hi = (np.percentile(values, [0.5, 99.5]) if window == "auto"
              else (values.min(), values.max()))
    return np.clip((values - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255.0


def _plane(pixels: np.ndarray, view: View) -> np.ndarray:
    """A 2-D plane (or projection) of [S, R, C(, 3)] pixels; reformats put superior on top."""
    axis = PLANES.index(view.plane)
    if view.projection is not None:
        reduce = {"mip": np.max, "mean": np.mean, "minip": np.min}[view.projection]
        plane = reduce(pixels, axis=axis)
    else:
        size = pixels.shape[axis]
        index = view.index
        if index == "middle":
            position = size // 2
        elif isinstance(index, float):
            position = int(round(min(max(index, 0.0), 1.0) * (size - 1)))
        else:
            position = int(index)
        if not -size <= position < size:
            raise MedicalReadError("no such slice", f"slice {position} of {size} ({view.plane})")
        plane = np.take(pixels, position, axis=axis)
    return plane if axis == 0 else plane[::-1]  # slice 0 is inferior: put superior on top


def render(volume: Volume, view: View | None = None) -> Image.Image:
    """One 8-bit RGB picture of ``volume`` as ``view`` says (aspect ratio kept in mm)."""
    view = view or View()
    windows = parse_window(view.window)
    if volume.rgb:
        rgb = _plane(volume.pixels, view)
    else:
        plane = _plane(volume.pixels, view)
        channels = [_grey(volume, plane, w) for w in windows]
        rgb = np.stack(channels * 3 if len(channels) == 1 else channels, axis=-1)
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if view.plane != "axial":  # rows are slices: stretch them to their thickness in mm
        s, r, c = volume.spacing
        across = c if view.plane == "coronal" else r
        height = max(1, int(round(image.height * s / max(across, 1e-6))))
        if height != image.height:
            image = image.resize((image.width, height), Image.BILINEAR)
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
