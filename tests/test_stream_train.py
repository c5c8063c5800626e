"""data.source=stream: the contrastive source over streamed shards (batches, options), a small
run that learns, and a run killed with SIGKILL that resumes at the right sample."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imagefm.config import ConfigError
from imagefm.data.formats import ShardWriter, read_shards
from imagefm.data.image import ImageProcessor, open_image
from imagefm.data.synthetic import generate
from imagefm.train import stream_data
from imagefm.train.config import load_config
from imagefm.train.distributed import DistInfo
from imagefm.train.launch import build_model, eval_data_config, run
from imagefm.train.metrics import read_metrics
from tests.stream_fixtures import build_data
from tests.test_train_resume import finish, kill_past_checkpoint, start


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return build_data(tmp_path_factory.mktemp("stream_train"))


def config_for(data: dict[str, Path], tmp_path: Path, *overrides: str):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.progress=false",
                              "run.tensorboard=false", f"model.init={data['model']}",
                              "data.source=stream", f"data.path={data['shards']}",
                              "data.batch_size=8", "train.precision=fp32", *overrides])


def test_batches_hold_this_ranks_rows_tokenised_and_preprocessed(data, tmp_path):
    config = config_for(data, tmp_path, "data.options.streams=2", "data.options.langs=[ko]")
    model = build_model(config)
    single = list(stream_data.stream_source(config, model, DistInfo())(0))
    ranks = [list(stream_data.stream_source(config, model, DistInfo(rank=r, world_size=2))(0))
             for r in range(2)]
    assert len(single) == 3  # 24 samples, batches of 8
    first = single[0]
    assert first["pixel_values"].shape == (8, 3, 16, 16)
    assert first["input_ids"].shape == first["attention_mask"].shape
    assert all(lang == "ko" for lang in first["langs"])
    # Pixels are the model's own evaluation preprocessing (no augment given)...
    shard_records = {r.key: r for r in read_shards(data["shards"])}
    expected = ImageProcessor(model.card)([open_image(shard_records[k].image)
                                           for k in first["keys"]])
    torch.testing.assert_close(first["pixel_values"], expected, rtol=0, atol=0)
    # ...the tokens the model's tokenizer gives the chosen captions.
    assert torch.equal(first["input_ids"], model.tokenizer(first["captions"])["input_ids"])
    for whole, *parts in zip(single, *ranks, strict=True):
        assert whole["keys"] == parts[0]["keys"] + parts[1]["keys"]
        assert torch.equal(whole["pixel_values"],
                           torch.cat([p["pixel_values"] for p in parts]))
    # Accumulation: micro-batches of data.batch_size / (ranks x accumulate) rows.
    micro = stream_data.stream_source(config_for(data, tmp_path, "train.accumulate=2"), model,
                                      DistInfo())(0)
    assert [len(b["keys"]) for b in micro] == [4] * 6


def test_augment_and_bad_options(data, tmp_path):
    pytest.importorskip("imagefm.data.augment")
    config = config_for(data, tmp_path, "data.options.augment={scale: [0.5, 1.0], "
                        "hflip_prob: 0.5}")
    model = build_model(config)
    loader = stream_data.stream_source(config, model, DistInfo())
    assert type(loader.transform).__name__ == "TrainTransform"
    a, b = list(loader(0)), list(loader(0))
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b, strict=True))
    for override, message in (("data.options.shuffle=1", "unknown data.options"),
                              ("data.options.augment={flip: 1}", "data.options.augment"),
                              ("data.options.streams=3", "divisible by streams = 3"),
                              ("data.options.resampled=true", "samples_per_epoch"),
                              ("data.options.format=zip", "data.options.format"),
                              ("task.name=vlm", "data.source=conversation-stream")):
        with pytest.raises(ConfigError, match=message):
            stream_data.stream_source(config_for(data, tmp_path, override), model, DistInfo())
    model.tokenizer = None
    with pytest.raises(ConfigError, match="the model's own tokenizer"):
        stream_data.stream_source(config, model, DistInfo())


def test_held_out_batches_read_the_test_split_in_order_without_augment(data, tmp_path):
    """data.options.held_out: the test shards of a folder named by split, in order, plain
    preprocessing; the training source on the same folder never sees them."""
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    with ShardWriter(shards, prefix="test", max_samples=3) as writer:
        for record in generate("scenes", 6, seed=1, image_size=32, split="eval"):
            writer.write(dataclasses.replace(record, split="test"))
    config = config_for(data, tmp_path, f"data.path={shards}", f"eval.data={shards}",
                        "eval.every=5", "eval.batch_size=2",
                        "data.options.augment={hflip_prob: 1.0}")
    model = build_model(config)
    evaluation = eval_data_config(config)
    assert evaluation.data.options["held_out"] is True  # set for sources that read held-out data
    held_out = stream_data.stream_source(evaluation, model, DistInfo())
    assert type(held_out.transform).__name__ == "Preprocess"
    keys = [k for batch in held_out(0) for k in batch["keys"]]
    assert keys == [r.key for r in read_shards(sorted(shards.glob("test-*.tar")))]
    train = stream_data.stream_source(config, model, DistInfo())
    trained_on = {k for batch in train(0) for k in batch["keys"]}
    assert trained_on == {r.key for r in read_shards(data["shards"])}  # no test shard


def test_a_small_run_learns(data, tmp_path):
    run_dir = run(config_for(data, tmp_path, "train.steps=40", "run.log_every=1",
                             "optim.lr=5e-3", "optim.warmup_steps=3", "optim.weight_decay=0",
                             "data.options.shuffle_buffer=8", "data.options.langs=[en]"))
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 40
    # ln 8 = 2.08 is chance for batches of 8; the run gets well below where it started.
    assert sum(losses[-8:]) < 0.8 * sum(losses[:8]), losses


STEPS = 20


def test_sigkill_then_resume_continues_at_the_right_sample(data, tmp_path):
    """Killed mid-epoch after a checkpoint and resumed (skip_batches), the run takes the same
    batches: the same loss at every step and the same final weights as an uninterrupted run."""
    config = tmp_path / "config.yaml"
    config.write_text(f"""
run: {{progress: false, tensorboard: false, checkpoint_every: 5, keep_last: 2, log_every: 1}}
model: {{init: {data['model']}}}
data:
  source: stream
  path: {data['shards']}
  batch_size: 4
  options: {{streams: 2, shuffle_buffer: 5, augment: {{scale: [0.6, 1.0], hflip_prob: 0.5}}}}
optim: {{warmup_steps: 2, lr: 2.0e-3}}
train: {{steps: {STEPS}, precision: fp32}}
""")
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    run(load_config(config, [f"run.output_dir={tmp_path}", "run.name=full"]))  # in this process

    proc = start(config, f"run.output_dir={tmp_path}", "run.name=interrupted")
    # 6 batches an epoch: most checkpoints, every 5 steps, fall in the middle of an epoch.
    killed_at = kill_past_checkpoint(proc, interrupted, 7)
    assert killed_at < STEPS

    output = finish(start(config, f"run.output_dir={tmp_path}", "run.name=interrupted",
                          "--resume"))
    assert "resumed" in output
    expected, got = read_metrics(full), read_metrics(interrupted)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "grad_norm", "epoch"):
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (have, want)
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(interrupted / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=key)
