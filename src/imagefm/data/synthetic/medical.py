"""A medically-SHAPED synthetic task: chest-CT-like slices with lesion-like findings and reports.

Nothing here is real patient data or a validated model of disease: it exists so the whole
medical path (DICOM / NIfTI writing and reading, windowing, de-identification, report pairs,
zero-shot and few-shot evaluation) can be built and measured where no trusted benchmark can be
downloaded. Numbers measured on it say how the pipeline behaves, not how a model would do in a
clinic — say exactly that when you report them.

A study is a small axial volume (``SLICES`` slices of 5 mm, ``SIZE``² pixels of 2 mm) in
Hounsfield units: air outside; a body ellipse with a fat rim and muscle; two lungs with a
parenchyma texture and vessel-like dots (distractors for small nodules); a heart/mediastinum and
a vertebra. Each study has at most one finding type, centred on the middle slice:

* ``nodule`` (1–3, 6–14 mm, solid, round), ``mass`` (one, 30–55 mm, lobulated, solid),
  ``calcification`` (1–3, 2–5 mm, 500–1000 HU), ``cyst`` (1–2, 12–30 mm, air with a thin wall),
  or ``normal`` (none);

located by side (right / left lung; the patient's right is the image's left, as radiologists
read) and zone (anterior / posterior), with a findings sentence in English and in Korean (plus an
optional incidental sentence), as a report would have. Everything is deterministic in the seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imagefm.data.synthetic.defects import _smooth_noise

FINDINGS = ("normal", "nodule", "mass", "calcification", "cyst")
# Class names that fit the zero-shot templates below (``{}`` → name), per language.
CLASS_NAMES = {
    "en": ["no focal lesion", "a nodule", "a mass", "calcification", "a cyst"],
    "ko": ["이상 소견 없음", "결절", "종괴", "석회화", "낭종"],
}
TEMPLATES = {
    "en": ["{}.", "chest CT with {}.", "findings: {} in the lung."],
    "ko": ["{}.", "흉부 CT: {}.", "소견: 폐에 {}."],
}
SIZE, SLICES, PIXEL_MM, SLICE_MM = 128, 3, 2.0, 5.0
_SIDE = {"right": "우측", "left": "좌측"}
_ZONE = {"anterior": "전방부", "posterior": "후방부"}
_EN = {
    "normal": ("No focal lung lesion.", "The lungs are clear.",
               "No focal lesion in either lung."),
    "nodule": ("A {size} mm solid nodule in the {zone} {side} lung.",
               "There is a {size} mm nodule in the {side} lung, {zone}.",
               "{Side} lung: {size} mm pulmonary nodule, {zone}."),
    "nodules": ("{count} solid nodules in the {zone} {side} lung, the largest {size} mm.",
                "Multiple nodules ({count}) in the {side} lung, up to {size} mm."),
    "mass": ("A {size} mm lobulated mass in the {zone} {side} lung.",
             "Large {size} mm mass in the {side} lung, {zone}.",
             "{Side} lung: {size} mm soft-tissue mass."),
    "calcification": ("A small calcification in the {zone} {side} lung.",
                      "Calcification in the {side} lung, {zone}, {size} mm.",
                      "{Side} lung: dense {size} mm calcification."),
    "calcifications": ("{count} small calcifications in the {zone} {side} lung.",
                       "Multiple calcifications ({count}) in the {side} lung."),
    "cyst": ("A thin-walled {size} mm cyst in the {zone} {side} lung.",
             "{Side} lung: {size} mm air cyst, {zone}.",
             "There is a {size} mm cyst in the {side} lung."),
    "cysts": ("{count} thin-walled cysts in the {zone} {side} lung, up to {size} mm.",),
}
_KO = {
    "normal": ("폐에 국소 병변이 없습니다.", "양측 폐는 깨끗합니다.", "폐에 이상 소견이 없습니다."),
    "nodule": ("{side} 폐 {zone}에 {size} mm 크기의 고형 결절이 있습니다.",
               "{side} 폐에 {size} mm 결절이 있습니다.", "{side} 폐 {zone}: {size} mm 결절."),
    "nodules": ("{side} 폐 {zone}에 결절이 {count}개 있으며 가장 큰 것은 {size} mm입니다.",
                "{side} 폐에 다발성 결절 {count}개, 최대 {size} mm."),
    "mass": ("{side} 폐 {zone}에 {size} mm 크기의 분엽성 종괴가 있습니다.",
             "{side} 폐에 {size} mm 크기의 큰 종괴가 있습니다.",
             "{side} 폐 {zone}: {size} mm 종괴."),
    "calcification": ("{side} 폐 {zone}에 작은 석회화가 있습니다.",
                      "{side} 폐에 {size} mm 석회화가 있습니다.", "{side} 폐 {zone}: 석회화."),
    "calcifications": ("{side} 폐 {zone}에 석회화가 {count}개 있습니다.",
                       "{side} 폐에 다발성 석회화 {count}개."),
    "cyst": ("{side} 폐 {zone}에 벽이 얇은 {size} mm 낭종이 있습니다.",
             "{side} 폐에 {size} mm 크기의 공기 낭종이 있습니다.",
             "{side} 폐 {zone}: {size} mm 낭종."),
    "cysts": ("{side} 폐 {zone}에 벽이 얇은 낭종이 {count}개 있으며 최대 {size} mm입니다.",),
}
_EXTRA = (("No pleural effusion.", "흉수는 없습니다."),
          ("The heart size is normal.", "심장 크기는 정상입니다."),
          ("No lymphadenopathy.", "림프절 비대는 없습니다."))
_LUNGS = {"right": (38.0, 58.0), "left": (90.0, 58.0)}  # centres (x, y) in pixels
_LUNG_AXES = (20.0, 32.0)


@dataclass
class Finding:
    """What one synthetic study shows (``size_mm`` of the largest lesion; 0 when normal)."""

    finding: str
    side: str = ""
    zone: str = ""
    count: int = 0
    size_mm: int = 0

    @property
    def label(self) -> int:
        return FINDINGS.index(self.finding)


def sample_finding(rng: np.random.Generator, finding: str | None = None) -> Finding:
    """A random finding (uniform over FINDINGS unless ``finding`` names one)."""
    finding = finding or FINDINGS[int(rng.integers(len(FINDINGS)))]
    if finding == "normal":
        return Finding("normal")
    side, zone = ("right", "left")[int(rng.integers(2))], ("anterior", "posterior")[
        int(rng.integers(2))]
    count = {"nodule": int(rng.integers(1, 4)), "mass": 1,
             "calcification": int(rng.integers(1, 4)), "cyst": int(rng.integers(1, 3))}[finding]
    low, high = {"nodule": (6, 14), "mass": (30, 55), "calcification": (2, 5),
                 "cyst": (12, 30)}[finding]
    return Finding(finding, side, zone, count, int(rng.integers(low, high + 1)))


def report(finding: Finding, rng: np.random.Generator) -> tuple[str, str]:
    """The findings text in English and in Korean (same facts, phrasing drawn from ``rng``)."""
    key = finding.finding + ("s" if finding.count > 1 else "")
    choice = int(rng.integers(len(_EN[key])))
    facts = {"size": finding.size_mm, "count": finding.count, "zone": finding.zone,
             "side": finding.side, "Side": finding.side.capitalize()}
    en = _EN[key][choice].format(**facts)
    ko = _KO[key][choice % len(_KO[key])].format(
        **{**facts, "side": _SIDE.get(finding.side, ""), "zone": _ZONE.get(finding.zone, "")})
    if rng.random() < 0.5:
        extra_en, extra_ko = _EXTRA[int(rng.integers(len(_EXTRA)))]
        en, ko = f"{en} {extra_en}", f"{ko} {extra_ko}"
    return en, ko


def _ellipse(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, ax: float, ay: float
             ) -> np.ndarray:
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _anatomy(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One slice of anatomy in HU and the mask of lung pixels (both [SIZE, SIZE])."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    hu = np.full((SIZE, SIZE), -1000.0, np.float32)
    body_ax, body_ay = 58 + rng.normal(0, 2), 44 + rng.normal(0, 2)
    hu[_ellipse(yy, xx, 64, 62, body_ax, body_ay)] = -100.0  # subcutaneous fat
    hu[_ellipse(yy, xx, 64, 62, body_ax - 5, body_ay - 5)] = 40.0  # muscle / soft tissue
    lungs = np.zeros((SIZE, SIZE), bool)
    for cx, cy in _LUNGS.values():
        lungs |= _ellipse(yy, xx, cx + rng.normal(0, 1.5), cy, _LUNG_AXES[0] + rng.normal(0, 1),
                          _LUNG_AXES[1] + rng.normal(0, 1.5))
    parenchyma = -850.0 + _smooth_noise(rng, SIZE, 16, 25.0)
    hu = np.where(lungs, parenchyma, hu)
    for _ in range(int(rng.integers(25, 45))):  # vessels: small, fainter than a nodule
        x, y = rng.uniform(0, SIZE, 2)
        if lungs[int(y), int(x)]:
            hu[_ellipse(yy, xx, x, y, 0.9, 0.9) & lungs] = float(rng.uniform(-450, -250))
    hu[_ellipse(yy, xx, 64, 58, 14, 20)] = 45.0  # heart / mediastinum
    hu[_ellipse(yy, xx, 64, 96, 8, 8)] = 700.0  # vertebral body: cortical rim...
    hu[_ellipse(yy, xx, 64, 96, 6, 6)] = 250.0  # ...and cancellous bone
    return hu, lungs


def _lesion_centres(rng: np.random.Generator, finding: Finding, lungs: np.ndarray
                    ) -> list[tuple[float, float]]:
    cx, cy = _LUNGS[finding.side]
    top = finding.zone == "anterior"  # anterior is the top of an axial image
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centres) == finding.count:
            break
        x = cx + rng.uniform(-0.6, 0.6) * _LUNG_AXES[0]
        y = cy + (-1 if top else 1) * rng.uniform(0.15, 0.7) * _LUNG_AXES[1]
        if lungs[int(y), int(x)] and all(abs(x - a) + abs(y - b) > 8 for a, b in centres):
            centres.append((x, y))
    return centres or [(cx, cy + (-10 if top else 10))]


def _draw(hu: np.ndarray, finding: Finding, centres: list[tuple[float, float]], dz_mm: float,
          rng: np.random.Generator) -> None:
    """Add the lesions' cross-sections at ``dz_mm`` from their centre plane (spheres)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    for i, (x, y) in enumerate(centres):
        size = finding.size_mm if i == 0 else max(2, int(finding.size_mm * rng.uniform(0.5, 1)))
        radius_mm = size / 2.0
        if abs(dz_mm) >= radius_mm + (2.5 if finding.finding == "calcification" else 0):
            continue
        r = np.sqrt(max(radius_mm ** 2 - dz_mm ** 2, 1.0)) / PIXEL_MM
        if finding.finding == "nodule":
            hu[_ellipse(yy, xx, x, y, r, r)] = 30.0 + rng.normal(0, 8)
        elif finding.finding == "mass":
            for _ in range(4):  # lobulated: a few overlapping blobs
                ox, oy = rng.normal(0, r / 3, 2)
                rr = r * rng.uniform(0.6, 0.9)
                hu[_ellipse(yy, xx, x + ox, y + oy, rr, rr * rng.uniform(0.8, 1.2))] = 40.0
        elif finding.finding == "calcification":
            r = max(r, 0.8)
            hu[_ellipse(yy, xx, x, y, r, r)] = float(rng.uniform(500, 1000))
        elif finding.finding == "cyst":
            hu[_ellipse(yy, xx, x, y, r + 0.8, r + 0.8)] = -150.0  # thin wall
            hu[_ellipse(yy, xx, x, y, r, r)] = -990.0  # air


def synth_volume(finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """HU volume [SLICES, SIZE, SIZE] (slice 0 inferior, the finding on the middle slice)."""
    hu, lungs = _anatomy(rng)
    centres = _lesion_centres(rng, finding, lungs) if finding.finding != "normal" else []
    slices = []
    for k in range(SLICES):
        slab = hu.copy() + _smooth_noise(rng, SIZE, 32, 6.0)  # slice-to-slice texture
        dz = (k - SLICES // 2) * SLICE_MM
        if centres:
            _draw(slab, finding, centres, dz, np.random.default_rng(rng.integers(1 << 31)))
        slices.append(slab + rng.normal(0, 12.0, slab.shape))  # quantum noise
    return np.stack(slices).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Writing studies to disk (DICOM series or NIfTI) and class folders
# --------------------------------------------------------------------------------------------


def write_dicom_series(volume_hu: np.ndarray, folder: Path, study: str, seed: int) -> list[Path]:
    """Write ``volume_hu`` as a CT series (uint16 + RescaleIntercept -1024, 2 mm pixels, 5 mm
    slices). File names run against the slice order so readers must sort by position. The
    headers carry an obviously fake patient name/ID, for de-identification to remove."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=[study, str(seed), "study"])
    series_uid = generate_uid(entropy_srcs=[study, str(seed), "series"])
    paths = []
    for k, plane in enumerate(volume_hu):
        uid = generate_uid(entropy_srcs=[study, str(seed), str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study, str(seed), "frame"])
        ds.PatientName, ds.PatientID = f"SYNTHETIC^{study}", f"SYN-{study}"
        ds.PatientBirthDate, ds.InstitutionName = "19000101", "imagefm synthetic"
        ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
        ds.InstanceNumber = len(volume_hu) - k  # against the order on purpose
        ds.ImagePositionPatient = [-SIZE * PIXEL_MM / 2, -SIZE * PIXEL_MM / 2, k * SLICE_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [PIXEL_MM, PIXEL_MM], SLICE_MM
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        stored = np.clip(np.rint(plane + 1024), 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{len(volume_hu) - 1 - k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_nifti(volume_hu: np.ndarray, path: Path) -> Path:
    """Write ``volume_hu`` ([S, A→P rows, R→L cols]) as a RAS+ NIfTI-1 file (int16 HU)."""
    import nibabel as nib

    data = np.rint(volume_hu[:, ::-1, ::-1].transpose(2, 1, 0)).astype(np.int16)
    affine = np.diag([PIXEL_MM, PIXEL_MM, SLICE_MM, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _write_text(path: Path, text: str) -> None:
    path.write_text(text + "\n", encoding="utf-8")


def write_synthetic(out: str | Path, n_train: int, n_test: int, seed: int = 0, *,
                    fmt: str = "dicom") -> dict[str, int]:
    """Write ``out/studies/<split>/<id>/`` (a series or ``volume.nii.gz`` + ``findings.txt`` +
    ``findings.ko.txt``) and ``out/classes/<split>/<finding>/<id>.dcm|.nii.gz`` (the same
    volumes, as class folders for adaptation); classes balanced per split. Returns counts."""
    if fmt not in ("dicom", "nifti"):
        raise ValueError(f"fmt must be dicom or nifti, got {fmt!r}")
    out = Path(out)
    counts: dict[str, int] = {}
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1)):
        for i in range(n):
            rng = np.random.default_rng([seed, offset, i])
            finding = sample_finding(rng, FINDINGS[i % len(FINDINGS)])
            en, ko = report(finding, rng)
            volume = synth_volume(finding, rng)
            study = f"{split}{i:05d}"
            folder = out / "studies" / split / study
            classes = out / "classes" / split / finding.finding
            if fmt == "dicom":
                write_dicom_series(volume, folder, study, seed)
                # one file per class item: the middle slice is where the finding is
                middle = write_dicom_series(volume[SLICES // 2:SLICES // 2 + 1],
                                            classes / study, study, seed)[0]
                middle.rename(classes / f"{study}.dcm")
                (classes / study).rmdir()
            else:
                write_nifti(volume, folder / "volume.nii.gz")
                write_nifti(volume, classes / f"{study}.nii.gz")
            _write_text(folder / "findings.txt", en)
            _write_text(folder / "findings.ko.txt", ko)
            (folder / "finding.json").write_text(json.dumps(asdict(finding)) + "\n")
            counts[split] = counts.get(split, 0) + 1
    return counts
