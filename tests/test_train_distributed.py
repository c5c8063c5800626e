"""Two CPU processes (gloo) on halves of each global batch == one process on the whole batch.

The runs are real ``python -m imagefm.train`` processes started the way torchrun starts them
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imagefm.train.metrics import read_metrics

SRC = Path(__file__).resolve().parents[1] / "src"
CONFIG = """
run: {progress: false, tensorboard: false, checkpoint_every: 100}
model:
  preset: tiny
  config:
    embed_dim: 32
    vision: {image_size: 16, patch_size: 8, layers: 2, width: 32, heads: 2, mlp_dim: 64}
    text: {vocab_size: 64, context_length: 8, layers: 2, width: 32, heads: 2, mlp_dim: 64}
data: {batch_size: 8, options: {batches_per_epoch: 3}}
optim: {warmup_steps: 1, lr: 1.0e-3}
train: {steps: 4, precision: fp32}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(config: Path, world_size: int, *overrides: str, timeout: float = 180) -> None:
    """Run ``python -m imagefm.train`` on ``world_size`` local processes and wait for them."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get(
            "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "imagefm.train", str(config), *overrides], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    wait_for_all(procs, timeout, "rank")


def wait_for_all(procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    """Wait for every process; kill the rest if one hangs; each must have succeeded."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for index, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"{what} {index} failed:\n{output[-3000:]}"


def assert_same_weights(run_a: Path, run_b: Path, atol: float) -> None:
    a = load_file(run_a / "final" / "model.safetensors")
    b = load_file(run_b / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("k_proj.bias"):
            # Its gradient is zero up to rounding (softmax ignores a shift of all keys), and
            # Adam turns rounding noise into full-size steps: nothing meaningful to compare.
            continue
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def assert_same_losses(run_a: Path, run_b: Path) -> None:
    losses_a = [r["loss"] for r in read_metrics(run_a)]
    losses_b = [r["loss"] for r in read_metrics(run_b)]
    assert len(losses_a) == 4
    assert losses_a == pytest.approx(losses_b, abs=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A single-process reference run shared by the tests below."""
    root = tmp_path_factory.mktemp("dist")
    config = root / "config.yaml"
    config.write_text(CONFIG)
    train(config, 1, f"run.output_dir={root}", "run.name=single")
    return root


def test_ddp_two_processes_match_one(runs):
    train(runs / "config.yaml", 2, f"run.output_dir={runs}", "run.name=ddp")
    assert_same_losses(runs / "single", runs / "ddp")
    assert_same_weights(runs / "single", runs / "ddp", atol=1e-5)


def test_gradcache_under_ddp_matches_one_process(runs):
    train(runs / "config.yaml", 2, f"run.output_dir={runs}", "run.name=ddp-gradcache",
          "train.gradcache_chunk=3")
    assert_same_losses(runs / "single", runs / "ddp-gradcache")
    assert_same_weights(runs / "single", runs / "ddp-gradcache", atol=1e-5)


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_resume(runs):
    args = [f"run.output_dir={runs}", "run.name=fsdp", "train.strategy=fsdp",
            "train.ema_decay=0.5", "run.checkpoint_every=2"]
    train(runs / "config.yaml", 2, *args)
    assert_same_losses(runs / "single", runs / "fsdp")
    assert_same_weights(runs / "single", runs / "fsdp", atol=1e-5)

    # Resume the sharded run from its step-2 checkpoint: it must redo steps 3-4 identically.
    before = read_metrics(runs / "fsdp")
    (runs / "fsdp" / "checkpoints" / "step_00000004.pt").unlink()
    train(runs / "config.yaml", 2, *args, "--resume")
    after = read_metrics(runs / "fsdp")
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in before], abs=1e-6)
    assert_same_weights(runs / "single", runs / "fsdp", atol=1e-5)


@pytest.mark.slow
def test_siglip_ddp_matches_one_process(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("preset: tiny", "preset: siglip-tiny"))
    train(config, 1, f"run.output_dir={tmp_path}", "run.name=single")
    train(config, 2, f"run.output_dir={tmp_path}", "run.name=ddp")
    assert_same_losses(tmp_path / "single", tmp_path / "ddp")
    assert_same_weights(tmp_path / "single", tmp_path / "ddp", atol=1e-5)


def test_ranks_with_uneven_loaders_end_each_epoch_together(tmp_path, monkeypatch):
    """Rank 0's loader has 2 batches an epoch, rank 1's 3 (training and held-out data): every
    rank ends the epoch after 2, so two processes train, and evaluate, exactly as one process
    on rank 0's data; without the agreement rank 1's held-out pass would wait forever.
    Training accumulates 2 micro-batches a step (contrastive: GradCache over both ranks')."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # _dist_worker importable
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("steps: 4", "steps: 5").replace("layers: 2", "layers: 1"))
    args = [f"run.output_dir={tmp_path}", "data.source=_dist_worker:uneven_toy_source",
            "data.options={}", "train.accumulate=2", "eval.every=2", "eval.data=held-out"]
    train(config, 1, *args, "run.name=single")
    train(config, 2, *args, "run.name=uneven", timeout=120)
    single, uneven = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "uneven")
    assert [r["epoch"] for r in uneven if "loss" in r] == [0, 1, 2, 3, 4]  # 2 micro-batches
    assert [r["step"] for r in uneven if "eval/loss" in r] == [2, 4, 5]
    for key in ("loss", "eval/loss"):
        assert [r[key] for r in uneven if key in r] == pytest.approx(
            [r[key] for r in single if key in r], abs=1e-5)
    assert_same_weights(tmp_path / "single", tmp_path / "uneven", atol=1e-5)
