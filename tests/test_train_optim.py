"""Optimizer groups (weight decay), schedule, EMA and stages (freezing, LR multipliers)."""

from __future__ import annotations

import math

import pytest
import torch

from imagefm.config import ConfigError, preset
from imagefm.models.dual_encoder import DualEncoder
from imagefm.train.config import OptimConfig, StageConfig
from imagefm.train.optim import (
    ExponentialMovingAverage,
    build_optimizer,
    build_scheduler,
    cosine_with_warmup,
)
from imagefm.train.stages import apply_stage

SMALL = {"layers": 2, "width": 32, "heads": 2, "mlp_dim": 64}


def tiny(name: str = "tiny") -> DualEncoder:
    base = preset(name)
    vision = base.vision.__class__(**{**base.vision.__dict__, **SMALL, "image_size": 16})
    text = base.text.__class__(**{**base.text.__dict__, **SMALL, "vocab_size": 64})
    return DualEncoder(base.replace(vision=vision, text=text, embed_dim=32))


def _decay_by_name(optimizer) -> dict[str, float]:
    return {name: group["weight_decay"] for group in optimizer.param_groups
            for name in group["names"]}


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
def test_weight_decay_skips_norms_biases_positions_tokens_and_temperature(name):
    model = tiny(name)
    mults = {n: 1.0 for n, _ in model.named_parameters()}
    decay = _decay_by_name(build_optimizer(model, OptimConfig(weight_decay=0.1), mults))
    assert set(decay) == set(mults)
    modules = dict(model.named_modules())
    for param_name, value in decay.items():
        owner = modules[param_name.rpartition(".")[0]] if "." in param_name else model
        leaf = param_name.rpartition(".")[2]
        expect_no_decay = (isinstance(owner, torch.nn.LayerNorm) or leaf == "bias"
                           or leaf in ("pos_embed", "class_token", "probe", "logit_scale",
                                       "logit_bias"))
        assert value == (0.0 if expect_no_decay else 0.1), param_name
    # The cases the brief names, spelled out.
    assert decay["logit_scale"] == decay["vision.pos_embed"] == decay["text.pos_embed"] == 0.0
    assert decay["vision.transformer.blocks.0.norm1.weight"] == 0.0
    assert decay["vision.transformer.blocks.0.mlp.fc1.weight"] == 0.1
    assert decay["text.token_embed.weight"] == 0.1
    if name == "siglip-tiny":
        assert decay["logit_bias"] == decay["vision.head.probe"] == 0.0
    else:
        assert decay["vision.class_token"] == 0.0


def test_cosine_schedule_with_warmup():
    warmup, total, floor = 4, 24, 0.1
    factors = [cosine_with_warmup(s, warmup, total, floor) for s in range(total + 1)]
    assert factors[:warmup] == [0.25, 0.5, 0.75, 1.0]
    assert factors[warmup] == 1.0
    middle = warmup + (total - warmup) // 2
    assert factors[middle] == pytest.approx(floor + (1 - floor) * 0.5)
    assert factors[total] == pytest.approx(floor)
    tail = factors[warmup:]
    assert all(a >= b for a, b in zip(tail, tail[1:], strict=False))  # decreasing
    # The scheduler applies it to every group's own (multiplied) learning rate.
    model = tiny()
    mults = {n: (0.5 if n.startswith("vision") else 1.0) for n, _ in model.named_parameters()}
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, warmup_steps=warmup), mults)
    scheduler = build_scheduler(optimizer, OptimConfig(warmup_steps=warmup, min_lr_ratio=floor),
                                total)
    for _ in range(middle):
        optimizer.step()
        scheduler.step()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.1 * group["lr_mult"] * factors[middle])


def test_ema_is_an_exponential_average():
    model = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], start + 0.1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * (start + 0.1) + 0.1 * (start + 2))
    fresh = torch.nn.Linear(3, 2)
    ema.copy_to(fresh)
    torch.testing.assert_close(fresh.weight, ema.shadow["weight"])


def test_lit_freezes_the_image_tower():
    model = tiny()
    mults = apply_stage(model, StageConfig(preset="lit"))
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith("vision.")), name
        assert (name in mults) == param.requires_grad
    assert "image_proj.weight" in mults and "logit_scale" in mults


def test_unlock_last_n_thaws_the_last_blocks_and_what_follows():
    model = tiny()  # two vision blocks
    apply_stage(model, StageConfig(preset="lit", unlock_last_n={"vision": 1}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and
                 n.startswith("vision.")}
    assert trainable
    for name in trainable:
        assert name.startswith(("vision.transformer.blocks.1.", "vision.norm_post.")), name
    assert "vision.norm_post.weight" in trainable
    assert not any(n.startswith("vision.transformer.blocks.0.") for n in trainable)
    assert "vision.patch_embed.weight" not in trainable and "vision.pos_embed" not in trainable


def test_lr_multipliers_and_frozen_prefixes_respect_name_boundaries():
    model = tiny()
    stage = StageConfig(frozen=["text.token_embed"],
                        lr_mult={"vision": 0.1, "vision.transformer.blocks.1": 0.5})
    mults = apply_stage(model, stage)
    assert not model.text.token_embed.weight.requires_grad
    assert mults["vision.pos_embed"] == 0.1
    assert mults["vision.transformer.blocks.1.mlp.fc1.weight"] == 0.5  # longest prefix wins
    assert mults["text.pos_embed"] == 1.0
    optimizer = build_optimizer(model, OptimConfig(lr=1.0), mults)
    lrs = {n: g["lr"] for g in optimizer.param_groups for n in g["names"]}
    assert lrs["vision.pos_embed"] == pytest.approx(0.1)
    assert "text.token_embed.weight" not in lrs


@pytest.mark.parametrize("stage, message", [
    (StageConfig(frozen=["visoin"]), "'visoin' matches no parameter.*vision, text"),
    (StageConfig(frozen=["vision_proj"]), "matches no parameter"),
    (StageConfig(unlock_last_n={"vision": 1}), "is not frozen"),
    (StageConfig(frozen=["vision", "text", "image_proj", "text_proj", "logit_scale"]),
     "nothing would train"),
])
def test_stage_mistakes_are_reported(stage, message):
    with pytest.raises(ConfigError, match=message):
        apply_stage(tiny(), stage)


def test_logit_scale_clamp_constant_is_log_100():
    from imagefm.train.tasks import ContrastiveTask

    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    ContrastiveTask("clip").after_step(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_gradient_clipping_scales_to_the_max_norm():
    from imagefm.train.distributed import clip_grad_norm

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    assert clip_grad_norm(params, 10.0) == pytest.approx(5.0)  # under the limit: untouched
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 0.0, 0.0]))
    assert clip_grad_norm(params, 1.0) == pytest.approx(5.0)  # the norm before clipping
    total = torch.cat([p.grad.flatten() for p in params]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5,
                               atol=1e-6)


def test_fused_adamw_by_default_and_the_same_update_as_foreach():
    model = tiny()
    mults = {name: 1.0 for name, _ in model.named_parameters()}
    fused = build_optimizer(model, OptimConfig(), mults)
    assert fused.defaults["fused"] is True
    reference = tiny()
    reference.load_state_dict(model.state_dict())
    foreach = build_optimizer(reference, OptimConfig(implementation="foreach"), mults)
    assert not foreach.defaults["fused"]
    for net in (model, reference):
        for p in net.parameters():
            p.grad = torch.full_like(p, 0.01) * torch.arange(p.numel()).reshape(p.shape) % 3
    fused.step()
    foreach.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name


def test_an_unknown_fused_setting_is_refused():
    from imagefm.train.config import TrainConfig

    with pytest.raises(ConfigError, match="optim.implementation"):
        TrainConfig.from_dict({"optim": {"implementation": "yes"}})
