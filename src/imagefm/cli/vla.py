"""``imagefm vla train|eval|rollout``: a vision-language-action model on the 2-D tabletop."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from imagefm.checkpoint import atomic_write_text

CONDITION_HELP = "held_out_scenes (new scenes, training pairs) or held_out_combos (the target " \
                 "is a colour–shape pair never seen in training)."


def _load_vla(path: Path):
    from imagefm.loading import load
    from imagefm.models.vla import VLA

    model = load(path)
    if not isinstance(model, VLA):
        raise typer.BadParameter(f"{path} holds a {type(model).__name__}, not a VLA "
                                 f"(train one with `imagefm vla train`)")
    return model


def _table(success: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(success.values())))
    lines = ["| policy | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, row in success.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    vla = typer.Typer(help="Vision-language-action model on a simulated tabletop (issue 20): "
                           "demonstrations, training, closed-loop evaluation, GIF rollouts.",
                      no_args_is_help=True)

    @vla.command("train")
    def train(
        out: Path = typer.Option(..., "--out", help="Run folder; the model lands in OUT/final."),
        episodes: int = typer.Option(600, min=1, help="Expert demonstration episodes."),
        steps: int = typer.Option(2000, min=1, help="Optimizer steps."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        lr: float = typer.Option(2e-3, min=0.0),
        image_size: int = typer.Option(48, "--image-size", min=16, help="Observation side (px)."),
        width: int = typer.Option(64, min=32, help="Width of the ViT and the decoder."),
        layers: int = typer.Option(2, min=1, help="Blocks of the ViT and of the decoder each."),
        noise: float = typer.Option(0.2, min=0.0, max=1.0, help="Probability of a random move "
                                    "in demonstrations (the label stays the expert's)."),
        blind: bool = typer.Option(False, help="Train the language-blind control (no "
                                   "instruction input)."),
        image_summary: str = typer.Option("pointers", "--image-summary", help="pointers "
                                          "(point at the gripper, the instruction's object "
                                          "and zone; supervised by the simulator's state), "
                                          "keypoints (soft-argmax keypoint tokens), max (the "
                                          "max over the ViT tokens) or none."),
        pointer_weight: float = typer.Option(1.0, "--pointer-weight", min=0.0,
                                             help="Weight of the pointer loss (0: the "
                                             "pointers learn from the action loss alone)."),
        dagger_rounds: int = typer.Option(0, "--dagger-rounds", min=0, help="DAgger rounds "
                                          "after training (the policy drives, the expert "
                                          "labels); the model lands in OUT/daggerR/final."),
        dagger_episodes: int = typer.Option(400, "--dagger-episodes", min=1,
                                            help="On-policy episodes per DAgger round."),
        dagger_steps: int = typer.Option(1000, "--dagger-steps", min=1,
                                         help="Optimizer steps per DAgger round."),
        dagger_lr: float = typer.Option(None, "--dagger-lr", min=0.0,
                                        help="Peak learning rate of DAgger rounds (default: "
                                        "--lr)."),
        demos: Path = typer.Option(None, help="Reuse a demonstrations .npz instead of "
                                   "collecting (OUT/demos.npz is written otherwise)."),
        seed: int = typer.Option(0, min=0),
        resume: bool = typer.Option(False, help="Continue the run in OUT."),
    ) -> None:
        """Collect expert demonstrations and train a VLA with the project's Trainer."""
        from imagefm.robot.dagger import dagger
        from imagefm.robot.demos import Demonstrations, collect
        from imagefm.robot.training import demo_statistics, train_vla

        if demos is None and resume and (out / "demos.npz").is_file():
            demos = out / "demos.npz"
        if demos is not None:
            data = Demonstrations.load(demos)
        else:
            data = collect(episodes, seed=seed, image_size=image_size, noise=noise)
            data.save(out / "demos.npz")
        typer.echo(f"demonstrations: {json.dumps(demo_statistics(data), ensure_ascii=False)}")
        if resume:
            typer.echo("resuming from the newest checkpoint in the run folder")
        model, folder = train_vla(data, out, steps=steps, batch_size=batch_size, lr=lr,
                                  language=not blind, seed=seed, width=width,
                                  vision_layers=layers, lm_layers=layers, resume=resume,
                                  image_summary=image_summary, pointer_weight=pointer_weight)
        typer.echo(f"trained a {'language-blind ' if blind else ''}VLA "
                   f"({model.num_parameters:,} parameters): {folder / 'final'}")
        if dagger_rounds:
            model, data, log = dagger(model, data, out, rounds=dagger_rounds,
                                      episodes=dagger_episodes, steps=dagger_steps,
                                      batch_size=batch_size,
                                      lr=lr if dagger_lr is None else dagger_lr, seed=seed)
            for entry in log:
                typer.echo(f"DAgger round {entry.round}: the policy succeeded in "
                           f"{entry.policy_success:.2f} of {entry.episodes} episodes; "
                           f"+{entry.new_steps} labelled states -> {entry.total_steps}; "
                           f"model: {entry.folder}/final")

    @vla.command("eval")
    def evaluate(
        model: Path = typer.Option(..., "--model", help="A trained VLA (RUN/final)."),
        blind: Path = typer.Option(None, help="The language-blind control to compare with."),
        episodes: int = typer.Option(100, min=1, help="Episodes per condition and language."),
        expert: bool = typer.Option(True, help="Also run the scripted expert."),
        max_steps: int = typer.Option(40, "--max-steps", min=1),
        out: Path = typer.Option(None, help="Write the results (and every episode) as JSON."),
    ) -> None:
        """Closed-loop success rates on held-out scenes and held-out combinations, en and ko."""
        from imagefm.robot.closed_loop import VLAPolicy, success_table

        vla_model = _load_vla(model)
        policies = {"vla": VLAPolicy(vla_model)}
        if blind is not None:
            policies["blind"] = VLAPolicy(_load_vla(blind))
        if expert:
            policies["expert"] = None
        results = success_table(policies, episodes, max_steps=max_steps,
                                image_size=vla_model.config.vision.image_size)
        typer.echo("success rate\n" + _table(results["success"]))
        typer.echo("episodes that picked up the instruction's object / another object\n"
                   + _table(results["grasps"]))
        if out is not None:
            atomic_write_text(out, json.dumps(results, indent=1, ensure_ascii=False))
            typer.echo(f"wrote {out}")

    @vla.command("rollout")
    def rollout(
        out: Path = typer.Option(..., "--out", help="The GIF to write."),
        model: Path = typer.Option(None, "--model", help="A trained VLA (RUN/final); "
                                   "without it the scripted expert acts."),
        seed: int = typer.Option(1_000_000, help="Episode seed (evaluation seeds start at "
                                 "1000000)."),
        condition: str = typer.Option("held_out_scenes", help=CONDITION_HELP),
        lang: str = typer.Option("en", help="Instruction language: en or ko."),
        size: int = typer.Option(144, min=32, help="GIF side in pixels."),
        max_steps: int = typer.Option(40, "--max-steps", min=1),
    ) -> None:
        """Run one episode and save it as an animated GIF."""
        from imagefm.robot.closed_loop import (
            CONDITIONS,
            VLAPolicy,
            episode,
            rollout_gif,
            save_gif,
        )
        from imagefm.robot.expert import ActionSpace, expert_action

        if condition not in CONDITIONS or lang not in ("en", "ko"):
            raise typer.BadParameter(f"--condition must be one of {tuple(CONDITIONS)} and "
                                     f"--lang en or ko")
        if model is None:
            env, text = episode(seed, condition, lang, max_steps)
            frames = [env.render(size)]
            while not env.done:
                env.step(expert_action(env, ActionSpace()))
                frames.append(env.render(size))
            save_gif(frames, out)
            success, steps = env.success, env.state.steps
        else:
            vla_model = _load_vla(model)
            result = rollout_gif(VLAPolicy(vla_model), seed, condition, lang, out,
                                 image_size=vla_model.config.vision.image_size, size=size,
                                 max_steps=max_steps)
            text, success, steps = result.instruction, result.success, result.steps
        typer.echo(f"{text!r}: {'success' if success else 'failure'} in {steps} steps -> {out}")

    app.add_typer(vla, name="vla")
