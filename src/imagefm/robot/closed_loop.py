"""Closed-loop evaluation of a policy on the tabletop, and rollouts saved as GIFs.

The policy acts on its own observations until success or ``max_steps``; nothing of the expert
leaks in. Many episodes run side by side so the model sees one batch per step. Conditions:

* ``held_out_scenes``: scenes of training colour–shape pairs from seeds no demonstration used;
* ``held_out_combos``: the target is a colour–shape pair that never appeared in training;

each in English and Korean. The scripted expert on the same scenes is the ceiling, the
language-blind control (a VLA trained without instructions) the floor that vision alone gives.

Layer: eval (imports models and the data-level simulator; no training loop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagefm.checkpoint import atomic_write
from imagefm.models.vla import VLA
from imagefm.robot.expert import ActionSpace, expert_action
from imagefm.robot.instructions import LANGS, episode_instruction
from imagefm.robot.sim import Tabletop

EVAL_SEED = 1_000_000  # evaluation scenes start here; demonstrations use small seeds
CONDITIONS = {"held_out_scenes": "train", "held_out_combos": "held_out"}
# A policy maps observations [B, S, S, 3] uint8 and instructions to action tokens [B, D].
Policy = Callable[[np.ndarray, Sequence[str]], np.ndarray]


@dataclass
class EpisodeResult:
    seed: int
    condition: str
    lang: str
    instruction: str
    success: bool
    steps: int
    grasped_target: bool = False  # held the instruction's object at some step
    grasped_other: bool = False  # held another object at some step


class VLAPolicy:
    """A trained VLA as a policy: tokenises instructions, normalises images, greedy actions."""

    def __init__(self, model: VLA) -> None:
        if model.tokenizer is None and model.config.language:
            raise ValueError("this VLA has no tokenizer attached; load it with imagefm.load")
        self.model = model.eval()

    def __call__(self, images: np.ndarray, instructions: Sequence[str]) -> np.ndarray:
        model = self.model
        pixels = model.normalize(torch.from_numpy(np.array(images, dtype=np.uint8)))
        ids = mask = None
        if model.config.language:
            encoded = model.tokenizer(list(instructions))
            device = pixels.device
            ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        return model.predict(pixels, ids, mask).cpu().numpy()


def episode(seed: int, condition: str, lang: str, max_steps: int = 40
            ) -> tuple[Tabletop, str]:
    """The scene and instruction of evaluation episode ``seed`` (same for every policy)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {tuple(CONDITIONS)}, got {condition!r}")
    env = Tabletop.reset(seed, CONDITIONS[condition], max_steps=max_steps)
    return env, episode_instruction(env, lang, np.random.default_rng([seed, 2]))


def run_policy(policy: Policy, seeds: Sequence[int], condition: str, lang: str, *,
               image_size: int = 48, max_steps: int = 40, space: ActionSpace = ActionSpace(),
               record: int = 0) -> tuple[list[EpisodeResult], list[list[Image.Image]]]:
    """Run ``policy`` on the episodes ``seeds`` side by side; also returns frames (rendered at
    ``record`` pixels, 0 = none) of every episode for GIFs."""
    pairs = [episode(seed, condition, lang, max_steps) for seed in seeds]
    envs, texts = [env for env, _ in pairs], [text for _, text in pairs]
    frames: list[list[Image.Image]] = [[env.render(record)] if record else [] for env in envs]
    grasped = [[False, False] for _ in envs]  # (target, another object) held at some step
    while True:
        active = [i for i, env in enumerate(envs) if not env.done]
        if not active:
            break
        observations = np.stack([envs[i].observe(image_size) for i in active])
        tokens = policy(observations, [texts[i] for i in active])
        for i, row in zip(active, tokens, strict=True):
            envs[i].step(space.decode(row))
            _note_grasp(envs[i], grasped[i])
            if record:
                frames[i].append(envs[i].render(record))
    results = [EpisodeResult(seed, condition, lang, text, env.success, env.state.steps, *held)
               for seed, env, text, held in zip(seeds, envs, texts, grasped, strict=True)]
    return results, frames


def _note_grasp(env: Tabletop, grasped: list[bool]) -> None:
    held = env.state.held
    if held is not None:
        grasped[0 if held == env.state.target else 1] = True


def expert_results(seeds: Sequence[int], condition: str, lang: str,
                   max_steps: int = 40) -> list[EpisodeResult]:
    """The scripted expert on the same episodes (it reads the state, not the image)."""
    results = []
    for seed in seeds:
        env, text = episode(seed, condition, lang, max_steps)
        grasped = [False, False]
        while not env.done:
            env.step(expert_action(env))
            _note_grasp(env, grasped)
        results.append(EpisodeResult(seed, condition, lang, text, env.success, env.state.steps,
                                     *grasped))
    return results


def success_table(policies: dict[str, Policy | None], episodes: int, *,
                  conditions: Sequence[str] = tuple(CONDITIONS), langs: Sequence[str] = LANGS,
                  image_size: int = 48, max_steps: int = 40, seed: int = EVAL_SEED,
                  batch: int = 100) -> dict[str, Any]:
    """Success rate of each policy (``None`` = the scripted expert) per condition and
    language over ``episodes`` episodes each; the rate of episodes in which it picked up the
    instruction's object (``grasped_target``) and another object (``grasped_other``), which
    shows whether it follows the words even when it fails to finish; every episode's result."""
    seeds = list(range(seed, seed + episodes))
    table: dict[str, dict[str, float]] = {}
    grasps: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    for name, policy in policies.items():
        table[name] = {}
        for condition in conditions:
            for lang in langs:
                if policy is None:
                    results = expert_results(seeds, condition, lang, max_steps)
                else:
                    results = []
                    for start in range(0, len(seeds), batch):
                        results += run_policy(policy, seeds[start:start + batch], condition,
                                              lang, image_size=image_size,
                                              max_steps=max_steps)[0]
                key = f"{condition}/{lang}"
                table[name][key] = float(np.mean([r.success for r in results]))
                grasps.setdefault(f"{name}/grasped_target", {})[key] = float(
                    np.mean([r.grasped_target for r in results]))
                grasps.setdefault(f"{name}/grasped_other", {})[key] = float(
                    np.mean([r.grasped_other for r in results]))
                rows += [{"policy": name, **asdict(r)} for r in results]
    for rates in (*table.values(), *grasps.values()):
        rates["mean"] = float(np.mean(list(rates.values()))) if rates else 0.0
    return {"episodes": episodes, "max_steps": max_steps, "success": table, "grasps": grasps,
            "episodes_log": rows}


def save_gif(frames: Sequence[Image.Image], path: str | Path, *, frame_ms: int = 180) -> Path:
    """An animated GIF (atomically written), the last frame held a little longer."""
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * 5]

    def write(tmp: Path) -> None:
        first, *rest = [f.convert("P", palette=Image.ADAPTIVE, colors=64) for f in frames]
        first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=durations,
                   loop=0, optimize=True)

    return atomic_write(path, write)


def rollout_gif(policy: Policy, seed: int, condition: str, lang: str, path: str | Path, *,
                image_size: int = 48, size: int = 144, max_steps: int = 40) -> EpisodeResult:
    """Run one episode and save it as a GIF of ``size`` pixels; returns its result."""
    results, frames = run_policy(policy, [seed], condition, lang, image_size=image_size,
                                 max_steps=max_steps, record=size)
    save_gif(frames[0], path)
    return results[0]
