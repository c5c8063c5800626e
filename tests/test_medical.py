"""Medical images: DICOM / NIfTI readers on the files pydicom and nibabel ship, windowing and
photometric handling, series order, de-identification read back, the recipes (bad files skipped
and counted), the synthetic task, the CLI, and a tiny training run whose loss falls."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.pixels import apply_voi  # noqa: E402

from imagefm.data.formats import SkipCounter, read_shards  # noqa: E402
from imagefm.data.medical import (  # noqa: E402
    CT_WINDOWS,
    MedicalReadError,
    View,
    apply_window,
    group_series,
    read_dicom,
    read_dicom_series,
    read_nifti,
    read_volume,
    render,
)
from imagefm.data.medical_deid import deidentify_file, identifying_left, new_uid  # noqa: E402
from imagefm.data.recipes import prepare  # noqa: E402
from imagefm.data.synthetic import medical as synth  # noqa: E402

# Only files inside the installed wheels (pydicom's test_files, nibabel's tests/data): never
# pydicom.data.get_testdata_file, which may download.
DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
NIFTI_DIR = Path(nib.__file__).parent / "tests" / "data"


def dicom(name: str) -> Path:
    path = DICOM_DIR / name
    if not path.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_ct_rescale_to_hu_and_presets():
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    volume = read_dicom(dicom("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert volume.modality == "CT" and volume.shape == (1, 128, 128)
    np.testing.assert_array_equal(volume.pixels[0], hu)
    # The standard's linear window: 0 at/below c - 0.5 - (w-1)/2, 255 above c - 0.5 + (w-1)/2.
    c, w = CT_WINDOWS["lung"]
    edges = np.array([c - 0.5 - (w - 1) / 2, c - 0.5, c - 0.5 + (w - 1) / 2 + 1])
    np.testing.assert_allclose(apply_window(edges, c, w), [0.0, 127.5, 255.0])
    for preset in ("lung", "bone", "brain"):
        expected = np.rint(apply_window(hu, *CT_WINDOWS[preset]))
        got = pixels(render(volume, View(window=preset)))
        assert np.abs(got[..., 0] - expected).max() <= 1 and (got[..., 0] == got[..., 2]).all()
    # No window in the file: auto takes a soft-tissue window for CT; three presets → RGB.
    auto = pixels(render(volume))[..., 0]
    assert np.abs(auto - np.rint(apply_window(hu, *CT_WINDOWS["soft-tissue"]))).max() <= 1
    rgb = pixels(render(volume, View(window="lung+soft-tissue+bone")))
    assert not np.array_equal(rgb[..., 0], rgb[..., 2])


def test_file_window_voi_lut_and_monochrome1(tmp_path):
    mr = pydicom.dcmread(dicom("MR_small.dcm"))
    volume = read_dicom(dicom("MR_small.dcm"))
    assert volume.window == (600.0, 1600.0)  # the file's own WindowCenter/Width
    expected = np.rint(apply_window(mr.pixel_array.astype(np.float32), 600, 1600))
    assert np.abs(pixels(render(volume))[..., 0] - expected).max() <= 1
    # A VOI LUT in the file wins over its window (auto), as the standard's pipeline says.
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.add_new(0x00283006, "US", [255 - i for i in range(256)])  # LUTData (US or OW)
    mr.VOILUTSequence = pydicom.Sequence([lut])
    mr.save_as(tmp_path / "voi.dcm")
    got = pixels(render(read_dicom(tmp_path / "voi.dcm")))[..., 0]
    want = apply_voi(mr.pixel_array, mr).astype(np.int16)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, expected)
    # MONOCHROME1 (low = bright) is inverted into the usual bright = dense picture.
    ct = pydicom.dcmread(dicom("CT_small.dcm"))
    ct.PhotometricInterpretation = "MONOCHROME1"
    ct.save_as(tmp_path / "mono1.dcm")
    normal = pixels(render(read_dicom(dicom("CT_small.dcm")), View(window="minmax")))
    inverted = pixels(render(read_dicom(tmp_path / "mono1.dcm"), View(window="minmax")))
    assert np.abs(normal + inverted - 255).max() <= 1


def test_colour_16_bit_palette_and_multiframe():
    rgb8 = pydicom.dcmread(dicom("SC_rgb_rle.dcm")).pixel_array
    np.testing.assert_array_equal(pixels(render(read_dicom(dicom("SC_rgb_rle.dcm")))), rgb8)
    # The 16-bit copy of the same picture comes down to the same 8 bits (BitsStored scaling).
    sixteen = pixels(render(read_dicom(dicom("SC_rgb_rle_16bit.dcm"))))
    assert np.abs(sixteen - rgb8).max() <= 1
    palette = read_dicom(dicom("examples_palette.dcm"))
    assert palette.rgb and render(palette).size == (800, 350)
    ybr = read_dicom(dicom("examples_ybr_color.dcm"))  # 30 frames, YBR_FULL_422 → RGB
    assert ybr.rgb and ybr.shape == (30, 240, 320)
    frame = pydicom.dcmread(dicom("examples_ybr_color.dcm")).pixel_array[7]
    assert np.abs(pixels(render(ybr, View(index=7))) - frame).max() <= 1


def test_bad_files_are_skipped_and_counted(tmp_path):
    files = [dicom(n) for n in ("CT_small.dcm", "MR_truncated.dcm", "rtplan.dcm", "README.txt")]
    skips = SkipCounter()
    groups = group_series(files, skips)
    assert skips.skipped == {"not dicom": 1}  # README.txt
    assert sum(len(g) for g in groups.values()) == 3
    skips = SkipCounter()
    volume = read_dicom_series(files[:3], skips)  # one good slice out of three files
    assert volume.shape == (1, 128, 128)
    assert skips.skipped == {"undecodable pixels": 1, "no pixels": 1}
    mixed = [dicom("CT_small.dcm"), dicom("CT_small.dcm"), dicom("MR_small.dcm")]
    skips = SkipCounter()
    assert read_dicom_series(mixed, skips).shape == (2, 128, 128)
    assert skips.skipped == {"slice size differs": 1}
    with pytest.raises(MedicalReadError, match="slice of"):
        read_dicom_series(mixed)
    with pytest.raises(MedicalReadError) as err:
        read_dicom(dicom("MR_truncated.dcm"))
    assert err.value.reason == "undecodable pixels"


def test_series_is_ordered_by_position_not_file_name(tmp_path):
    rng = np.random.default_rng(0)
    volume = synth.synth_volume(synth.sample_finding(rng, "mass"), rng)
    paths = synth.write_dicom_series(volume, tmp_path / "s", "study", seed=0)
    assert [p.name for p in paths] == ["IM0002.dcm", "IM0001.dcm", "IM0000.dcm"]
    read = read_volume(tmp_path / "s")  # files named and numbered against the slice order
    assert read.spacing == (synth.SLICE_MM, synth.PIXEL_MM, synth.PIXEL_MM)
    np.testing.assert_allclose(read.pixels, np.clip(np.rint(volume + 1024), 0, 4095) - 1024)
    # A projection is the reduction along the plane's axis.
    mip = pixels(render(read, View("axial", projection="mip", window="lung")))[..., 0]
    expected = np.rint(apply_window(read.pixels.max(axis=0), *CT_WINDOWS["lung"]))
    assert np.abs(mip - expected).max() <= 1


def test_nifti_from_nibabel_in_canonical_orientation(tmp_path):
    path = NIFTI_DIR / "anatomical.nii"
    canon = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, np.float32)
    volume = read_nifti(path)
    x, y, z = canon.shape
    assert volume.shape == (z, y, x)
    # slice k, row r, column c = canonical voxel (x - 1 - c, y - 1 - r, k): superior slices
    # last, anterior rows first, the patient's right in the first columns.
    assert volume.pixels[3, 5, 7] == canon[x - 1 - 7, y - 1 - 5, 3]
    coronal = render(volume, View("coronal", window="minmax"))
    sx, sy, sz = nib.load(path).header.get_zooms()[:3]
    assert coronal.size == (x, round(z * sz / sx))
    four_d = read_nifti(NIFTI_DIR / "example4d.nii.gz")  # 4-D: the first volume
    assert len(four_d.shape) == 3 and four_d.pixels.ndim == 3
    with pytest.raises(MedicalReadError):
        read_nifti(NIFTI_DIR / "README.txt" if (NIFTI_DIR / "README.txt").exists()
                   else dicom("CT_small.dcm"))
    # Our writer and reader agree (the synthetic task's NIfTI path).
    rng = np.random.default_rng(1)
    hu = synth.synth_volume(synth.sample_finding(rng, "cyst"), rng)
    back = read_nifti(synth.write_nifti(hu, tmp_path / "v.nii.gz"))
    np.testing.assert_allclose(back.pixels, np.rint(hu))


def test_deidentified_copy_reads_back_clean(tmp_path):
    src = dicom("CT_small.dcm")
    original = pydicom.dcmread(src)
    assert identifying_left(original)  # names, institution, private tags...
    out = deidentify_file(src, tmp_path / "a" / "ct.dcm", salt="s3cret")
    back = pydicom.dcmread(out)
    assert identifying_left(back) == []
    assert back.PatientName == "" and back.PatientID == "" and back.PatientBirthDate == ""
    assert "InstitutionName" not in back and "PatientIdentityRemoved" in back
    assert not any(e.tag.is_private for e in back.iterall())
    assert back.StudyInstanceUID == new_uid(original.StudyInstanceUID, "s3cret")
    assert back.StudyInstanceUID != original.StudyInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, original.pixel_array)
    # Nested sequences are walked (rtplan holds referenced UIDs and names inside them).
    plan = pydicom.dcmread(deidentify_file(dicom("rtplan.dcm"), tmp_path / "p.dcm", "s3cret"))
    assert identifying_left(plan) == []
    burned = pydicom.dcmread(src)
    burned.BurnedInAnnotation = "YES"
    burned.save_as(tmp_path / "burned.dcm")
    with pytest.raises(MedicalReadError, match="BurnedInAnnotation"):
        deidentify_file(tmp_path / "burned.dcm", tmp_path / "b.dcm", "s3cret")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medical")
    synth.write_synthetic(root / "dicom", 10, 5, seed=0)
    synth.write_synthetic(root / "nifti", 5, 0, seed=1, fmt="nifti")
    return root


def test_synthetic_reports_match_their_findings():
    rng = np.random.default_rng(3)
    for name in synth.FINDINGS:
        finding = synth.sample_finding(rng, name)
        en, ko = synth.report(finding, rng)
        if name == "normal":
            assert "lesion" in en or "clear" in en
            continue
        assert name[:5] in en.lower() and finding.side in en.lower()
        assert dict(zip(synth.FINDINGS, synth.CLASS_NAMES["ko"], strict=True))[name] in ko
        assert {"right": "우측", "left": "좌측"}[finding.side] in ko


def test_recipes_write_pairs_and_classes_without_identifiers(studies, tmp_path):
    # A broken study and one without findings next to the good ones: skipped and counted.
    src = tmp_path / "studies"
    shutil.copytree(studies / "dicom" / "studies", src)
    (src / "train" / "broken").mkdir()
    shutil.copy(dicom("MR_truncated.dcm"), src / "train" / "broken" / "a.dcm")
    (src / "train" / "broken" / "findings.txt").write_text("A nodule.")
    (src / "train" / "silent").mkdir()
    shutil.copy(dicom("CT_small.dcm"), src / "train" / "silent" / "a.dcm")
    manifest = prepare("medical", tmp_path / "pairs", src, progress=False,
                       views=["axial", "coronal:mip"], window="lung+soft-tissue+bone")
    assert manifest["counts"]["splits"] == {"train": 20, "test": 10}
    assert manifest["counts"]["captions_per_lang"] == {"en": 30, "ko": 30}
    assert manifest["skipped"] == {"undecodable pixels": 1, "no findings text": 1}
    records = list(read_shards(sorted((tmp_path / "pairs").glob("*.tar"))))
    texts = {(r.split, c.lang, c.text) for r in records for c in r.captions}
    study = studies / "dicom" / "studies" / "test" / "test00002"
    assert ("test", "ko", (study / "findings.ko.txt").read_text().strip()) in texts
    blob = json.dumps([r.to_json() | {"key": r.key} for r in records], ensure_ascii=False)
    assert "SYNTHETIC" not in blob and "SYN-" not in blob and "test00002" not in blob
    axial = next(r for r in records if r.key.endswith("-axial"))
    assert Image.open(io.BytesIO(axial.image)).size == (synth.SIZE, synth.SIZE)
    # Class folders (DICOM and NIfTI items) → labelled records for imagefm adapt.
    for fmt, total in (("dicom", 15), ("nifti", 5)):
        manifest = prepare("medical-classes", tmp_path / f"classes-{fmt}",
                           studies / fmt / "classes", progress=False)
        assert manifest["counts"]["labelled"] == total
    labelled = list(read_shards(sorted((tmp_path / "classes-dicom").glob("*.tar"))))
    assert {r.label_name for r in labelled} == set(synth.FINDINGS)
    assert all(sorted(synth.FINDINGS)[r.label] == r.label_name for r in labelled)


def test_cli_synth_prepare_deid(tmp_path):
    import typer
    from typer.testing import CliRunner

    from imagefm.cli import medical

    app = typer.Typer()
    medical.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["medical", "synth", "--out", str(tmp_path / "s"), "--train",
                                 "5", "--test", "0"])
    assert result.exit_code == 0, result.output
    names = json.loads((tmp_path / "s" / "classnames.json").read_text())
    assert names["en"][sorted(synth.FINDINGS).index("nodule")] == "nodule"
    (tmp_path / "s" / "studies" / "train" / "train00000" / "junk.dcm").write_text("not dicom")
    result = runner.invoke(app, ["medical", "deid", str(tmp_path / "s" / "studies"),
                                 str(tmp_path / "clean"), "--salt", "k"])
    assert result.exit_code == 0, result.output
    assert "1 not dicom" in result.output
    cleaned = sorted((tmp_path / "clean").rglob("*.dcm"))
    assert len(cleaned) == 15
    for path in cleaned[:3]:
        assert identifying_left(pydicom.dcmread(path)) == []
    result = runner.invoke(app, ["medical", "view", str(dicom("CT_small.dcm")), "--out",
                                 str(tmp_path / "v.png"), "--window", "lung", "--window", "bone",
                                 "--height", "64"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "v.png").size == (64 + 4 + 64, 64)
    result = runner.invoke(app, ["medical", "prepare", "--src", str(tmp_path / "s" / "studies"),
                                 "--out", str(tmp_path / "p"), "--window", "nope", "--quiet"])
    assert result.exit_code != 0 and "window" in result.output


def test_a_tiny_run_on_report_pairs_learns(studies, tmp_path):
    torch = pytest.importorskip("torch")
    from imagefm.cli.medical import init_model
    from imagefm.train.config import load_config
    from imagefm.train.launch import run
    from imagefm.train.metrics import read_metrics

    prepare("medical", tmp_path / "pairs", studies / "dicom" / "studies", progress=False,
            window="lung+soft-tissue+bone")
    texts = [c.text for r in read_shards(sorted((tmp_path / "pairs").glob("train-*.tar")))
             for c in r.captions]
    torch.manual_seed(0)
    init_model(texts, image_size=32, vocab_size=400, context_length=32, layers=1).save_pretrained(
        tmp_path / "init")
    run_dir = run(load_config(None, [
        f"run.output_dir={tmp_path}", "run.progress=false", "run.tensorboard=false",
        "run.log_every=1", f"model.init={tmp_path / 'init'}", "data.source=stream",
        f"data.path={tmp_path / 'pairs'}", "data.batch_size=10", "train.steps=20",
        "train.precision=fp32", "optim.lr=3e-3", "optim.warmup_steps=2",
        "optim.weight_decay=0", "data.options.shuffle_buffer=10"]))
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 20
    assert sum(losses[-6:]) < 0.8 * sum(losses[:6]), losses  # ln 10 = 2.3 is chance
