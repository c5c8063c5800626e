"""``imagefm quickstart``: the main job (synthetic data → tiny bilingual CLIP → report)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def quickstart(
        out: Path = typer.Option(Path("runs/quickstart"), help="Run folder (model, report)."),
        loss: str = typer.Option("clip", help="clip (softmax) or siglip (sigmoid)."),
        pool: str = typer.Option("cls", help="Image pooling: cls (a class token) or mean (no "
                                             "class token: a tower llama.cpp's VLM graph runs)."),
        steps: int = typer.Option(1000, min=1, help="Training steps (the time budget)."),
        batch_size: int = typer.Option(128, min=4, help="Scenes per step."),
        samples: int = typer.Option(20_000, min=64, help="Synthetic training scenes (at least "
                                                         "one batch: --batch-size)."),
        scenes: str = typer.Option("clean", help="Training scenes: clean (solid objects on plain "
                                                  "backgrounds) or varied (textures, noise, "
                                                  "jitter; needs far more steps)."),
        lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate."),
        device: str = typer.Option("cpu", help="cpu, cuda or auto (the step budget is "
                                               "calibrated for the CPU)."),
        eval_images: int = typer.Option(300, min=10, help="Images per suite and language."),
        seed: int = typer.Option(0, min=0),
        threads: int = typer.Option(0, min=0, help="torch threads (0: PyTorch's default)."),
        real_data: bool = typer.Option(True, help="Also evaluate on Tux Paint / emoji test "
                                                  "splits when they are installed."),
        progress: bool = typer.Option(True, help="Progress bars."),
    ) -> None:
        """Train and evaluate a tiny English+Korean CLIP on synthetic data, on the CPU, in minutes.

        Generates bilingual synthetic scenes, trains a tokenizer and the `tiny` preset, evaluates
        zero-shot colour/shape/held-out/count/relation accuracy and retrieval in English and
        Korean, saves the model and writes a Markdown report with plots.
        """
        from imagefm.apps.quickstart import QuickstartSettings, run_quickstart

        settings = QuickstartSettings(out=out, loss=loss, pool=pool, steps=steps,
                                      batch_size=batch_size, samples=samples, scenes=scenes,
                                      lr=lr, device=device,
                                      eval_images=eval_images, seed=seed,
                                      threads=threads or None, real_data=real_data,
                                      progress=progress)
        run_quickstart(settings, log=typer.echo)
