"""The VLA's pointer head: simulator-state targets, the pointer loss, the model, DAgger."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import imagefm
from imagefm.cli import vla as vla_cli
from imagefm.models.vla_pointers import PointerHead, pointer_loss
from imagefm.robot.closed_loop import VLAPolicy
from imagefm.robot.dagger import dagger
from imagefm.robot.demos import Demonstrations, collect, concatenate, pointer_targets
from imagefm.robot.expert import ActionSpace, expert_action, perturb
from imagefm.robot.instructions import all_instructions, episode_instruction
from imagefm.robot.sim import ZONE_COLOURS, Tabletop, allowed_combos
from imagefm.robot.training import DemoBatches, VLATask, build_vla, instruction_tokenizer
from imagefm.train.trainer import seed_everything

TINY = {"width": 32, "vision_layers": 1, "lm_layers": 1, "image_summary": "pointers",
        "pointer_channels": 16}


@pytest.fixture(scope="module")
def tokenizer():
    return instruction_tokenizer()


@pytest.fixture(scope="module")
def demos():
    return collect(8, seed=0, image_size=32)


def test_recorded_positions_are_the_simulator_state(tmp_path, demos):
    # Replay episode 0 exactly as collect does (same generator draws) and compare every step.
    rng = np.random.default_rng([0, 1])
    env = Tabletop.reset(0, "train")
    episode_instruction(env, "en", rng)
    expected = []
    while not env.done:
        action = expert_action(env)
        s = env.state
        expected.append([s.gripper, (env.target.x, env.target.y), (env.goal.x, env.goal.y)])
        env.step(perturb(action, rng, ActionSpace(), 0.2))
    got = demos.positions[demos.episode == 0]
    assert demos.positions.shape == (len(demos), 3, 2) and demos.positions.dtype == np.float32
    assert np.allclose(got, np.asarray(expected, np.float32))
    assert np.allclose(pointer_targets(env)[0], env.state.gripper)
    loaded = Demonstrations.load(demos.save(tmp_path / "d.npz"))
    assert np.array_equal(loaded.positions, demos.positions)
    joined = concatenate(demos, loaded)
    assert np.array_equal(joined.positions[len(demos):], demos.positions)
    old = Demonstrations(demos.images, demos.actions, demos.episode, demos.instructions,
                         demos.langs)  # a set written before positions existed
    assert concatenate(demos, old).positions is None
    assert Demonstrations.load(old.save(tmp_path / "old.npz")).positions is None


def test_pointer_loss_is_lowest_at_the_true_position():
    grid = (8, 8)
    cells = (torch.arange(64) % 8 + 0.5) / 8, (torch.arange(64) // 8 + 0.5) / 8
    truth = torch.tensor([[[0.31, 0.69]]])

    def peaked_at(x: float, y: float) -> torch.Tensor:  # as wide as the target Gaussian
        return (-((cells[0] - x) ** 2 + (cells[1] - y) ** 2) * 89).reshape(1, 1, 64)

    at_truth = pointer_loss(peaked_at(0.31, 0.69), grid, truth)
    assert at_truth < pointer_loss(peaked_at(0.44, 0.69), grid, truth)
    assert at_truth < pointer_loss(peaked_at(0.31, 0.2), grid, truth)
    assert at_truth < pointer_loss(torch.zeros(1, 1, 64), grid, truth)  # flat heat map


def test_pointer_head_soft_argmax_finds_the_peak():
    torch.manual_seed(0)
    head = PointerHead(3, 4, 8)
    with torch.no_grad():  # features = channel 0 copies the red input at stride 2
        for conv in head.convs[::2]:
            conv.weight.zero_()
            conv.bias.zero_()
        head.convs[0].weight[0, 0, 1, 1] = 1.0
        for conv in head.convs[2::2]:
            conv.weight[0, 0, 1, 1] = 1.0
        head.gripper_query.copy_(torch.tensor([200.0, 0, 0, 0]))
    image = torch.zeros(1, 3, 16, 16)
    image[0, 0, 10:12, 4:6] = 1.0  # a 2x2 spot: the stride-2 cell (row 5, column 2)
    out = head(image, None)
    assert out["scores"].shape == (1, 3, 64) and out["tokens"].shape == (1, 3, 8)
    assert torch.allclose(out["positions"][0, 0], torch.tensor([2.5 / 8, 5.5 / 8]), atol=1e-3)


def test_pointer_model_loss_prediction_and_round_trip(tmp_path, tokenizer, demos):
    torch.manual_seed(1)
    model = build_vla(tokenizer, 32, **TINY).eval()
    batch = next(iter(DemoBatches.build(demos, tokenizer, 8)(0)))
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    out = model(*args, actions=batch["actions"], positions=batch["positions"])
    assert out.positions.shape == (8, 3, 2) and out.pointer_loss > 0
    assert out.loss.item() == pytest.approx(out.action_loss.item() + out.pointer_loss.item(),
                                            rel=1e-5)
    without = model(*args, actions=batch["actions"])
    assert without.pointer_loss is None and without.loss.item() == pytest.approx(
        out.action_loss.item(), rel=1e-5)
    greedy = model.predict(*args)
    assert torch.equal(model(*args, actions=greedy).logits.argmax(-1), greedy)
    model.save_pretrained(tmp_path / "p")
    loaded = imagefm.load(tmp_path / "p")
    assert loaded.config == model.config and torch.equal(loaded.predict(*args), greedy)
    # The instruction steers where the object pointer looks; the blind control ignores it.
    other = tokenizer(["put the purple cross in the green zone"] * 8)
    for language in (True, False):
        torch.manual_seed(2)
        m = build_vla(tokenizer, 32, language=language, **TINY).eval()
        a = m(*args, actions=batch["actions"]).positions[:, 1]
        b = m(batch["pixel_values"], other["input_ids"], other["attention_mask"],
              actions=batch["actions"]).positions[:, 1]
        assert torch.allclose(a, b) != language


def test_pointer_loss_falls_and_pointers_approach_the_truth(tokenizer, demos):
    seed_everything(0)
    model = build_vla(tokenizer, 32, **TINY)
    batch = next(iter(DemoBatches.build(demos, tokenizer, 8)(0)))
    task = VLATask()
    _, before = task.loss(model, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, after = task.loss(model, batch)
    assert after["pointer_loss"] < before["pointer_loss"] - 0.3, (before, after)
    assert after["err_gripper"] < 0.6 * before["err_gripper"], (before, after)


def test_dagger_round_labels_policy_states_and_trains(tmp_path, tokenizer, demos):
    seed_everything(0)
    model = build_vla(tokenizer, 32, **TINY)
    final, data, log = dagger(model, demos, tmp_path, rounds=1, episodes=2, steps=2,
                              batch_size=8, progress=False)
    assert len(log) == 1 and log[0].total_steps == len(data) == len(demos) + log[0].new_steps
    assert log[0].new_steps >= 2 and data.positions.shape == (len(data), 3, 2)
    fresh = data.actions[len(demos):]  # every visited state carries the expert's label
    assert fresh.shape == (log[0].new_steps, 3) and (fresh[:, :2] < 5).all()
    assert (tmp_path / "dagger1" / "final" / "imagefm.json").is_file()
    assert final.config == model.config and isinstance(VLAPolicy(final), VLAPolicy)
    changed = any(not torch.equal(a, b) for a, b in
                  zip(final.state_dict().values(), model.state_dict().values(), strict=True))
    assert changed
    with pytest.raises(ValueError, match="evaluation"):
        dagger(model, demos, tmp_path / "x", rounds=1, episodes=400_000, steps=1)


def test_cli_trains_a_pointer_vla_with_a_dagger_round(tmp_path):
    app = typer.Typer()
    vla_cli.register(app)
    app.command("noop")(lambda: None)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "vla", "train", "--out", str(run), "--episodes", "3", "--steps", "2", "--batch-size",
        "8", "--width", "32", "--layers", "1", "--image-size", "32", "--dagger-rounds", "1",
        "--dagger-episodes", "2", "--dagger-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "DAgger round 1" in result.output
    model = imagefm.load(run / "dagger1" / "final")
    assert model.config.image_summary == "pointers" and model.pointers is not None


def test_no_instruction_is_cut_by_the_tokenizer(tokenizer):
    # The first two attempts' 400-token BPE cut English instructions before the zone's colour.
    combos = allowed_combos("all")
    for text in all_instructions(combos, ZONE_COLOURS):
        ids = tokenizer.encode(text)
        assert ids[-1] == tokenizer.eos_id and len(ids) <= tokenizer.context_length, text
        assert tokenizer.decode(ids).strip().endswith(text.split()[-1])
    with pytest.raises(ValueError, match="cut"):
        instruction_tokenizer(vocab_size=400)
