"""``imagefm adapt METHOD --model M --data D``: few-shot adaptation of a dual encoder + report.

METHOD is one of the classification methods of :mod:`imagefm.adapt` (``zeroshot``, ``probe``,
``zs-probe``, ``tip``, ``tip-f``, ``coop``, ``lora``, ``finetune``), several comma-separated,
``all`` (every one but ``finetune``), ``auto`` (the recipe for your own folder: every cheap
method on all training images and the curve below, the best on validation saved as the adapted
model) or ``anomaly`` (WinCLIP-style defect detection, zero-shot and few-shot).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

CHEAP = ("zeroshot", "probe", "zs-probe", "tip", "tip-f", "coop", "lora")


def _parse_shots(text: str, allow_all: bool = True) -> list[int | None]:
    shots: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all" and allow_all:
            shots.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise typer.BadParameter(f"--shots: {part!r} is not a number"
                                     f"{' or all' if allow_all else ''}") from None
        if value < 0:
            raise typer.BadParameter(f"--shots: {value} must be >= 0")
        shots.append(value)
    if not shots:
        raise typer.BadParameter("--shots needs at least one value, e.g. 1,2,4,8,16")
    return shots


def _parse_methods(text: str) -> list[str]:
    from imagefm.adapt import METHODS

    if text == "all":
        return list(CHEAP)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise typer.BadParameter(f"unknown method(s) {unknown or text!r}; choose among "
                                 f"{', '.join(METHODS)}, all, auto or anomaly")
    return methods


def _classnames(data: Path, names: list[str], classes: Path | None, lang: str) -> list[str]:
    from imagefm.cli.eval import find_classnames, with_known_translations
    from imagefm.eval.templates import resolve_classnames

    found = find_classnames(data, classes) if classes is not None else None
    found = with_known_translations(found or names, [lang])
    if isinstance(found, list) and lang != "en":
        raise typer.BadParameter(f"no {lang!r} class names for this data: pass --classes FILE "
                                 "with {\"en\": [...], \"" + lang + "\": [...]}")
    resolved = resolve_classnames(found, lang)
    if len(resolved) != len(names):
        raise typer.BadParameter(f"{len(resolved)} class names for {len(names)} classes")
    return resolved


def _only_classes(text: str | None, data: Any, second: Any) -> list[str] | None:
    """``--only-classes``: None (every class), a list of names, or 'shared' with --also-test."""
    from imagefm.adapt.data import shared_classes

    if text is None:
        return None
    if text.strip() == "shared":
        if second is None:
            raise typer.BadParameter("--only-classes shared needs --also-test D")
        names = shared_classes(data, second)
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in data.classnames]
    if unknown or not names:
        raise typer.BadParameter(f"--only-classes: {unknown or text!r} not among the data's "
                                 f"classes {data.classnames}")
    return names


def _machine(device: str) -> str:
    import os
    import platform

    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")


def _run_anomaly(model: Any, processor: Any, data: str, shots: list[int], lang: str,
                 n: int, seed: int, object_name: str, repeats: int, out: Path,
                 meta: dict[str, Any]) -> None:
    from imagefm.adapt.inspection import (
        check_sets,
        evaluate_anomaly,
        inspection_from_shards,
        synthetic_inspection,
    )
    from imagefm.adapt.report import write_anomaly_report

    started = time.perf_counter()
    try:
        if data == "synthetic":
            size = processor.card.image_size
            sets = synthetic_inspection(size, n, max(max(shots), 1) * 2, seed)
        else:
            sets = inspection_from_shards(data, object_name, n)
        check_sets(sets, shots)
    except ValueError as err:  # data that cannot give the numbers asked: say so, no traceback
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    rows, maps = evaluate_anomaly(model, processor, sets, shots, lang, repeats=repeats,
                                  seed=seed, out_dir=out)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    paths = write_anomaly_report(rows, out, meta, maps)
    for r in rows:
        if r["category"] == "mean" or len(sets) == 1:
            pixel = "—" if r["pixel_auroc"] is None else f"{100 * r['pixel_auroc']:.1f}"
            typer.echo(f"{r['category']:>8} {r['method']:>12} shots={r['shots']}: image AUROC "
                       f"{100 * r['image_auroc']:.1f}  pixel AUROC {pixel}")
    typer.echo(f"\nwrote {paths['markdown']}")


def register(app: typer.Typer) -> None:
    @app.command("adapt")
    def adapt_command(
        method: str = typer.Argument(..., metavar="METHOD",
                                     help="zeroshot, probe, zs-probe, tip, tip-f, coop, lora, "
                                          "finetune (comma-separated), all, auto or anomaly."),
        model_path: Path = typer.Option(..., "--model", help="Dual encoder checkpoint."),
        data: str | None = typer.Option(None, "--data",
                                        help="Labelled shards or a class-per-folder tree; for "
                                             "anomaly: defect shards or 'synthetic'."),
        shots: str | None = typer.Option(None, "--shots",
                                         help="Images per class, comma-separated; 'all' = "
                                              "every training image (default 1,2,4,8,16; "
                                              "anomaly: normal images, 0,1,4)."),
        out: Path | None = typer.Option(None, "--out", help="Report folder."),
        lang: str = typer.Option("en", "--lang", help="Language of the class prompts."),
        classes: Path | None = typer.Option(None, "--classes",
                                            help="JSON class names ({\"en\": [...], \"ko\": "
                                                 "[...]}) when the data has none in --lang."),
        seed: int = typer.Option(0, "--seed", help="Seed of the splits and the training."),
        val_per_class: int = typer.Option(10, "--val-per-class",
                                          help="Validation images per class (taken from "
                                               "training data)."),
        test_per_class: int | None = typer.Option(None, "--test-per-class",
                                                  help="At most this many test images per "
                                                       "class (a shorter run)."),
        also_test: str | None = typer.Option(None, "--also-test",
                                             help="A second labelled set (another domain) to "
                                                  "test every method on too: its images of "
                                                  "the experiment's classes (by name), at most "
                                                  "--test-per-class per class."),
        only_classes: str | None = typer.Option(None, "--only-classes",
                                                help="Use only these classes (comma-separated "
                                                     "names); 'shared': those --also-test has "
                                                     "too."),
        reference: str | None = typer.Option(None, "--reference",
                                             help="Forgetting check: synthetic:colour,shape | "
                                                  "zeroshot:PATH | retrieval:PATH."),
        overrides: list[str] = typer.Option([], "--set",
                                            help="Method settings, e.g. coop.steps=100, "
                                                 "lora.rank=8, finetune.lock=text "
                                                 "(repeatable)."),
        save: bool = typer.Option(False, "--save",
                                  help="Save the best result (validation) at the largest shot "
                                       "count as an adapted model in OUT/model."),
        cache: Path | None = typer.Option(None, "--cache",
                                          help="Feature cache folder (default OUT/cache)."),
        n: int = typer.Option(60, "--n", help="anomaly: test images per category."),
        object_name: str = typer.Option("object", "--object",
                                        help="anomaly: the object's name in prompts (your "
                                             "data)."),
        repeats: int = typer.Option(3, "--repeats",
                                    help="anomaly: random draws of the k normal images."),
        batch_size: int = typer.Option(128, "--batch-size"),
        device: str | None = typer.Option(None, "--device",
                                          help="cpu, cuda... (default: cuda if any)."),
        threads: int | None = typer.Option(None, "--threads",
                                           help="CPU threads (1 is fastest for tiny models on "
                                                "a busy machine)."),
    ) -> None:
        """Adapt a dual encoder with few labels; write a report (and optionally the model)."""
        import torch

        import imagefm
        from imagefm.adapt import (
            AdaptedClassifier,
            Experiment,
            load_labelled,
            make_splits,
            parse_overrides,
            parse_reference,
            sweep,
        )
        from imagefm.adapt.data import cap_per_class
        from imagefm.adapt.report import write_adapt_report
        from imagefm.data.formats import SkipCounter

        if threads is not None:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        anomaly = method == "anomaly"
        methods = [] if anomaly else (list(CHEAP) if method == "auto"
                                      else _parse_methods(method))
        configs = parse_overrides(overrides)
        out = out or Path("runs") / "adapt" / method.replace(",", "+")
        model = imagefm.load(model_path).to(device).eval()
        processor = imagefm.load_processor(model_path)
        meta: dict[str, Any] = {"model": str(model_path), "data": data, "method": method,
                                "seed": seed, "machine": _machine(device)}
        if anomaly:
            shot_list = [int(s) for s in _parse_shots(shots or "0,1,4", allow_all=False)]
            meta.update(shots=shot_list, n_per_category=n, lang=lang)
            _run_anomaly(model, processor, data or "synthetic", shot_list, lang, n, seed,
                         object_name, repeats, out, meta)
            return
        if data is None:
            raise typer.BadParameter("--data is required (labelled shards or a folder)")
        skips, decode_skips = SkipCounter(), SkipCounter()  # reading; decoding for features
        labelled = load_labelled(data, skips)
        splits = make_splits(labelled, val_per_class=val_per_class,
                             test_per_class=test_per_class, seed=seed)
        if method == "auto":
            curve = [k for k in (1, 2, 4, 8, 16) if k < splits.max_shots()]
            shot_list = (_parse_shots(shots) if shots else curve + [None])
            save = True
        else:
            shot_list = _parse_shots(shots or "1,2,4,8,16")
        names = _classnames(Path(data), splits.classnames, classes, lang)
        second = None
        if also_test is not None:
            second = cap_per_class(load_labelled(also_test, skips), test_per_class, seed)
        kept_classes = _only_classes(only_classes, labelled, second)
        ref = parse_reference(reference) if reference else None
        if ref is None and any(m in ("lora", "finetune") for m in methods):
            typer.echo("note: no --reference given, so no forgetting check", err=True)
        started = time.perf_counter()
        experiment = Experiment(model, processor, splits, names, lang,
                                cache_dir=cache or out / "cache", reference=ref,
                                configs=configs, batch_size=batch_size, skips=decode_skips,
                                progress=True, also_test=second, only_classes=kept_classes)
        also_text = ("" if experiment.also is None else
                     f", {len(experiment.also)} {Path(also_test or '').name} images")
        typer.echo(f"{len(experiment.pool)} training, {len(experiment.val)} validation, "
                   f"{len(experiment.test)} test images{also_text}, "
                   f"{len(experiment.classnames)} classes; features in "
                   f"{experiment.feature_seconds:.1f}s")
        results = sweep(experiment, methods, shot_list, progress=typer.echo)
        if experiment.also is not None:
            meta.update(also_test=f"{also_test} ({len(experiment.also)} images)")
        if kept_classes is not None:
            meta.update(only_classes=", ".join(kept_classes))
        meta.update(classes=len(experiment.classnames), lang=lang, train_pool=len(experiment.pool),
                    val=len(experiment.val), test=len(experiment.test),
                    feature_seconds=round(experiment.feature_seconds, 1),
                    total_seconds=round(time.perf_counter() - started, 1),
                    reference=ref.name if ref else None,
                    skipped="; ".join(c.report() for c in (skips, decode_skips)
                                      if c.total_skipped) or "none",
                    settings=" ".join(overrides) or "defaults")
        if save:
            largest = max((r.shots for r in results if r.shots), default=0)
            pool = [r for r in results if r.shots == (None if any(
                x.shots is None for x in results) else largest)] or results
            best = max(pool, key=lambda r: r.val_top1)
            target = best.model if best.model is not None else model
            AdaptedClassifier(target, processor, best.head, experiment.classnames,
                              {"method": best.method, "shots": best.shots, "lang": lang,
                               "test_top1": best.top1, "val_top1": best.val_top1}
                              ).save(out / "model")
            meta["saved_model"] = (f"{out / 'model'} ({best.method}, shots "
                                   f"{'all' if best.shots is None else best.shots}, val "
                                   f"{100 * best.val_top1:.1f}%)")
        name = model_path.name if model_path.name not in ("model", "final") else \
            f"{model_path.parent.name}/{model_path.name}"
        paths = write_adapt_report([r.to_dict() for r in results], out,
                                   f"Adaptation of {name} on {Path(data).name}", meta,
                                   (f"{Path(data).name} test", Path(also_test or "").name))
        if save:
            typer.echo(f"saved {meta['saved_model']}")
        typer.echo(f"\nwrote {paths['markdown']}")
