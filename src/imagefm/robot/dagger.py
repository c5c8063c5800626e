"""DAgger (Ross et al. 2011) rounds for a trained VLA: the policy drives, the scripted expert
labels every state it reaches, the grown data set trains the policy further.

    demos ─► train_vla ─► policy ─► collect_on_policy (expert labels) ─► concatenate
                             ▲                                                 │
                             └──── train_vla (init = policy, all data) ◄───────┘  (× rounds)

Expert demonstrations (even with DART noise) rarely show the states a learned policy drifts
into: a slightly wrong grasp, a carried object pushed against another. Labelling the policy's
own states fixes exactly those. Episodes use training scenes from seeds ``DAGGER_SEED`` up,
clear of the expert demonstrations' small seeds and of the evaluation seeds.

Layer: eval/app level (drives a trained model closed loop and calls the training loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagefm.models.vla import VLA
from imagefm.robot.closed_loop import EVAL_SEED, VLAPolicy
from imagefm.robot.demos import Demonstrations, collect_on_policy, concatenate
from imagefm.robot.training import train_vla

DAGGER_SEED = 500_000  # on-policy episodes: training scenes, seeds below EVAL_SEED


@dataclass
class DaggerRound:
    round: int
    episodes: int
    new_steps: int  # states the policy visited (all labelled by the expert)
    total_steps: int  # size of the aggregated data set after the round
    policy_success: float  # success of the policy that drove this round's episodes
    folder: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def dagger(model: VLA, demos: Demonstrations, run_dir: str | Path, *, rounds: int,
           episodes: int, steps: int, batch_size: int = 32, lr: float = 1e-3,
           expert_share: float = 0.0, seed: int = 0, progress: bool = True
           ) -> tuple[VLA, Demonstrations, list[DaggerRound]]:
    """``rounds`` rounds of: ``episodes`` on-policy episodes labelled by the expert, then
    ``steps`` optimizer steps on all data so far, starting from the current weights (run
    folders ``run_dir/dagger{r}``). Returns the last model, the aggregated data, a log."""
    if DAGGER_SEED + (rounds + 1) * episodes > EVAL_SEED:
        raise ValueError(f"{rounds} rounds of {episodes} episodes would reach the evaluation "
                         f"seeds ({EVAL_SEED}); use fewer")
    image_size = model.config.vision.image_size
    log: list[DaggerRound] = []
    for r in range(1, rounds + 1):
        fresh = collect_on_policy(VLAPolicy(model.eval()), episodes,
                                  seed=DAGGER_SEED + r * episodes, image_size=image_size,
                                  expert_share=expert_share)
        success = _episode_success(fresh)
        demos = concatenate(demos, fresh)
        model, folder = train_vla(demos, Path(run_dir) / f"dagger{r}", steps=steps,
                                  batch_size=batch_size, lr=lr, seed=seed + r,
                                  progress=progress, init=model, warmup=min(50, steps))
        log.append(DaggerRound(r, episodes, len(fresh), len(demos), success, str(folder)))
    return model, demos, log


def _episode_success(demos: Demonstrations) -> float:
    """Share of on-policy episodes whose last recorded state was followed by success: an
    episode that succeeded stops before its 40th step (the simulator ends it at the goal; one
    that succeeds at the very last step counts as a failure here)."""
    _, lengths = np.unique(demos.episode, return_counts=True)
    return float(np.mean(lengths < 40)) if len(lengths) else 0.0
