"""``imagefm eval MODEL --suite ... --out DIR``: evaluate a dual encoder and write a report.

Suites:

* ``synthetic`` (all synthetic suites) or one or more of them by name, comma-separated
  (``colour,shape,heldout,count,relation,text``): images rendered on the fly, no data needed;
* ``zeroshot``: classification on labelled shards in ``--data`` (e.g. ``imagefm data prepare
  cifar10``); class names from ``--classes FILE``, else ``manifest.json`` / ``classes.json`` in
  the data folder, else the records' own label names;
* ``retrieval``: image ↔ text recall@K on captioned shards in ``--data``, per caption language;
* ``speech``: a CLAP speech–text model on a speech dataset in ``--data`` (``--split``, default
  test): zero-shot spoken keywords and speech ↔ text recall@K (:mod:`imagefm.eval.speech`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import typer

KNOWN_KOREAN_SOURCES = ("imagefm.data.recipes.cifar10",)


def _parse_langs(value: str | None) -> list[str] | None:
    if value is None:
        return None
    langs = [part.strip() for part in value.split(",") if part.strip()]
    if not langs:
        raise typer.BadParameter("--lang needs at least one language, e.g. en,ko")
    return langs


def _records(data: Path, split: str | None, limit: int | None, skips: Any) -> Iterator[Any]:
    from imagefm.data.formats import read_shards

    records = (r for r in read_shards(data, skips) if split is None or r.split == split)
    return islice(records, limit) if limit else records


def _classes_from_json(value: Any, where: str) -> Any:
    """Accept a list, ``{lang: list}`` or ``{en: other}`` (checked later by resolve_classnames)."""
    if isinstance(value, dict) and "classes" in value:
        value = value["classes"]
    if isinstance(value, (list, dict)) and value:
        return value
    raise typer.BadParameter(f"{where}: expected class names as a list, {{lang: [names]}} or "
                             "{english: translation}")


def find_classnames(data: Path, classes_file: Path | None) -> Any | None:
    """Class names from ``--classes``, else the data folder's manifest.json / classes.json."""
    if classes_file is not None:
        return _classes_from_json(json.loads(classes_file.read_text(encoding="utf-8")),
                                  str(classes_file))
    folder = data if data.is_dir() else data.parent
    for name in ("manifest.json", "classes.json"):
        path = folder / name
        if not path.is_file():
            continue
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, list) or (isinstance(content, dict) and "classes" in content):
            return _classes_from_json(content, str(path))
    return None


def classnames_from_records(records: Any) -> list[str]:
    """Names in label order from the records' ``label``/``label_name`` (one pass over the data)."""
    names: dict[int, str] = {}
    for record in records:
        if record.label is not None:
            names.setdefault(record.label, record.label_name or str(record.label))
    if not names:
        raise typer.BadParameter("the data has no labelled records; zeroshot needs labels")
    return [names.get(i, str(i)) for i in range(max(names) + 1)]


def with_known_translations(classes: Any, langs: list[str]) -> Any:
    """Add Korean names to a plain English list when a recipe knows them all (e.g. CIFAR-10)."""
    import importlib

    if "ko" not in langs or not isinstance(classes, list):
        return classes
    for module_name in KNOWN_KOREAN_SOURCES:
        korean = getattr(importlib.import_module(module_name), "KOREAN", {})
        if all(name in korean for name in classes):
            return {"en": classes, "ko": [korean[name] for name in classes]}
    return classes


def run_zeroshot_eval(model: Any, processor: Any, data: Path, langs: list[str],
                      classes_file: Path | None, split: str | None, limit: int | None,
                      batch_size: int) -> list[dict[str, Any]]:
    from imagefm.data.formats import SkipCounter
    from imagefm.eval.templates import resolve_classnames
    from imagefm.eval.zeroshot import evaluate_records

    classes = find_classnames(data, classes_file)
    if classes is None:
        classes = classnames_from_records(_records(data, split, limit, SkipCounter()))
    classes = with_known_translations(classes, langs)
    results = []
    for lang in langs:
        try:
            resolve_classnames(classes, lang)
            if isinstance(classes, list) and lang != "en":
                raise ValueError("the class names found are a plain list (taken as English)")
        except ValueError as err:
            results.append({"task": "classification", "name": f"zeroshot:{data.name}",
                            "lang": lang, "skipped_reason": f"no class names in {lang!r}: {err}; "
                            "pass --classes FILE with {\"en\": [...], \"ko\": [...]}"})
            continue
        skips = SkipCounter()
        results.append(evaluate_records(model, processor, _records(data, split, limit, skips),
                                        classes, lang, name=f"zeroshot:{data.name}",
                                        batch_size=batch_size, skips=skips))
    return results


def _run_retrieval(model: Any, processor: Any, data: Path, langs: list[str] | None,
                   split: str | None, limit: int | None, batch_size: int) -> list[dict[str, Any]]:
    from imagefm.data.formats import SkipCounter
    from imagefm.eval.retrieval import evaluate_retrieval_languages

    records = _records(data, split, limit, SkipCounter())
    return evaluate_retrieval_languages(model, processor, records, langs,
                                        name=f"retrieval:{data.name}", batch_size=batch_size)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        model_path: Path = typer.Argument(..., metavar="MODEL",
                                          help="Checkpoint: imagefm, Hugging Face or open_clip."),
        suite: str = typer.Option("synthetic", "--suite",
                                  help="synthetic | zeroshot | retrieval | speech (a CLAP "
                                       "model on a speech dataset) | comma-separated "
                                       "synthetic suites (colour,shape,heldout,count,relation,"
                                       "text)."),
        data: Path | None = typer.Option(None, "--data", help="Shards for zeroshot / retrieval."),
        lang: str | None = typer.Option(None, "--lang",
                                 help="Languages, comma-separated (default: en,ko for synthetic "
                                      "and zeroshot; every caption language for retrieval)."),
        out: Path = typer.Option(Path("eval-report"), "--out", help="Report folder."),
        n: int = typer.Option(200, "--n", help="Images per synthetic suite and language."),
        seed: int = typer.Option(0, "--seed", help="Seed of the synthetic images."),
        classes: Path | None = typer.Option(None, "--classes",
                                     help="JSON class names for zeroshot: a list, "
                                          "{\"en\": [...], \"ko\": [...]} or {english: korean}."),
        split: str | None = typer.Option(None, "--split",
                                         help="Only records of this split (e.g. test)."),
        limit: int | None = typer.Option(None, "--limit",
                                         help="At most this many records from --data."),
        batch_size: int = typer.Option(64, "--batch-size"),
        device: str | None = typer.Option(None, "--device",
                                          help="cpu, cuda, cuda:1... (default: cuda if any)."),
        arch: str | None = typer.Option(None,
                                        help="open_clip architecture of a bare state-dict file."),
    ) -> None:
        """Evaluate a dual encoder (synthetic suites, zero-shot, retrieval); write a report."""
        import torch

        import imagefm
        from imagefm.eval.report import format_table, write_report
        from imagefm.eval.suites import LANGS, SUITES, run_suites

        langs = _parse_langs(lang)
        if suite == "speech":  # a CLAP speech–text model (imagefm.eval.speech); no image processor
            if data is None:
                raise typer.BadParameter("--suite speech needs --data DIR (a speech dataset: "
                                         "imagefm speech prepare)")
            from imagefm.eval.speech import evaluate_speech

            model = imagefm.load(model_path).to(device or "cpu")
            results = evaluate_speech(model, data, split=split or "test", langs=langs,
                                      limit=limit, batch_size=batch_size)
            paths = write_report(results, out, title=f"Speech evaluation of {model_path.name}",
                                 meta={"model": str(model_path), "suite": suite,
                                       "data": str(data), "split": split or "test"})
            typer.echo(format_table(results))
            typer.echo(f"\nwrote {paths['markdown']} and {paths['json']}")
            return
        if suite == "synthetic":
            names = list(SUITES)
        elif suite in ("zeroshot", "retrieval"):
            names = []
            if data is None:
                raise typer.BadParameter(f"--suite {suite} needs --data DIR (shards)")
        else:
            names = [s.strip() for s in suite.split(",") if s.strip()]
            unknown = [s for s in names if s not in SUITES]
            if unknown or not names:
                raise typer.BadParameter(
                    f"unknown suite {', '.join(unknown) or suite!r}; choose synthetic, zeroshot, "
                    f"retrieval or among {', '.join(SUITES)}")

        model = imagefm.load(model_path, arch=arch)
        processor = imagefm.load_processor(model_path, **({"arch": arch} if arch else {}))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)

        if names:
            bad = [x for x in langs or [] if x not in LANGS]
            if bad:
                raise typer.BadParameter(f"synthetic suites have languages {LANGS}, got {bad}")
            results = run_suites(model, processor, names, langs or list(LANGS), n, seed,
                                 batch_size=batch_size)
        elif suite == "zeroshot":
            results = run_zeroshot_eval(model, processor, data, langs or ["en", "ko"], classes,
                                    split, limit, batch_size)
        else:
            results = _run_retrieval(model, processor, data, langs, split, limit, batch_size)

        meta = {"model": str(model_path), "suite": suite, "data": str(data) if data else None,
                "n": n if names else None, "seed": seed if names else None, "device": device}
        paths = write_report(results, out, title=f"Evaluation of {model_path.name}",
                             meta={k: v for k, v in meta.items() if v is not None})
        typer.echo(format_table(results))
        typer.echo(f"\nwrote {paths['markdown']} and {paths['json']}")
