"""``imagefm sweep CONFIG --param KEY=SPEC ... --trials N --metric NAME``: hyper-parameter search.

    imagefm sweep clip.yaml --param optim.lr=loguniform:1e-4:3e-3 \\
        --param data.batch_size=choice:64,128 --trials 20 --metric eval/zeroshot_top1 \\
        eval.every=200

Each trial trains ``<out>/trial-<n>/``; the study (SQLite by default) makes a rerun resume and
lets several machines share the search (``--storage``). See docs/training.md.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``sweep`` command to ``app``."""

    @app.command("sweep")
    def sweep(
        config: str | None = typer.Argument(
            None, help="Config file (.yaml/.yml/.toml); leave it out to start from the "
                       "defaults and give only overrides."),
        overrides: list[str] | None = typer.Argument(
            None, help="section.key=value overrides applied to every trial, e.g. "
                       "eval.every=100 model.preset=tiny"),
        param: list[str] = typer.Option(
            ..., "--param", "-p",
            help="A swept key: key=loguniform:LOW:HIGH | uniform:LOW:HIGH | "
                 "int:LOW:HIGH[:log] | choice:A,B,C (repeat for several)."),
        trials: int = typer.Option(20, "--trials", "-n",
                                   help="Finished trials the study should hold in the end "
                                        "(those of an earlier or parallel run count)."),
        metric: str = typer.Option("eval/loss", "--metric",
                                   help="The evaluation metric to optimise, e.g. eval/loss or "
                                        "eval/zeroshot_top1."),
        direction: str = typer.Option("auto", "--direction",
                                      help="maximize | minimize | auto (minimize names ending "
                                           "in 'loss')."),
        study: str = typer.Option("sweep", "--study", help="Study name in the storage."),
        storage: str | None = typer.Option(None, "--storage",
                                           help="Database URL of the study (default "
                                                "sqlite:///OUT/study.db)."),
        out: Path | None = typer.Option(None, "--out",
                                        help="Folder of the trials and the report (default "
                                             "<run.output_dir>/<run.name>-sweep)."),
        pruner: str = typer.Option("median", "--pruner", help="median | none."),
        prune_after: int = typer.Option(5, "--prune-after",
                                        help="Trials that must complete before any is pruned."),
        seed: int = typer.Option(0, "--seed", help="Seed of the TPE sampler."),
        value: str = typer.Option("last", "--value",
                                  help="A trial's value: its last evaluation (last) or its "
                                       "best (best)."),
        report_only: bool = typer.Option(False, "--report-only",
                                         help="Only rewrite the report from the study."),
    ) -> None:
        """Search hyper-parameters: one training run per trial, pruned on its evaluations,
        with a report (report.md, plots, best.yaml) at the end."""
        from imagefm.config import ConfigError

        try:
            from imagefm.apps import sweep as sweeps
        except ModuleNotFoundError as err:
            if err.name != "optuna":
                raise
            raise ConfigError("imagefm sweep needs optuna: pip install 'imagefm[sweep]'") from None
        overrides = list(overrides or [])
        if config is not None and "=" in config and not Path(config).is_file():
            overrides.insert(0, config)  # no file given: defaults plus overrides
            config = None
        if report_only:
            path = sweeps.rewrite_report(config, overrides, study=study, storage=storage,
                                         out=out)
            typer.echo(f"report: {path}")
            return
        from imagefm.eval.training import training_evaluators

        sweeps.run_sweep(config, param, trials=trials, metric=metric, direction=direction,
                         overrides=overrides, study=study, storage=storage, out=out,
                         pruner=pruner, prune_after=prune_after, seed=seed, value=value,
                         evaluators=training_evaluators, echo=typer.echo)
