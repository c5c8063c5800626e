"""The tabletop simulator: physics invariants, the scripted expert, determinism, instructions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imagefm.data.synthetic.vocab import COLOURS
from imagefm.robot.demos import Demonstrations, collect, collect_on_policy, concatenate
from imagefm.robot.expert import ActionSpace, expert_action, run_expert
from imagefm.robot.instructions import all_instructions, instruction
from imagefm.robot.sim import (
    HELD_OUT_COMBOS,
    MAX_STEP,
    OBJECT_RADIUS,
    Action,
    Body,
    TableState,
    Tabletop,
    Zone,
    allowed_combos,
)


def _state(objects, gripper=(0.5, 0.5), zones=None, target=0) -> Tabletop:
    zones = zones or [Zone("blue", 0.2, 0.2), Zone("red", 0.8, 0.8)]
    return Tabletop(TableState([Body(*o) for o in objects], zones, target, 0, gripper))


def _snapshot(env: Tabletop) -> tuple:
    s = env.state
    return (tuple((o.shape, o.colour, o.x, o.y) for o in s.objects), tuple(s.zones), s.target,
            s.goal, s.gripper, s.closed, s.held)


def test_reset_is_deterministic_and_valid():
    for seed in range(30):
        env = Tabletop.reset(seed)
        assert _snapshot(env) == _snapshot(Tabletop.reset(seed))
        objects = env.state.objects
        assert env.min_gap() > 0
        for o in objects:
            assert OBJECT_RADIUS <= o.x <= 1 - OBJECT_RADIUS
            assert not any(z.contains(o.x, o.y) for z in env.state.zones)
            assert o.combo not in HELD_OUT_COMBOS
        assert len({o.combo for o in objects}) == len(objects)
        assert not env.success
    held_out = Tabletop.reset(3, "held_out")
    assert held_out.target.combo in HELD_OUT_COMBOS
    assert all(o.combo not in HELD_OUT_COMBOS for i, o in enumerate(held_out.state.objects)
               if i != held_out.state.target)
    assert _snapshot(Tabletop.reset(3, "train")) != _snapshot(held_out)
    assert len(allowed_combos("train")) == len(allowed_combos("all")) - len(HELD_OUT_COMBOS)


def test_gripper_moves_at_most_max_step_and_stays_on_the_table():
    env = _state([("circle", "red", 0.8, 0.2)], gripper=(0.5, 0.05))
    env.step(Action(1.0, -1.0, False))
    assert env.state.gripper == pytest.approx((0.5 + MAX_STEP, 0.0))
    assert env.state.steps == 1


def test_grasp_only_when_touching_and_only_when_closing():
    env = _state([("circle", "red", 0.5, 0.5 + OBJECT_RADIUS + 0.05)], gripper=(0.5, 0.5))
    env.step(Action(0.0, 0.0, True))  # closes next to the object, not over it
    assert env.state.closed and env.state.held is None
    env.step(Action(0.0, 0.12, True))  # a closed gripper sweeps over it without grasping
    assert env.state.held is None
    env.step(Action(0.0, 0.0, False))
    env.step(Action(0.0, 0.0, True))  # opening then closing over it grasps
    assert env.state.held == 0
    before = (env.state.objects[0].x, env.state.objects[0].y)
    env.step(Action(-0.06, 0.06, True))  # carried along with the gripper
    assert (env.state.objects[0].x, env.state.objects[0].y) == pytest.approx(
        (before[0] - 0.06, before[1] + 0.06))
    env.step(Action(0.06, 0.0, False))  # released: moves with the gripper this step, then stays
    assert env.state.held is None and not env.state.closed
    resting = (env.state.objects[0].x, env.state.objects[0].y)
    env.step(Action(0.12, 0.12, False))
    assert (env.state.objects[0].x, env.state.objects[0].y) == resting


def test_carried_object_pushes_others_without_overlap():
    r = OBJECT_RADIUS
    env = _state([("square", "red", 0.3, 0.5), ("circle", "green", 0.3 + 2 * r + 0.02, 0.5)],
                 gripper=(0.3, 0.5))
    env.step(Action(0.0, 0.0, True))
    for _ in range(2):
        env.step(Action(0.12, 0.0, True))
    pusher, pushed = env.state.objects
    assert pusher.x == pytest.approx(0.54)
    assert pushed.x == pytest.approx(0.54 + 2 * r, abs=1e-4)  # pushed along, just touching
    assert env.min_gap() >= -1e-6


def test_move_is_undone_when_a_pushed_object_is_stuck_in_a_corner():
    r = OBJECT_RADIUS
    env = _state([("square", "red", 1 - 3 * r, 1 - r), ("circle", "green", 1 - r, 1 - r)],
                 gripper=(1 - 3 * r, 1 - r))
    env.step(Action(0.0, 0.0, True))
    before = _snapshot(env)
    env.step(Action(0.12, 0.0, True))
    assert env.state.blocked == 1
    assert _snapshot(env)[0] == before[0] and env.state.gripper == before[4]


def test_physics_invariants_hold_under_random_actions():
    rng = np.random.default_rng(0)
    space = ActionSpace()
    for seed in range(8):
        env = Tabletop.reset(seed, max_steps=200)
        for _ in range(200):
            tokens = (rng.integers(space.move_bins), rng.integers(space.move_bins),
                      rng.integers(2))
            env.step(space.decode(tokens))
            assert env.min_gap() >= -1e-6
            for o in env.state.objects:
                assert OBJECT_RADIUS - 1e-9 <= o.x <= 1 - OBJECT_RADIUS + 1e-9
                assert OBJECT_RADIUS - 1e-9 <= o.y <= 1 - OBJECT_RADIUS + 1e-9
            if env.state.held is not None:
                held = env.state.objects[env.state.held]
                assert math.dist(env.state.gripper, (held.x, held.y)) <= OBJECT_RADIUS + 1e-6


def test_success_needs_the_target_released_inside_the_goal_zone():
    env = _state([("circle", "red", 0.45, 0.2)], gripper=(0.45, 0.2))
    env.step(Action(0.0, 0.0, True))
    env.step(Action(-0.12, 0.0, True))
    env.step(Action(-0.12, 0.0, True))
    assert env.goal.contains(env.target.x, env.target.y) and not env.success  # still held
    env.step(Action(0.0, 0.0, False))
    assert env.success and env.done


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_expert_succeeds_almost_always(split):
    results = [run_expert(Tabletop.reset(seed, split)) for seed in range(1000, 1100)]
    assert np.mean(results) >= 0.97


def test_expert_recovers_from_a_wrong_grasp():
    env = _state([("circle", "red", 0.5, 0.5), ("square", "green", 0.5, 0.75)],
                 gripper=(0.5, 0.75))
    env.step(Action(0.0, 0.0, True))
    assert env.state.held == 1
    assert expert_action(env) == Action(0.0, 0.0, False)  # drops the wrong object first
    assert run_expert(env)


def test_action_tokens_round_trip():
    space = ActionSpace()
    for dx in range(space.move_bins):
        for dy in range(space.move_bins):
            for grip in (0, 1):
                assert space.encode(space.decode((dx, dy, grip))) == (dx, dy, grip)
    assert space.encode(Action(0.5, -0.01, True)) == (space.move_bins - 1,
                                                       space.move_bins // 2, 1)
    with pytest.raises(ValueError, match="outside"):
        space.decode((space.move_bins, 0, 0))


def test_render_draws_objects_zones_and_gripper():
    env = _state([("circle", "red", 0.5, 0.5)], gripper=(0.9, 0.9))
    image = env.observe(48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert tuple(image[24, 24]) == COLOURS["red"].rgb
    assert tuple(image[int(0.2 * 48), int(0.2 * 48)]) != tuple(image[24, 4])  # zone vs table
    open_ring = env.observe(48)
    env.step(Action(0.0, 0.0, True))
    assert not np.array_equal(open_ring, env.observe(48))  # a closed gripper looks different


def test_demonstrations_are_deterministic_and_round_trip(tmp_path):
    first, second = collect(6, seed=5), collect(6, seed=5)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.actions, second.actions)
    assert first.instructions == second.instructions and set(first.langs) == {"en", "ko"}
    assert first.episodes >= 5 and len(first) == len(first.images)
    loaded = Demonstrations.load(first.save(tmp_path / "demos.npz"))
    assert np.array_equal(loaded.images, first.images) and loaded.langs == first.langs


def test_on_policy_collection_labels_the_policy_states_with_the_expert():
    def still(images, texts):  # a policy that never moves nor grips: the expert must say "go"
        return np.tile([2, 2, 0], (len(images), 1))

    on_policy = collect_on_policy(still, 3, seed=11, batch=2)
    assert len(on_policy) == 3 * 40 and on_policy.episodes == 3  # it never succeeds
    first = Tabletop.reset(11, "train")  # the scene never changes, so neither does the label
    expected = ActionSpace().encode(expert_action(first))
    assert (on_policy.actions[on_policy.episode == 0] == expected).all()
    assert np.array_equal(on_policy.images[0], first.observe(48))
    both = concatenate(collect(2, seed=0), on_policy)
    assert both.episodes == 2 + 3 and len(both) == len(on_policy) + len(collect(2, seed=0))


def test_instructions_in_english_and_korean():
    rng = np.random.default_rng(0)
    en = instruction("red", "circle", "blue", "en", rng)
    assert "red circle" in en and "blue" in en
    ko = {instruction("red", "cross", "blue", "ko", np.random.default_rng(i)) for i in range(30)}
    assert all(("십자가를" in t or "십자 모양을" in t) and ("파란" in t) for t in ko)
    assert any("원을" in t for t in all_instructions([("green", "circle")], ("red",)))
    assert any("세모를" in t for t in all_instructions([("green", "triangle")], ("red",)))
