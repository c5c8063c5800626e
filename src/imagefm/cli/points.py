"""``imagefm points``: 3D point cloud–text models (ULIP style).

    imagefm points prepare data/shapes3d --count 1500        # synthetic shapes, en + ko captions
    imagefm points read /usr/share/assimp/models             # which 3D files read, which not
    imagefm points train configs/points3d_ulip.yaml          # point ↔ text + point ↔ image
    imagefm points eval runs/points3d/final --data data/shapes3d --plot plot.png
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from imagefm.checkpoint import atomic_write_text


def register(app: typer.Typer) -> None:
    points = typer.Typer(help="3D point cloud–text models: data, training, evaluation.",
                         no_args_is_help=True)
    app.add_typer(points, name="points")

    @points.command("prepare")
    def prepare(out: Path = typer.Argument(..., help="folder to write the set into"),
                count: int = typer.Option(1500, help="shapes to generate"),
                seed: int = typer.Option(0),
                image_size: int = typer.Option(96, help="side of the rendered pictures"),
                test_fraction: float = typer.Option(0.2, help="share of held-out shapes")
                ) -> None:
        """Write synthetic 3D shapes: meshes/*.ply, images/*.png, records.jsonl, meta.json."""
        from imagefm.data.synthetic.shapes3d import write_shapes3d

        meta = write_shapes3d(out, count, seed=seed, image_size=image_size,
                              test_fraction=test_fraction)
        typer.echo(f"wrote {meta['count']} shapes to {out} (train {meta['splits']['train']}, "
                   f"test {meta['splits']['test']})")

    @points.command("read")
    def read(paths: list[Path] = typer.Argument(..., help="3D files or folders"),
             num_points: int = typer.Option(1024)) -> None:
        """Read PLY/OBJ/STL/OFF files as point clouds; report what was read and skipped."""
        from imagefm.data.formats import SkipCounter
        from imagefm.data.pointcloud import iter_point_clouds, mesh_files

        skips = SkipCounter()
        files = [f for p in paths for f in mesh_files(p)]
        for path, cloud in iter_point_clouds(files, num_points, skips=skips):
            colour = "colours" if cloud.colours is not None else "no colours"
            typer.echo(f"{path}: {len(cloud.points)} points, {colour}")
        for reason, messages in skips.examples.items():
            for message in messages:
                typer.echo(f"skipped ({reason}): {message}", err=True)
        typer.echo(f"read {skips.seen - skips.total_skipped} of {skips.seen} files; skipped "
                   f"{skips.total_skipped}")

    @points.command("train")
    def train(config: Path = typer.Argument(..., help="training config (YAML/TOML)"),
              overrides: list[str] = typer.Argument(None, help="section.key=value overrides"),
              image_weight: float = typer.Option(None, help="weight of the point ↔ image loss "
                                                 "(0: point ↔ text only; default: the "
                                                 "config's task.image_weight)")) -> None:
        """Train with ULIP's triplet loss (point ↔ text + point ↔ rendered image): `imagefm
        train CONFIG task.name=ulip`, with evaluation as `imagefm train` does it."""
        from imagefm.eval.training import training_evaluators
        from imagefm.train.launch import train_from_args

        extra = [] if image_weight is None else [f"task.image_weight={image_weight}"]
        raise typer.Exit(train_from_args(str(config), ["task.name=ulip", *(overrides or []),
                                                       *extra],
                                         resume=False, evaluators=training_evaluators))

    @points.command("eval")
    def evaluate(model: str = typer.Argument(..., help="a point_clip checkpoint directory"),
                 data: Path = typer.Option(..., help="a set written by `imagefm points "
                                           "prepare`"),
                 out: Path = typer.Option(None, help="write the results here (JSON)"),
                 plot: Path = typer.Option(None, help="write the robustness plot here (PNG)"),
                 num_points: int = typer.Option(None, help="points per cloud (default: the "
                                                "model's)")) -> None:
        """Zero-shot 3D classification and point ↔ text retrieval (en, ko) on held-out
        shapes, with rotation and point-count robustness."""
        import imagefm
        from imagefm.eval.points import evaluate_points, plot_robustness

        results = evaluate_points(imagefm.load(model), data, num_points=num_points)
        for lang in ("en", "ko"):
            zs, rt = results["zero_shot"][lang], results["retrieval"][lang]
            typer.echo(f"{lang}: zero-shot top1 {zs['top1']:.3f} (chance {zs['chance']:.3f}); "
                       f"point→text R@1 {rt['image_to_text']['R@1']:.3f} R@5 "
                       f"{rt['image_to_text']['R@5']:.3f}; text→point R@1 "
                       f"{rt['text_to_image']['R@1']:.3f} R@5 {rt['text_to_image']['R@5']:.3f}")
            rd = results["retrieval_by_description"][lang]
            typer.echo(f"{lang}: same description counts: point→text R@1 "
                       f"{rd['image_to_text']['R@1']:.3f}; text→point R@1 "
                       f"{rd['text_to_image']['R@1']:.3f} R@5 {rd['text_to_image']['R@5']:.3f}")
        typer.echo("rotation: " + json.dumps(results["rotation"]))
        typer.echo("points: " + json.dumps(results["points"]))
        if "real" in results:
            typer.echo("real meshes: " + json.dumps({k: v for k, v in results["real"].items()
                                                     if k != "skipped"}, ensure_ascii=False))
        if out is not None:
            atomic_write_text(out, json.dumps(results, indent=2, ensure_ascii=False))
        if plot is not None:
            typer.echo(f"plot: {plot_robustness(results, plot)}")

    @points.command("compare")
    def compare(runs: list[str] = typer.Argument(..., help="NAME=results.json from `points "
                                                 "eval --out`"),
                plot: Path = typer.Option(..., help="write the comparison plot here (PNG)")
                ) -> None:
        """Plot the zero-shot accuracy of several evaluated runs side by side."""
        from imagefm.eval.points import plot_comparison

        named = {}
        for item in runs:
            name, sep, path = item.partition("=")
            if not sep:
                raise typer.BadParameter(f"{item!r} is not NAME=results.json")
            named[name] = json.loads(Path(path).read_text(encoding="utf-8"))
        typer.echo(f"plot: {plot_comparison(named, plot)}")
