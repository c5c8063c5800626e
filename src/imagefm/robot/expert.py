"""Discrete actions (per-dimension bins, as RT-2 / OpenVLA) and the scripted expert.

An action is three tokens: the bin of dx, the bin of dy (``MOVE_BINS`` evenly spaced values in
[-MAX_STEP, MAX_STEP], one of them exactly 0) and the gripper state (0 open, 1 closed). The
expert only ever takes bin-centre actions, so its demonstrations tokenise without loss.

The expert is a function of the state alone (no memory), so it can label any state a noisy
rollout reaches: demonstrations execute a perturbed action now and then but always record the
expert's action for the state seen, which teaches a policy how to recover from its own drift.

Layer: data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imagefm.robot.sim import MAX_STEP, Action, Tabletop

MOVE_BINS = 5  # bins of dx and of dy: -0.12, -0.06, 0, 0.06, 0.12
ACTION_BINS: tuple[int, ...] = (MOVE_BINS, MOVE_BINS, 2)  # dx, dy, grip
REACH = 0.035  # the expert grasps once its gripper is this close to the target's centre
RELEASE_MARGIN = 0.04  # ... and drops it once the centre is this far inside the zone


@dataclass(frozen=True)
class ActionSpace:
    """Continuous actions ↔ per-dimension bin indices."""

    move_bins: int = MOVE_BINS
    max_step: float = MAX_STEP

    @property
    def bins(self) -> tuple[int, ...]:
        return (self.move_bins, self.move_bins, 2)

    @property
    def values(self) -> np.ndarray:
        """The move of each dx/dy bin."""
        return np.linspace(-self.max_step, self.max_step, self.move_bins)

    def encode(self, action: Action) -> tuple[int, int, int]:
        """The nearest bin of each dimension."""
        step = 2 * self.max_step / (self.move_bins - 1)

        def to_bin(v: float) -> int:
            return int(np.clip(round((v + self.max_step) / step), 0, self.move_bins - 1))

        return (to_bin(action.dx), to_bin(action.dy), int(bool(action.grip)))

    def decode(self, tokens: tuple[int, ...] | list[int] | np.ndarray) -> Action:
        dx, dy, grip = (int(t) for t in tokens)
        for value, bins in ((dx, self.move_bins), (dy, self.move_bins), (grip, 2)):
            if not 0 <= value < bins:
                raise ValueError(f"action token {value} is outside 0..{bins - 1}")
        values = self.values
        return Action(float(values[dx]), float(values[dy]), bool(grip))


def _move_towards(space: ActionSpace, dx: float, dy: float, grip: bool) -> Action:
    """The bin-centre move that gets closest to (dx, dy) this step."""
    values = space.values
    return Action(float(values[space.encode(Action(dx, 0, False))[0]]),
                  float(values[space.encode(Action(dy, 0, False))[0]]), grip)


def expert_action(env: Tabletop, space: ActionSpace = ActionSpace()) -> Action:
    """What the scripted expert does in ``env``'s current state.

    Holding the target: carry it to the zone centre, open once it is well inside. Holding
    something else: open. Otherwise: go to the target (open), then close on it (opening first
    if the gripper is closed on nothing).
    """
    s = env.state
    target, zone = env.target, env.goal
    if s.held == s.target:
        if zone.contains(target.x, target.y, margin=RELEASE_MARGIN):
            return Action(0.0, 0.0, False)
        return _move_towards(space, zone.x - target.x, zone.y - target.y, True)
    if s.held is not None:
        return Action(0.0, 0.0, False)
    dx, dy = target.x - s.gripper[0], target.y - s.gripper[1]
    if max(abs(dx), abs(dy)) <= REACH:
        return Action(0.0, 0.0, not s.closed)
    return _move_towards(space, dx, dy, False)


def perturb(action: Action, rng: np.random.Generator, space: ActionSpace,
            noise: float) -> Action:
    """With probability ``noise`` a random move instead of ``action``'s (the grip kept)."""
    if rng.random() >= noise:
        return action
    values = space.values
    return Action(float(values[rng.integers(space.move_bins)]),
                  float(values[rng.integers(space.move_bins)]), action.grip)


def run_expert(env: Tabletop, space: ActionSpace = ActionSpace()) -> bool:
    """Roll the expert out until the episode ends; True on success."""
    while not env.done:
        env.step(expert_action(env, space))
    return env.success
