"""Gradient accumulation equals the large batch (contrastive through GradCache, a VLM's
per-token loss through weighted micro-batches); resume positions count micro-batches."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from imagefm.config import ConfigError, VisionConfig
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.vlm import VLM, VLMConfig
from imagefm.train import ContrastiveTask, ToyPairs, Trainer, load_config
from imagefm.train.accumulate import accumulated_backward
from imagefm.train.batches import epoch_batches
from imagefm.train.gradcache import split_batch
from imagefm.train.launch import build_model
from imagefm.train.metrics import read_metrics
from imagefm.train.tasks import VLMTask

TINY = ("model.config={embed_dim: 32, "
        "vision: {image_size: 16, patch_size: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}, "
        "text: {vocab_size: 64, context_length: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}}")
BATCH, STEPS = 8, 3


def config_for(tmp_path, *overrides: str):
    return load_config(None, [TINY, f"run.output_dir={tmp_path}", "run.progress=false",
                              "run.tensorboard=false", "train.precision=fp32",
                              f"data.batch_size={BATCH}", "optim.warmup_steps=1",
                              "optim.lr=5e-4", f"train.steps={STEPS}", *overrides])


def big_batches(epoch: int) -> list[dict]:
    """Four global batches an epoch, texts padded differently per batch (so micro-batches of
    one step differ in shape and must not be concatenated)."""
    batches = list(ToyPairs(batch_size=BATCH, image_size=16, vocab_size=64, classes=4,
                            batches_per_epoch=4)(epoch))
    for index, batch in enumerate(batches):
        batch["attention_mask"][::2, 8 - 1 - index % 3:] = 0
    return batches


class Micro:
    """``make_loader``: each big batch cut into ``k`` micro-batches, in order; records the
    ``skip_batches`` calls and how many batches it yielded."""

    def __init__(self, k: int, fast_skip: bool = True) -> None:
        self.k, self.fast_skip, self.skips, self.yielded = k, fast_skip, [], 0

    def __call__(self, epoch: int):
        parts = [m for b in big_batches(epoch) for m in split_batch(b, BATCH // self.k)]
        return (FastLoader if self.fast_skip else Loader)(self, parts)


class Loader:
    def __init__(self, owner: Micro, parts: list[dict]) -> None:
        self.owner, self.parts, self.start = owner, parts, 0

    def __iter__(self):
        for part in self.parts[self.start:]:
            self.owner.yielded += 1
            yield part


class FastLoader(Loader):
    def skip_batches(self, n: int) -> None:
        self.owner.skips.append(n)
        self.start = n


def train(config, task, loader):
    torch.manual_seed(0)
    trainer = Trainer(build_model(config), task, config, loader)
    run_dir = trainer.fit()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return trainer, read_metrics(run_dir), weights


def assert_same_training(reference, other, *, rel: float = 1e-5) -> None:
    (_, records_a, weights_a), (_, records_b, weights_b) = reference, other
    assert [r["step"] for r in records_b] == [r["step"] for r in records_a] == [1, 2, 3]
    for a, b in zip(records_a, records_b, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for key, value in weights_a.items():
        if key.endswith("k_proj.bias"):
            # Softmax ignores a shift of all keys: this gradient is rounding noise, which Adam
            # turns into full-size steps. Nothing to compare.
            continue
        torch.testing.assert_close(weights_b[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("loss, k, chunk", [("clip", 2, 0), ("clip", 4, 3),
                                            ("siglip", 4, 0), ("siglip", 2, 3)])
def test_contrastive_accumulation_equals_the_large_batch(tmp_path, loss, k, chunk):
    preset = "siglip-tiny" if loss == "siglip" else "tiny"
    reference = train(config_for(tmp_path, f"model.preset={preset}", "run.name=ref"),
                      ContrastiveTask(loss), lambda epoch: big_batches(epoch))
    config = config_for(tmp_path, f"model.preset={preset}", "run.name=acc",
                        f"train.accumulate={k}", f"train.gradcache_chunk={chunk}")
    accumulated = train(config, ContrastiveTask(loss), Micro(k))
    assert_same_training(reference, accumulated)
    trainer, records, _ = accumulated
    assert trainer.gradcache  # the micro-batches ran as GradCache chunks
    # Counters: optimizer steps; samples of whole steps; micro-batches for the data position.
    assert trainer.progress.step == STEPS and trainer.progress.samples == STEPS * BATCH
    assert (trainer.progress.epoch, trainer.progress.batch_in_epoch) == (0, STEPS * k)
    assert records[-1]["epoch"] == 0


@pytest.mark.parametrize("fast", [True, False])
def test_resume_mid_epoch_counts_micro_batches(tmp_path, fast):
    k = 2
    overrides = ["train.steps=6", f"train.accumulate={k}", "run.checkpoint_every=5"]
    config = config_for(tmp_path, *overrides)
    whole = train(config, ContrastiveTask("clip"), Micro(k))
    (config.run_dir / "checkpoints" / "step_00000006.pt").unlink()  # as if killed after 5
    loader = Micro(k, fast_skip=fast)
    resumed = train(config_for(tmp_path, *overrides, "run.resume=true"),
                    ContrastiveTask("clip"), loader)
    # 8 micro-batches an epoch: step 5 ended after micro-batch 2 of epoch 1; step 6 starts there.
    if fast:
        assert loader.skips == [2] and loader.yielded == 2  # nothing read only to be dropped
    else:
        assert loader.yielded == 4  # two read and dropped, two trained on
    assert (resumed[0].progress.epoch, resumed[0].progress.batch_in_epoch) == (1, 4)
    assert [r["step"] for r in resumed[1]] == list(range(1, 7))
    assert [r["loss"] for r in resumed[1]] == pytest.approx([r["loss"] for r in whole[1]],
                                                            rel=1e-6)
    for key, value in whole[2].items():
        torch.testing.assert_close(resumed[2][key], value, rtol=1e-6, atol=1e-7, msg=key)


# --- a VLM: the per-token loss ------------------------------------------------------------------

VOCAB, IMAGE_ID, LENGTH = 64, 63, 12


def tiny_vlm() -> VLM:
    vision = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64)
    lm = DecoderConfig(vocab_size=VOCAB, width=32, layers=1, heads=2, kv_heads=1, mlp_dim=64,
                       context_length=64)
    torch.manual_seed(0)
    return VLM(VLMConfig(vision=vision, lm=lm, image_token_id=IMAGE_ID))


def vlm_batches(steps: int, rows: int) -> list[dict]:
    """Rows with 4 image tokens, then text; 1 to 7 labelled tokens a row, so micro-batches hold
    very different numbers of loss terms."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(steps):
        ids = torch.randint(1, IMAGE_ID, (rows, LENGTH), generator=generator)
        ids[:, 1:5] = IMAGE_ID
        labels = torch.full_like(ids, -100)
        for row in range(rows):
            count = int(torch.randint(1, 8, (), generator=generator))
            labels[row, LENGTH - count:] = ids[row, LENGTH - count:]
        mask = torch.ones_like(ids)
        batches.append({"input_ids": ids, "pixel_values": torch.randn(
            rows, 3, 16, 16, generator=generator), "attention_mask": mask, "labels": labels})
    return batches


def test_vlm_accumulation_weighs_micro_batches_by_their_tokens(tmp_path):
    task, k = VLMTask(), 4
    big = vlm_batches(STEPS, BATCH)
    results = {}
    # host_sync=log (a GPU's default): the step's loss and metrics stay device tensors.
    for name, accumulate, sync in (("ref", 1, "step"), ("acc", k, "step"), ("log", k, "log")):
        config = config_for(tmp_path, f"run.name={name}", f"train.accumulate={accumulate}",
                            f"train.host_sync={sync}")
        trainer = Trainer(tiny_vlm(), task, config, lambda epoch: iter(()))
        losses, tokens = [], []
        for batch in big:
            record = trainer.train_step(split_batch(batch, BATCH // accumulate))
            losses.append(float(record["loss"]))
            tokens.append(int(record["label_tokens"]))  # counts add up over micro-batches
        results[name] = (losses, {k: v.detach().clone() for k, v in
                                  trainer.model.state_dict().items()})
        assert tokens == [int((b["labels"][:, 1:] != -100).sum()) for b in big]
    for name in ("acc", "log"):
        assert results[name][0] == pytest.approx(results["ref"][0], rel=1e-6)
        for key, value in results["ref"][1].items():
            torch.testing.assert_close(results[name][1][key], value, rtol=1e-5, atol=1e-6,
                                       msg=key)
    # The weighting matters: the plain mean of the micro-batches' losses is another number
    # (further from the large batch's than the 1e-6 relative (~4e-6) the check above allows).
    model = tiny_vlm()
    with torch.no_grad():
        plain = sum(task.loss(model, m)[0] for m in split_batch(big[0], BATCH // k)) / k
        whole = task.loss(model, big[0])[0]
    assert abs(float(plain) - float(whole)) > 1e-4
    assert results["ref"][0][0] == pytest.approx(float(whole), rel=1e-6)


class FakeDDP(nn.Module):
    """Records, per forward, whether DDP would all-reduce in the backward that follows."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.syncing, self.seen = nn.Linear(3, 1), True, []

    @contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        self.seen.append(self.syncing)
        return self.linear(x)


class MeanTask:
    def loss(self, model, batch):
        return model(batch["x"]).mean(), {"rows": len(batch["x"])}


def test_ddp_all_reduces_once_per_accumulated_step():
    model, batches = FakeDDP(), [{"x": torch.randn(r, 3)} for r in (2, 1, 3)]
    loss, metrics = accumulated_backward(model, MeanTask(), batches, [2.0, 0.0, 3.0],
                                         contrastive=False)
    assert model.seen == [False, True]  # no_sync, then the last backward syncs; none for w=0
    assert metrics == {"rows": 5}
    with torch.no_grad():  # the rows' mean over the batches that count
        expected = model.linear(torch.cat([batches[0]["x"], batches[2]["x"]])).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_micro_batch_size_and_config_checks(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("data: {batch_size: 96}\ntrain: {accumulate: 12}\n")
    from imagefm.train.data import micro_batch_size
    from imagefm.train.distributed import DistInfo

    config = config_for(tmp_path, "data.batch_size=24", "train.accumulate=3")
    assert micro_batch_size(config, DistInfo(0, 2)) == 4
    with pytest.raises(ConfigError, match=r"number of processes \(5\) times train.accumulate"):
        micro_batch_size(config, DistInfo(0, 5))
    with pytest.raises(ConfigError, match="divisible by train.accumulate"):
        config_for(tmp_path, "train.accumulate=3")
    with pytest.raises(ConfigError, match="train.accumulate must be >= 1"):
        config_for(tmp_path, "train.accumulate=0")
    with pytest.raises(ConfigError, match="GradCache, which needs train.strategy=ddp"):
        config_for(tmp_path, "train.accumulate=2", "train.strategy=fsdp")
    local = load_config(big, ["run.local=true"])  # the shrink keeps the batch divisible
    assert (local.data.batch_size, local.train.accumulate) == (8, 8)


def test_epoch_batches_start_where_asked_and_refuse_empty_data():
    stream = epoch_batches(lambda epoch: [{"e": epoch, "i": i} for i in range(3)], 2, 2)
    assert [next(stream)[:2] for _ in range(4)] == [(2, 2), (3, 0), (3, 1), (3, 2)]
    from imagefm.train import TrainingError

    with pytest.raises(TrainingError, match="yielded no batches"):
        next(epoch_batches(lambda epoch: [], 0, 0))
    # A checkpoint taken at the very end of an epoch resumes with the next one.
    stream = epoch_batches(lambda epoch: [{"e": epoch}] * 2, 0, 2)
    assert next(stream)[:2] == (1, 0)
