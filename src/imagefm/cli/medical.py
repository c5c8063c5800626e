"""``imagefm medical synth | prepare | view | deid | init | eval``: DICOM / NIfTI to a dual encoder.

    imagefm medical synth   --out data/medical-synth --train 1000 --test 250   # synthetic studies
    imagefm medical prepare --src data/medical-synth/studies --out data/medical-pairs \\
        --window lung+soft-tissue+bone                                   # image–report shards
    imagefm medical prepare --classes --src data/medical-synth/classes \\
        --out data/medical-classes --window lung+soft-tissue+bone        # labelled shards (adapt)
    imagefm medical init    --data data/medical-pairs --out runs/medical-init   # BPE + tiny ViT
    imagefm train configs/medical-synth.yaml
    imagefm medical eval    --model runs/medical-synth/final --data data/medical-classes
    imagefm medical view    FILE_OR_SERIES --out x.png --window lung --window bone
    imagefm medical deid    IN_DIR OUT_DIR --salt SECRET           # de-identified DICOM copies
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

medical_app = typer.Typer(help="Medical images: DICOM / NIfTI recipes, de-identification, a "
                               "synthetic task.", no_args_is_help=True)


@medical_app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Folder for studies/ and classes/."),
    train: int = typer.Option(1000, "--train", help="Training studies."),
    test: int = typer.Option(250, "--test", help="Held-out studies (seeded apart)."),
    seed: int = typer.Option(0, "--seed"),
    fmt: str = typer.Option("dicom", "--format", help="dicom (a CT series) or nifti."),
) -> None:
    """Write the SYNTHETIC chest-CT-like task (findings in English and Korean)."""
    from imagefm.data.synthetic.medical import CLASS_NAMES, FINDINGS, write_synthetic

    counts = write_synthetic(out, train, test, seed, fmt=fmt)
    # Class names for `imagefm adapt --classes`, in the label order of `medical-classes`
    # (class folders sorted by name), without articles: adapt's English templates add them.
    order = sorted(FINDINGS)
    names = {lang: [CLASS_NAMES[lang][FINDINGS.index(f)].removeprefix("a ") for f in order]
             for lang in CLASS_NAMES}
    (Path(out) / "classnames.json").write_text(json.dumps(names, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    typer.echo(f"wrote {counts} synthetic studies to {out} (studies/, classes/, classnames.json)")


@medical_app.command("prepare")
def prepare(
    src: Path = typer.Option(..., "--src", help="Folder of studies (or class folders)."),
    out: Path = typer.Option(..., "--out", help="Output folder for shards + manifest.json."),
    classes: bool = typer.Option(False, "--classes",
                                 help="--src holds class folders (recipe medical-classes)."),
    view: list[str] = typer.Option(["axial"], "--view",
                                   help="axial | coronal[:i] | sagittal[:0.3] | axial:mip..."),
    window: str = typer.Option("auto", "--window",
                               help="auto | minmax | a CT preset | c,w | three joined by '+'."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Render DICOM / NIfTI studies into shards (recipe medical or medical-classes)."""
    from imagefm.data.medical import View, parse_window
    from imagefm.data.recipes import prepare as run_recipe

    try:
        parse_window(window)
        for v in view:
            View.parse(v)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    manifest = run_recipe("medical-classes" if classes else "medical", out, src,
                          overwrite=overwrite, progress=not quiet, views=view, window=window)
    counts = manifest["counts"]
    skipped = sum(manifest["skipped"].values())
    typer.echo(f"wrote {counts['total']} records {counts['splits']} to {out}; skipped {skipped}"
               + (f": {manifest['skipped']}" if skipped else ""))


@medical_app.command("view")
def view_command(
    src: Path = typer.Argument(..., help="A DICOM file, a folder (one series) or a NIfTI file."),
    out: Path = typer.Option(..., "--out", help="PNG to write: one panel per view x window."),
    view: list[str] = typer.Option(["axial"], "--view"),
    window: list[str] = typer.Option(["auto"], "--window"),
    height: int = typer.Option(256, "--height", help="Panel height in pixels."),
) -> None:
    """Render a file or series as the tower would see it (to check windows and views)."""
    from PIL import Image

    from imagefm.data.medical import MedicalReadError, View, read_volume, render

    try:
        volume = read_volume(src)
        panels = [render(volume, View.parse(v, w)) for v in view for w in window]
    except (MedicalReadError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    panels = [p.resize((max(1, round(p.width * height / p.height)), height)) for p in panels]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), height))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 4
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    typer.echo(f"wrote {out}: {volume.modality or '?'} {volume.shape}, spacing {volume.spacing}")


@medical_app.command("deid")
def deid(
    src: Path = typer.Argument(..., help="A DICOM file or a folder of them."),
    out: Path = typer.Argument(..., help="Where the de-identified copies go (same layout)."),
    salt: str = typer.Option(None, "--salt", envvar="IMAGEFM_DEID_SALT",
                             help="Secret keying the new UIDs (or IMAGEFM_DEID_SALT)."),
    allow_burned_in: bool = typer.Option(False, "--allow-burned-in"),
) -> None:
    """Copy DICOM files with identifying tags blanked/removed, UIDs remapped, private tags gone."""
    from imagefm.data.formats import SkipCounter
    from imagefm.data.medical import DICOM_SUFFIXES, MedicalReadError
    from imagefm.data.medical_deid import deidentify_file

    if not salt:
        raise typer.BadParameter("--salt SECRET (or IMAGEFM_DEID_SALT) is required: it keys the "
                                 "new UIDs, keep it out of the exported data")
    # Only DICOM-named files (.dcm, .dicom, .ima, no suffix): reports and other text may hold
    # names in free text, which this does not scrub, so they are not copied.
    files = [src] if src.is_file() else [p for p in sorted(src.rglob("*")) if p.is_file()
                                         and p.suffix.lower() in DICOM_SUFFIXES]
    skips = SkipCounter()
    for path in files:
        target = out if src.is_file() else out / path.relative_to(src)
        try:
            deidentify_file(path, target, salt, allow_burned_in=allow_burned_in)
            skips.ok()
        except MedicalReadError as err:
            skips.add(err.reason, str(err))
    typer.echo(f"de-identified {skips.seen - skips.total_skipped} files into {out}; "
               f"{skips.report()}")


def init_model(texts: list[str], image_size: int = 64, vocab_size: int = 1000,
               context_length: int = 48, layers: int | None = None) -> Any:
    """A fresh ``tiny`` dual encoder with a byte-level BPE trained on ``texts`` (the reports);
    ``layers`` (both towers) makes it shallower still for a CPU."""
    import dataclasses

    import imagefm
    from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer
    from imagefm.tokenizer import train_bpe

    tokenizer = train_bpe(texts, vocab_size, context_length=context_length)
    base = imagefm.preset("tiny")
    depth = {"layers": layers} if layers else {}
    config = dataclasses.replace(
        base, vision=dataclasses.replace(base.vision, image_size=image_size, **depth),
        text=dataclasses.replace(base.text, **depth))
    model = DualEncoder(fit_text_to_tokenizer(config, tokenizer))
    model.tokenizer = tokenizer
    return model


@medical_app.command("init")
def init(
    data: Path = typer.Option(..., "--data", help="Prepared image–report shards."),
    out: Path = typer.Option(..., "--out", help="Where the new model goes."),
    image_size: int = typer.Option(64, "--image-size"),
    vocab_size: int = typer.Option(1000, "--vocab-size"),
    context_length: int = typer.Option(48, "--context-length"),
    layers: int | None = typer.Option(None, "--layers", help="Depth of both towers (tiny: 4)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """A fresh tiny CLIP whose tokenizer is trained on the reports of the TRAIN split only."""
    import torch

    from imagefm.data.formats import read_shards

    torch.manual_seed(seed)
    texts = [c.text for r in read_shards(data) if r.split == "train" for c in r.captions]
    if not texts:
        raise typer.BadParameter(f"no train-split captions in {data}")
    model = init_model(texts, image_size, vocab_size, context_length, layers)
    model.save_pretrained(out)
    lengths = [len(x) for x in model.tokenizer.encode_batch(texts[:2000])]
    typer.echo(f"wrote {out}: vocabulary {model.tokenizer.vocab_size} from {len(texts)} reports, "
               f"longest {max(lengths)} tokens of {context_length}")


@medical_app.command("eval")
def evaluate(
    model_path: Path = typer.Option(..., "--model"),
    data: Path = typer.Option(..., "--data", help="medical-classes shards of the synthetic task."),
    out: Path = typer.Option(..., "--out", help="Report folder."),
    split: str = typer.Option("test", "--split"),
    lang: str = typer.Option("en,ko", "--lang"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Zero-shot finding type (en / ko) on the synthetic task, with report-style prompts."""
    import torch

    import imagefm
    from imagefm.data.formats import SkipCounter, read_shards
    from imagefm.data.synthetic.medical import CLASS_NAMES, FINDINGS, TEMPLATES
    from imagefm.eval.report import format_table, write_report
    from imagefm.eval.zeroshot import evaluate_zeroshot

    if threads:
        torch.set_num_threads(threads)
    model = imagefm.load(model_path).eval()
    processor = imagefm.load_processor(model_path)
    skips = SkipCounter()
    samples = [(r.image, FINDINGS.index(r.label_name), r.key) for r in read_shards(data, skips)
               if r.split == split and r.label_name in FINDINGS]
    if not samples:
        raise typer.BadParameter(f"no {split!r} records labelled {FINDINGS} in {data}")
    results = [evaluate_zeroshot(model, processor, samples, CLASS_NAMES, code, TEMPLATES[code],
                                 name="zeroshot:medical-synth", skips=skips)
               for code in (x.strip() for x in lang.split(",")) if code]
    meta = {"model": str(model_path), "data": str(data), "split": split,
            "images": len(samples), "note": "SYNTHETIC task (imagefm.data.synthetic.medical)",
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    paths = write_report(results, out, title="Zero-shot finding type (synthetic)", meta=meta)
    typer.echo(format_table(results))
    typer.echo(f"\nwrote {paths['markdown']}")


def register(app: typer.Typer) -> None:
    app.add_typer(medical_app, name="medical")
