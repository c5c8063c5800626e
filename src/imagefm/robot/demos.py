"""Demonstrations: expert rollouts recorded as (image, instruction, action tokens) steps.

Each episode gets one instruction (language alternating en / ko, phrasing drawn per episode).
With ``noise`` > 0 the executed action is now and then a random move, while the recorded label
stays the expert's action for the state seen (DART-style noise injection): the policy then
learns to come back from states a perfect expert never visits. Only successful episodes are
kept, so every label sequence ends in the goal.

A demonstration set is one ``.npz`` (written atomically): ``images`` uint8 [N, S, S, 3],
``actions`` int64 [N, 3], ``episode`` int64 [N], ``instructions`` str [N], ``langs`` str [N],
``positions`` float32 [N, 3, 2]: the simulator's gripper, instruction's object and goal zone
centres at each step (free supervision for a model's pointer head; sets written before it
existed load without it).

Layer: data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagefm.checkpoint import atomic_write
from imagefm.robot.expert import ActionSpace, expert_action, perturb
from imagefm.robot.instructions import LANGS, episode_instruction
from imagefm.robot.sim import Tabletop


@dataclass
class Demonstrations:
    images: np.ndarray
    actions: np.ndarray
    episode: np.ndarray
    instructions: list[str]
    langs: list[str]
    positions: np.ndarray | None = None  # float32 [N, 3, 2], see the module docstring

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def episodes(self) -> int:
        return int(len(np.unique(self.episode)))

    def save(self, path: str | Path) -> Path:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, images=self.images, actions=self.actions,
                                    episode=self.episode,
                                    instructions=np.asarray(self.instructions),
                                    langs=np.asarray(self.langs),
                                    **({} if self.positions is None
                                       else {"positions": self.positions}))

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> Demonstrations:
        with np.load(path) as data:
            return cls(data["images"], data["actions"], data["episode"],
                       [str(t) for t in data["instructions"]], [str(t) for t in data["langs"]],
                       data["positions"] if "positions" in data.files else None)


def pointer_targets(env: Tabletop) -> np.ndarray:
    """The centres of the gripper, the instruction's object and the goal zone: [3, 2]."""
    s = env.state
    return np.asarray([s.gripper, (env.target.x, env.target.y), (env.goal.x, env.goal.y)],
                      np.float32)


def _stack(images: list, actions: list, episode_ids: list, texts: list, text_langs: list,
           positions: list, image_size: int) -> Demonstrations:
    size = (0, image_size, image_size, 3)
    return Demonstrations(np.stack(images) if images else np.zeros(size, np.uint8),
                          np.asarray(actions, np.int64).reshape(-1, 3),
                          np.asarray(episode_ids, np.int64), texts, text_langs,
                          np.asarray(positions, np.float32).reshape(-1, 3, 2))


def collect(episodes: int, *, seed: int = 0, split: str = "train", image_size: int = 48,
            noise: float = 0.2, space: ActionSpace = ActionSpace(),
            langs: tuple[str, ...] = LANGS) -> Demonstrations:
    """Roll out the expert on scenes ``seed .. seed + episodes - 1`` of ``split``.

    Seeds of training demos and of evaluation scenes must not overlap: evaluation uses seeds
    from ``imagefm.robot.closed_loop.EVAL_SEED`` up.
    """
    rng = np.random.default_rng([seed, 1])
    images, actions, episode_ids, texts, text_langs, positions = [], [], [], [], [], []
    for index in range(episodes):
        env = Tabletop.reset(seed + index, split)
        lang = langs[index % len(langs)]
        text = episode_instruction(env, lang, rng)
        frames, labels, where = [], [], []
        while not env.done:
            action = expert_action(env, space)
            frames.append(env.observe(image_size))
            labels.append(space.encode(action))
            where.append(pointer_targets(env))
            env.step(perturb(action, rng, space, noise))
        if not env.success:
            continue  # a rare stuck expert: its labels would never reach the goal
        images += frames
        actions += labels
        positions += where
        episode_ids += [index] * len(frames)
        texts += [text] * len(frames)
        text_langs += [lang] * len(frames)
    return _stack(images, actions, episode_ids, texts, text_langs, positions, image_size)


def collect_on_policy(policy: Callable[[np.ndarray, Sequence[str]], np.ndarray], episodes: int,
                      *, seed: int = 0, split: str = "train", image_size: int = 48,
                      expert_share: float = 0.0, space: ActionSpace = ActionSpace(),
                      langs: tuple[str, ...] = LANGS, batch: int = 100) -> Demonstrations:
    """DAgger (Ross et al. 2011): ``policy`` drives, the scripted expert labels every state it
    reaches. ``policy`` maps observations [B, S, S, 3] uint8 and instructions to action
    tokens [B, 3]; with probability ``expert_share`` a step executes the expert's action
    instead. Every episode is kept (failures too: their states are the ones to learn from).
    """
    rng = np.random.default_rng([seed, 3])
    images, actions, episode_ids, texts, text_langs, positions = [], [], [], [], [], []
    for start in range(0, episodes, batch):
        index = list(range(start, min(start + batch, episodes)))
        envs = [Tabletop.reset(seed + i, split) for i in index]
        lang = [langs[i % len(langs)] for i in index]
        text = [episode_instruction(env, lg, rng) for env, lg in zip(envs, lang, strict=True)]
        while active := [k for k, env in enumerate(envs) if not env.done]:
            frames = np.stack([envs[k].observe(image_size) for k in active])
            chosen = policy(frames, [text[k] for k in active])
            for k, frame, row in zip(active, frames, chosen, strict=True):
                label = expert_action(envs[k], space)
                images.append(frame)
                actions.append(space.encode(label))
                positions.append(pointer_targets(envs[k]))
                episode_ids.append(index[k])
                texts.append(text[k])
                text_langs.append(lang[k])
                own = rng.random() >= expert_share
                envs[k].step(space.decode(row) if own else label)
    return _stack(images, actions, episode_ids, texts, text_langs, positions, image_size)


def concatenate(*sets: Demonstrations) -> Demonstrations:
    """One demonstration set from several (episode ids offset so they stay distinct; positions
    kept only when every set has them)."""
    offset, episode_ids = 0, []
    for demo in sets:
        episode_ids.append(demo.episode + offset)
        offset += int(demo.episode.max()) + 1 if len(demo) else 0
    return Demonstrations(np.concatenate([d.images for d in sets]),
                          np.concatenate([d.actions for d in sets]),
                          np.concatenate(episode_ids),
                          [t for d in sets for t in d.instructions],
                          [lg for d in sets for lg in d.langs],
                          None if any(d.positions is None for d in sets)
                          else np.concatenate([d.positions for d in sets]))
