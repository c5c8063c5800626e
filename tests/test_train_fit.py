"""The small fit loop (train/fit.py): the Trainer's schedule and clipping, best-weights selection
on validation scores, exactly ``steps`` steps."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from imagefm.train.config import OptimConfig
from imagefm.train.distributed import clip_grad_norm
from imagefm.train.fit import fit
from imagefm.train.optim import build_optimizer, build_scheduler, cosine_with_warmup


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_fit_is_the_trainers_optimizer_schedule_and_clipping():
    """Parameters and learning rates step for step equal to a loop written out with the
    Trainer's pieces (build_optimizer, build_scheduler, clip_grad_norm)."""
    config = OptimConfig(lr=0.05, weight_decay=0.1, warmup_steps=3, min_lr_ratio=0.1,
                         grad_clip=0.5)
    x, y = _data()
    steps = 12

    model = _model()
    mults = {name: (0.5 if name.startswith("0.") else 1.0) for name, _ in model.named_parameters()}
    optimizer = build_optimizer(model, config, mults)
    seen_lrs = []

    def loss(step: int) -> torch.Tensor:
        seen_lrs.append([g["lr"] for g in optimizer.param_groups])
        rows = torch.arange(step, step + 4) % len(x)
        return nn.functional.cross_entropy(model(x[rows]), y[rows])

    result = fit(optimizer, config, steps, loss)

    reference = _model()
    ref_opt = build_optimizer(reference, config, mults)
    ref_sched = build_scheduler(ref_opt, config, steps)
    ref_lrs = []
    for step in range(1, steps + 1):
        ref_lrs.append([g["lr"] for g in ref_opt.param_groups])
        rows = torch.arange(step, step + 4) % len(x)
        ref_opt.zero_grad()
        ref_loss = nn.functional.cross_entropy(reference(x[rows]), y[rows])
        ref_loss.backward()
        ref_loss = ref_loss.detach()
        clip_grad_norm(list(reference.parameters()), config.grad_clip)
        ref_opt.step()
        ref_sched.step()

    assert sum(seen_lrs, []) == pytest.approx(sum(ref_lrs, []))
    # The factors are the Trainer's cosine with warm-up, per group's own multiplier.
    for step, lrs in enumerate(seen_lrs):
        factor = cosine_with_warmup(step, 3, steps, 0.1)
        assert lrs == pytest.approx([0.05 * g["lr_mult"] * factor
                                     for g in optimizer.param_groups])
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert result.loss == pytest.approx(ref_loss.item())
    assert result.steps == steps and result.best_step == 0 and result.history == []


@pytest.mark.parametrize(("clip", "expected"), [(1.0, 1.0), (0.0, 10.0)])
def test_clipping_caps_the_gradient_norm_and_zero_turns_it_off(clip, expected):
    weight = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)  # the update is minus the gradient
    config = OptimConfig(warmup_steps=0, grad_clip=clip)
    fit(optimizer, config, 1, lambda _: (weight * torch.tensor([6.0, 8.0])).sum())
    assert weight.detach().norm().item() == pytest.approx(expected, rel=1e-5)


def test_stops_at_steps_and_evaluates_at_0_every_n_and_the_last_step():
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    calls = []

    def loss(step: int) -> torch.Tensor:
        calls.append(step)
        return (weight - 1.0).pow(2).sum()

    result = fit(optimizer, OptimConfig(warmup_steps=0), 7, loss, evaluate=lambda: 0.0,
                 eval_every=3)
    assert calls == [1, 2, 3, 4, 5, 6, 7]
    assert [s for s, _ in result.history] == [0, 3, 6, 7]
    assert result.steps == 7


def test_best_weights_are_kept_earliest_on_ties():
    weight = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scores = iter([0.2, 0.5, 0.9, 0.9, 0.4])  # steps 0, 2, 4, 6, 8
    snapshots: dict[float, torch.Tensor] = {}
    steps_seen = []

    def evaluate() -> float:
        assert not torch.is_grad_enabled()
        score = next(scores)
        snapshots.setdefault(score, weight.detach().clone())
        steps_seen.append(weight.detach().clone())
        return score

    result = fit(optimizer, OptimConfig(warmup_steps=0), 8, lambda _: weight.sum() * 1.0,
                 evaluate=evaluate, eval_every=2)
    assert result.best_step == 4 and result.best_score == 0.9
    assert result.history == [(0, 0.2), (2, 0.5), (4, 0.9), (6, 0.9), (8, 0.4)]
    torch.testing.assert_close(weight.detach(), snapshots[0.9])  # the step-4 weights
    assert not torch.equal(weight.detach(), steps_seen[-1])  # not the last ones


def test_without_evaluate_the_last_weights_stay_and_a_bar_can_be_shown(capsys):
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    result = fit(optimizer, OptimConfig(warmup_steps=0, grad_clip=0.0), 5,
                 lambda _: weight.pow(2).sum(),
                 progress=True, desc="toy fit")
    # Plain gradient descent on |w|² with the cosine factors, step by step.
    expected = torch.ones(2)
    for step in range(5):
        expected = expected - 0.1 * cosine_with_warmup(step, 0, 5) * 2 * expected
    torch.testing.assert_close(weight.detach(), expected)
    assert result.best_score is None and result.history == []
    assert "toy fit" in capsys.readouterr().err


LAYERING_CHECK = """
import sys
from torch import nn
import imagefm.train.fit, imagefm.train.trainer
from imagefm.train.config import StageConfig
from imagefm.train.stages import apply_stage, merge_lora

model = nn.Module()
model.lm = nn.Module()
model.lm.layers = nn.ModuleList([nn.Module()])
model.lm.layers[0].q_proj = nn.Linear(4, 4)
stage = StageConfig(lora_rank=2, lora_modules=["lm"], lora_targets=["q_proj"])
mults = apply_stage(model, stage)
assert sorted(mults) == ["lm.layers.0.q_proj.lora_A.default.weight",
                         "lm.layers.0.q_proj.lora_B.default.weight"], mults
assert merge_lora(model) and type(model.lm.layers[0].q_proj) is nn.Linear
apps = ("adapt", "apps", "eval", "serve", "cli")
print([m for m in sys.modules if m.split(".")[:2] in [["imagefm", a] for a in apps]])
"""


def test_the_training_loop_and_its_lora_stage_import_no_app():
    """train/ sits below adapt/, apps/, eval/: importing the loops, and running the LoRA stage
    (its layers are models/lora.py's, shared with adaptation), loads none of them."""
    pytest.importorskip("peft")
    out = subprocess.run([sys.executable, "-c", LAYERING_CHECK], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
