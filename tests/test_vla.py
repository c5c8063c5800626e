"""The vision-language-action model: shapes, losses, decoding, saving, training, rollouts, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

import imagefm
from imagefm.cli import vla as vla_cli
from imagefm.config import ConfigError
from imagefm.models.vla import VLA, SpatialKeypoints, VLAConfig, vla_config
from imagefm.robot.closed_loop import VLAPolicy, rollout_gif, run_policy, success_table
from imagefm.robot.demos import collect
from imagefm.robot.expert import ACTION_BINS
from imagefm.robot.training import (
    DemoBatches,
    VLATask,
    build_vla,
    instruction_tokenizer,
    train_vla,
)
from imagefm.train.trainer import seed_everything

TINY = {"width": 32, "vision_layers": 1, "lm_layers": 1}


@pytest.fixture(scope="module")
def tokenizer():
    return instruction_tokenizer()


@pytest.fixture(scope="module")
def demos():
    return collect(6, seed=0, image_size=32)


def _batch(model: VLA, demos, tokenizer, rows: int = 8) -> dict:
    batches = DemoBatches.build(demos, tokenizer, rows)
    return next(iter(batches(0)))


def _mean_loss(model: VLA, batches: DemoBatches) -> float:
    with torch.no_grad():
        losses = [model(b["pixel_values"], b["input_ids"], b["attention_mask"],
                        b["actions"]).loss.item() for b in batches(0)]
    return float(np.mean(losses))


def test_shapes_loss_and_per_dimension_logits(tokenizer, demos):
    torch.manual_seed(0)
    model = build_vla(tokenizer, 32, **TINY)
    batch = _batch(model, demos, tokenizer)
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                batch["actions"])
    dims, widest = len(ACTION_BINS), max(ACTION_BINS)
    assert out.logits.shape == (8, dims, widest)
    assert torch.isinf(out.logits[:, 2, 2:]).all() and torch.isfinite(out.logits[:, :2]).all()
    # A fresh model is close to uniform over each dimension's bins.
    uniform = float(np.mean([math.log(b) for b in ACTION_BINS]))
    assert out.loss.item() == pytest.approx(uniform, abs=0.15)
    reference = torch.nn.functional.cross_entropy(out.logits.reshape(-1, widest),
                                                  batch["actions"].reshape(-1))
    assert out.loss.item() == pytest.approx(reference.item())
    loss, metrics = VLATask().loss(model, batch)
    assert set(metrics) == {"acc_dx", "acc_dy", "acc_grip"} and loss.item() == out.loss.item()
    config = model.config
    assert config.lm.vocab_size == tokenizer.vocab_size + 1 + sum(ACTION_BINS)
    assert config.action_offsets[0] == config.start_token_id + 1


def test_greedy_prediction_agrees_with_teacher_forcing(tokenizer, demos):
    torch.manual_seed(1)
    model = build_vla(tokenizer, 32, **TINY).eval()
    batch = _batch(model, demos, tokenizer)
    predicted = model.predict(batch["pixel_values"], batch["input_ids"],
                              batch["attention_mask"])
    assert predicted.shape == (8, 3)
    assert (predicted < torch.tensor(ACTION_BINS)).all() and (predicted >= 0).all()
    forced = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                   predicted)
    assert torch.equal(forced.logits.argmax(-1), predicted)  # the KV-cached loop is exact


def test_language_changes_the_output_unless_blind(tokenizer, demos):
    batch = _batch(None, demos, tokenizer)
    other = tokenizer(["put the purple star in the green zone"] * 8)
    for language in (True, False):
        torch.manual_seed(2)
        model = build_vla(tokenizer, 32, language=language, **TINY).eval()
        a = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                  batch["actions"]).logits
        b = model(batch["pixel_values"], other["input_ids"], other["attention_mask"],
                  batch["actions"]).logits
        assert torch.allclose(a, b) != language


def test_config_is_checked_and_round_trips(tokenizer):
    config = vla_config(tokenizer.vocab_size, image_size=32, **TINY)
    assert VLAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="vocab_size"):
        VLAConfig(config.vision, config.lm.replace(vocab_size=10), config.text_vocab_size)
    with pytest.raises(ConfigError, match="context_length"):
        VLAConfig(config.vision, config.lm.replace(context_length=8), config.text_vocab_size)


def test_save_and_load_through_imagefm_load(tmp_path, tokenizer, demos):
    torch.manual_seed(3)
    model = build_vla(tokenizer, 32, **TINY).eval()
    model.save_pretrained(tmp_path / "vla")
    loaded = imagefm.load(tmp_path / "vla")
    assert isinstance(loaded, VLA) and loaded.config == model.config
    batch = _batch(model, demos, tokenizer)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert torch.equal(loaded.predict(*args), model.predict(*args))
    assert loaded.tokenizer.encode("put the red circle in the blue zone") == \
        tokenizer.encode("put the red circle in the blue zone")
    processor = imagefm.load_processor(tmp_path / "vla")  # the card: 32 px, (x - 0.5) / 0.5
    pixels = processor([Image.fromarray(demos.images[0])])["pixel_values"]
    expected = model.normalize(torch.from_numpy(demos.images[:1]))
    assert torch.allclose(pixels, expected, atol=1e-5)


def test_spatial_keypoints_find_a_bright_spot():
    torch.manual_seed(0)
    keypoints = SpatialKeypoints(3, 4, 2, 8)
    with torch.no_grad():  # channel 0 = red minus the rest, channel 1 = minus everything
        for conv in keypoints.convs[::2]:
            conv.weight.zero_()
            conv.bias.zero_()
        keypoints.convs[0].weight[0, 0, 1, 1] = 1.0
        keypoints.convs[2].weight[0, 0, 1, 1] = 1.0
        keypoints.convs[4].weight[0, 0] = 100.0
        keypoints.proj.weight.copy_(torch.eye(8, 3))
        keypoints.proj.bias.zero_()
        keypoints.channel.zero_()
    image = torch.zeros(1, 3, 17, 17)
    image[0, 0, 12, 4] = 5.0  # row 12, column 4 → x = -0.5, y = 0.5 on the [-1, 1] grid
    tokens = keypoints(image)
    assert tokens.shape == (1, 2, 8)
    assert torch.allclose(tokens[0, 0, :2], torch.tensor([-0.5, 0.5]), atol=1e-3)
    assert torch.allclose(tokens[0, 1, :2], torch.zeros(2), atol=1e-3)  # flat: the centre


def test_keypoint_summary_adds_tokens_and_round_trips(tmp_path, tokenizer, demos):
    torch.manual_seed(4)
    model = build_vla(tokenizer, 32, image_summary="keypoints", keypoints=5, **TINY).eval()
    plain = vla_config(tokenizer.vocab_size, image_size=32, **TINY)
    assert model.config.image_positions == plain.image_positions + 5
    assert model.config.lm.context_length == plain.lm.context_length + 5
    batch = _batch(model, demos, tokenizer)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    model.save_pretrained(tmp_path / "kp")
    loaded = imagefm.load(tmp_path / "kp")
    assert torch.equal(loaded.predict(*args), model.predict(*args))
    greedy = model.predict(*args)  # teacher-forced on its own choices, it agrees with them
    assert torch.equal(model(*args, actions=greedy).logits.argmax(-1), greedy)
    with pytest.raises(ConfigError, match="image_summary"):
        vla_config(tokenizer.vocab_size, image_size=32, image_summary="mean", **TINY)


def test_tiny_training_run_lowers_the_loss(tmp_path, tokenizer, demos):
    batches = DemoBatches.build(demos, tokenizer, 16)
    model, folder = train_vla(demos, tmp_path / "run", steps=25, batch_size=8, lr=3e-3,
                              progress=False, tokenizer=tokenizer, **TINY)
    seed_everything(0)  # as train_vla does before building: the same initial weights
    fresh = build_vla(tokenizer, 32, **TINY).eval()
    before, after = _mean_loss(fresh, batches), _mean_loss(model, batches)
    assert after < before - 0.1, (before, after)
    assert (folder / "final" / "imagefm.json").is_file()
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert logged and all("acc_grip" in row for row in logged if "loss" in row)


def test_closed_loop_rollout_and_gif(tmp_path, tokenizer):
    torch.manual_seed(4)
    policy = VLAPolicy(build_vla(tokenizer, 32, **TINY))
    results, frames = run_policy(policy, [1_000_000, 1_000_001], "held_out_combos", "ko",
                                 image_size=32, max_steps=6, record=40)
    assert [r.seed for r in results] == [1_000_000, 1_000_001]
    assert all(len(f) == r.steps + 1 for f, r in zip(frames, results, strict=True))
    assert all("을" in r.instruction or "를" in r.instruction for r in results)
    result = rollout_gif(policy, 1_000_000, "held_out_scenes", "en", tmp_path / "r.gif",
                         image_size=32, size=40, max_steps=5)
    with Image.open(tmp_path / "r.gif") as gif:
        assert gif.n_frames == result.steps + 1 and gif.size == (40, 40)
    table = success_table({"vla": policy, "expert": None}, 2, langs=("en",), image_size=32,
                          max_steps=40)
    assert table["success"]["expert"]["held_out_scenes/en"] == 1.0
    assert table["grasps"]["expert/grasped_target"]["held_out_scenes/en"] == 1.0
    assert table["grasps"]["expert/grasped_other"]["mean"] == 0.0
    assert all(r["grasped_target"] or not r["success"] for r in table["episodes_log"])
    assert len(table["episodes_log"]) == 2 * 2 * 2


def test_cli_train_eval_rollout(tmp_path):
    app = typer.Typer()
    vla_cli.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `vla` a sub-command group
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["vla", "train", "--out", str(run), "--episodes", "3",
                                 "--steps", "2", "--batch-size", "8", "--width", "32",
                                 "--layers", "1", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert (run / "final" / "imagefm.json").is_file() and (run / "demos.npz").is_file()
    result = runner.invoke(app, ["vla", "eval", "--model", str(run / "final"), "--episodes",
                                 "1", "--max-steps", "3", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "| expert |" in result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["success"]) == {"vla", "expert"}
    gif = tmp_path / "expert.gif"
    result = runner.invoke(app, ["vla", "rollout", "--out", str(gif), "--size", "48"])
    assert result.exit_code == 0 and "success" in result.output and gif.is_file()
