"""The Trainer in one process: run folder, learning, bad batches, GradCache, EMA, loaders."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import imagefm
from imagefm.config import ConfigError
from imagefm.train import ContrastiveTask, ToyPairs, Trainer, TrainingError, load_config
from imagefm.train.launch import build_model
from imagefm.train.metrics import read_metrics

TINY_MODEL = ("model.config={embed_dim: 32, "
              "vision: {image_size: 16, patch_size: 8, layers: 1, width: 32, heads: 2, "
              "mlp_dim: 64}, "
              "text: {vocab_size: 64, context_length: 8, layers: 1, width: 32, heads: 2, "
              "mlp_dim: 64}}")


def make_config(tmp_path, *overrides: str):
    return load_config(None, [TINY_MODEL, f"run.output_dir={tmp_path}", "run.progress=false",
                              "run.tensorboard=false", "train.precision=fp32",
                              "data.batch_size=8", "optim.warmup_steps=2", *overrides])


def toy(config, **kw) -> ToyPairs:
    return ToyPairs(batch_size=config.data.batch_size, image_size=16, vocab_size=64,
                    seed=config.run.seed, **kw)


def trainer_for(config, task=None, loader=None) -> Trainer:
    torch.manual_seed(config.run.seed)
    model = build_model(config)
    return Trainer(model, task or ContrastiveTask("clip"), config, loader or toy(config))


def test_fit_learns_and_writes_the_run_folder(tmp_path):
    config = make_config(tmp_path, "train.steps=40", "optim.lr=3e-3", "run.checkpoint_every=15",
                         "run.keep_last=2", "data.options={classes: 4}")
    run_dir = trainer_for(config, loader=toy(config, classes=4)).fit()

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # 4 separable classes: it learns
    assert records[0]["epoch"] == 0 and records[-1]["epoch"] == 4  # 8 batches an epoch
    assert all(r["samples_per_s"] > 0 for r in records)
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == [
        "step_00000030.pt", "step_00000040.pt"]  # keep_last=2, and one at the end
    assert load_config(run_dir / "config.yaml") == config
    assert (run_dir / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = imagefm.load(run_dir / "final")
    assert model.config.vision.width == 32
    card = (run_dir / "final" / "README.md").read_text(encoding="utf-8")
    assert "library_name: imagefm" in card and "toy: 40 steps of" in card  # what it learned from


def test_refuses_to_overwrite_a_run(tmp_path):
    config = make_config(tmp_path, "train.steps=2")
    trainer_for(config).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        trainer_for(config).fit()


class SometimesNaN(ContrastiveTask):
    """A clip task whose loss is NaN on the given (1-based) steps."""

    def __init__(self, bad_steps: set[int]) -> None:
        super().__init__("clip")
        self.bad_steps, self.calls = bad_steps, 0

    def loss(self, model, batch):
        self.calls += 1
        loss, metrics = super().loss(model, batch)
        return (loss * math.nan if self.calls in self.bad_steps else loss), metrics


def test_non_finite_losses_skip_the_step(tmp_path):
    config = make_config(tmp_path, "train.steps=5")
    trainer = trainer_for(config, task=SometimesNaN({2, 3}))
    weights = {}

    def remember(step_fn):
        def step(batch):
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            record = step_fn(batch)
            after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            weights[record["step"]] = (before, after)
            return record
        return step

    trainer.train_step = remember(trainer.train_step)
    trainer.fit()
    records = read_metrics(trainer.run_dir)
    assert [r["loss"] is None for r in records] == [False, True, True, False, False]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2, 2]
    for step in (2, 3):  # skipped steps leave the weights alone
        before, after = weights[step]
        assert all(torch.equal(before[n], after[n]) for n in before)
    before, after = weights[4]
    assert not all(torch.equal(before[n], after[n]) for n in before)


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path):
    config = make_config(tmp_path, "train.steps=10", "train.max_bad_steps=2")
    with pytest.raises(TrainingError, match="3 non-finite losses in a row.*train.max_bad_steps"):
        trainer_for(config, task=SometimesNaN({2, 3, 4})).fit()


def test_gradcache_training_matches_plain_training(tmp_path):
    runs = {}
    for name, chunk in (("plain", 0), ("cached", 3)):
        config = make_config(tmp_path, "train.steps=3", f"train.gradcache_chunk={chunk}",
                             f"run.name={name}")
        runs[name] = load_file(trainer_for(config).fit() / "final" / "model.safetensors")
    for key, value in runs["plain"].items():
        if key.endswith("k_proj.bias"):
            # Softmax ignores a constant shift of the keys: this gradient is 0 up to rounding,
            # and Adam normalises rounding noise to full-size steps. Nothing to compare.
            continue
        torch.testing.assert_close(runs["cached"][key], value, rtol=1e-5, atol=1e-6, msg=key)


class PushScaleUp(ContrastiveTask):
    """A loss that only wants a larger logit_scale."""

    def loss(self, model, batch):
        return -self.embed(model, batch).shared["logit_scale"], {}


def test_logit_scale_is_clamped_after_each_step(tmp_path):
    config = make_config(tmp_path, "train.steps=1", "optim.lr=1.0", "optim.warmup_steps=0")
    trainer = trainer_for(config, task=PushScaleUp("clip"))
    with torch.no_grad():
        trainer.model.logit_scale.fill_(math.log(100.0) - 0.1)  # one Adam step moves it by ~1
    trainer.fit()
    assert trainer.model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_dataloader_bf16_and_ema(tmp_path):
    config = make_config(tmp_path, "train.steps=3", "train.precision=bf16",
                         "train.ema_decay=0.5", "stage.preset=lit")
    batches = list(toy(config)(0))
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = trainer_for(config, loader=loader)
    assert trainer.autocast_dtype == torch.bfloat16
    frozen_before = trainer.model.vision.pos_embed.detach().clone()
    run_dir = trainer.fit()
    records = read_metrics(run_dir)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert torch.equal(trainer.model.vision.pos_embed, frozen_before)  # LiT: tower locked
    final = load_file(run_dir / "final" / "model.safetensors")
    ema = load_file(run_dir / "final_ema" / "model.safetensors")
    assert not torch.equal(final["text_proj.weight"], ema["text_proj.weight"])
    torch.testing.assert_close(ema["text_proj.weight"],
                               trainer.ema.shadow["text_proj.weight"].cpu())


def test_an_empty_loader_is_an_error(tmp_path):
    config = make_config(tmp_path, "train.steps=2")
    with pytest.raises(TrainingError, match="yielded no batches"):
        trainer_for(config, loader=lambda epoch: iter(())).fit()


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    runs = {}
    for flag in (False, True):
        config = make_config(tmp_path, "train.steps=2", f"model.gradient_checkpointing={flag}",
                             f"run.name=gc-{flag}")
        trainer = trainer_for(config)
        assert trainer.model.vision.transformer.gradient_checkpointing is flag
        runs[flag] = load_file(trainer.fit() / "final" / "model.safetensors")
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_torch_compile_gives_the_same_training(tmp_path):
    runs = {}
    for flag in (False, True):
        config = make_config(tmp_path, "train.steps=2", f"model.compile={flag}",
                             f"run.name=compile-{flag}")
        runs[flag] = [r["loss"] for r in read_metrics(trainer_for(config).fit())]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_the_compiled_training_forward_is_one_graph(tmp_path, loss):
    """A graph break splits what torch.compile can fuse and costs GPU throughput (issue 4's MFU
    goal); the contrastive loss step under bf16 autocast, padding mask included, has none."""
    config = make_config(tmp_path, *(["model.config.init_logit_bias=-10.0"]
                                     if loss == "siglip" else []))
    model = build_model(config)
    batch = next(toy(config)(0))
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][:, -2:] = 0
    task = ContrastiveTask(loss)

    def step(pixel_values, input_ids, attention_mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return task.loss(model, {"pixel_values": pixel_values, "input_ids": input_ids,
                                     "attention_mask": attention_mask})[0]

    explained = torch._dynamo.explain(step)(batch["pixel_values"], batch["input_ids"],
                                            batch["attention_mask"])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_toy_pairs_are_deterministic_and_split_by_rank():
    whole = list(ToyPairs(batch_size=6, image_size=8, vocab_size=32, batches_per_epoch=2)(3))
    again = list(ToyPairs(batch_size=6, image_size=8, vocab_size=32, batches_per_epoch=2)(3))
    other_epoch = list(ToyPairs(batch_size=6, image_size=8, vocab_size=32)(4))
    halves = [list(ToyPairs(batch_size=6, image_size=8, vocab_size=32, batches_per_epoch=2,
                            rank=r, world_size=2)(3)) for r in (0, 1)]
    for index, batch in enumerate(whole):
        assert torch.equal(batch["pixel_values"], again[index]["pixel_values"])
        for key in batch:
            torch.testing.assert_close(
                torch.cat([halves[0][index][key], halves[1][index][key]]), batch[key])
    assert not torch.equal(whole[0]["pixel_values"], other_epoch[0]["pixel_values"])


def test_data_sources_by_name_or_import_path():
    from imagefm.train.data import get_data_source, toy_source

    assert get_data_source("toy") is toy_source
    assert get_data_source("imagefm.train.data:toy_source") is toy_source
    with pytest.raises(ConfigError, match="unknown; choose one of .*toy"):
        get_data_source("webdatset")
    with pytest.raises(ConfigError, match="cannot be imported"):
        get_data_source("imagefm.nothing_here:make")


def test_tensorboard_is_used_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    config = make_config(tmp_path, "train.steps=2", "run.tensorboard=true")
    trainer_for(config).fit()
    losses = [(step, value) for tag, value, step in scalars if tag == "train/loss"]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(config.run_dir)]


def test_a_reiterable_loader_is_told_the_epoch(tmp_path):
    config = make_config(tmp_path, "train.steps=5")

    class EpochLoader:
        def __init__(self, batches):
            self.batches, self.epochs = batches, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(self.batches)

    loader = EpochLoader(list(toy(config, batches_per_epoch=2)(0)))
    trainer_for(config, loader=loader).fit()
    assert loader.epochs == [0, 1, 2]
    assert [r["epoch"] for r in read_metrics(config.run_dir)] == [0, 0, 1, 1, 2]


def test_host_sync_log_trains_as_step_mode_does(tmp_path):
    finals, logged = {}, {}
    for mode in ("step", "log"):
        config = make_config(tmp_path, "train.steps=6", f"train.host_sync={mode}",
                             "run.log_every=3", f"run.name={mode}", "optim.lr=3e-3")
        trainer = trainer_for(config)
        assert trainer.deferred_sync == (mode == "log")
        run_dir = trainer.fit()
        finals[mode] = load_file(run_dir / "final" / "model.safetensors")
        logged[mode] = read_metrics(run_dir)
    assert [r["step"] for r in logged["log"]] == [3, 6]
    for a, b in zip(logged["step"], logged["log"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert isinstance(b["loss"], float) and b["samples_per_s"] > 0
    for key, value in finals["step"].items():
        assert torch.allclose(value, finals["log"][key], rtol=1e-3, atol=1e-5), key


def test_host_sync_log_skips_non_finite_steps_on_the_device(tmp_path):
    config = make_config(tmp_path, "train.steps=5", "train.host_sync=log", "run.log_every=5")
    trainer = trainer_for(config, task=SometimesNaN({2, 3}))
    weights = {}
    step_fn = trainer.train_step

    def step(batch):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        record = step_fn(batch)
        assert isinstance(record["loss"], torch.Tensor)  # nothing read back yet
        weights[record["step"]] = (before, {n: p.detach().clone()
                                            for n, p in trainer.model.named_parameters()})
        return record

    trainer.train_step = step
    trainer.fit()
    for number in (2, 3):  # the fused AdamW left the weights alone
        before, after = weights[number]
        assert all(torch.equal(before[n], after[n]) for n in before)
    before, after = weights[4]
    assert not all(torch.equal(before[n], after[n]) for n in before)
    (record,) = read_metrics(trainer.run_dir)
    assert record["step"] == 5 and record["skipped_steps"] == 2
    assert trainer.progress.skipped_steps == 2


def test_host_sync_log_still_stops_after_too_many_bad_steps(tmp_path):
    config = make_config(tmp_path, "train.steps=10", "train.max_bad_steps=2",
                         "train.host_sync=log", "run.log_every=5")
    with pytest.raises(TrainingError, match="3 non-finite losses in a row \\(step 4\\)"):
        trainer_for(config, task=SometimesNaN({2, 3, 4})).fit()
    with pytest.raises(ConfigError, match="host_sync=log.*optim.implementation"):
        make_config(tmp_path, "train.host_sync=log", "optim.implementation=foreach")


def test_wise_alpha_exports_the_interpolation_and_survives_a_resume(tmp_path):
    config = make_config(tmp_path, "train.steps=4", "optim.lr=1e-2", "stage.preset=lit",
                         "run.checkpoint_every=2")
    trainer = trainer_for(config)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    run_dir = trainer.fit()
    trained = load_file(run_dir / "final" / "model.safetensors")
    assert not torch.equal(trained["text_proj.weight"], start["text_proj.weight"])

    # The same run with stage.wise_alpha, stopped after 2 steps and resumed: final/ holds
    # 0.25 x start + 0.75 x trained for what trained, the locked tower unchanged.
    wise = make_config(tmp_path, "train.steps=2", "optim.lr=1e-2", "stage.preset=lit",
                       "run.checkpoint_every=2", "run.name=wise", "stage.wise_alpha=0.75")
    trainer_for(wise).fit()
    resumed = make_config(tmp_path, "train.steps=4", "optim.lr=1e-2", "stage.preset=lit",
                          "run.checkpoint_every=2", "run.name=wise", "stage.wise_alpha=0.75",
                          "run.resume=true")
    resumed_trainer = trainer_for(resumed)
    with torch.no_grad():  # a resumed run must read the kept start, not take its own weights
        resumed_trainer.model.text_proj.weight.add_(1.0)
    wise_dir = resumed_trainer.fit()
    assert (wise_dir / "wise-start.safetensors").is_file()
    mixed = load_file(wise_dir / "final" / "model.safetensors")
    for name in ("text_proj.weight", "image_proj.weight"):
        torch.testing.assert_close(mixed[name], 0.25 * start[name] + 0.75 * trained[name],
                                   rtol=1e-4, atol=1e-5)
    assert torch.equal(mixed["vision.pos_embed"], start["vision.pos_embed"])


def test_model_preprocess_replaces_card_fields(tmp_path):
    config = make_config(tmp_path, "model.preprocess={resize_mode: pad}")
    model = build_model(config)
    assert model.card.resize_mode == "pad" and model.card.image_size == 16
    with pytest.raises(ConfigError, match="unknown card field"):
        build_model(make_config(tmp_path, "model.preprocess={resize: pad}"))
    with pytest.raises(ConfigError, match="resize_mode"):
        build_model(make_config(tmp_path, "model.preprocess={resize_mode: letterbox}"))
