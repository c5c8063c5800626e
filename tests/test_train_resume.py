"""A run killed with SIGKILL and resumed continues exactly: the same loss at every step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imagefm.train.metrics import read_metrics
from imagefm.train.state import list_checkpoints

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 40
CONFIG = f"""
run: {{progress: false, tensorboard: false, checkpoint_every: 6, keep_last: 2}}
model:
  preset: tiny
  config:
    embed_dim: 32
    vision: {{image_size: 16, patch_size: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}}
    text: {{vocab_size: 64, context_length: 8, layers: 1, width: 32, heads: 2, mlp_dim: 64}}
data: {{batch_size: 8, options: {{batches_per_epoch: 5}}}}
optim: {{warmup_steps: 3, lr: 2.0e-3}}
train: {{steps: {STEPS}, precision: fp32, ema_decay: 0.9}}
"""


def start(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "imagefm.train", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output[-3000:]
    return output


def kill_past_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> int:
    """SIGKILL the run once it has a checkpoint AND has logged ``step`` (steps past the
    checkpoint, which the resumed run must then drop and redo); the last step it logged."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and not (list_checkpoints(run_dir) and max(
            (r["step"] for r in read_metrics(run_dir)), default=0) >= step):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before it could be killed:\n{proc.communicate()[0][-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return max(r["step"] for r in read_metrics(run_dir))


def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"

    finish(start(config, f"run.output_dir={tmp_path}", "run.name=full"))

    proc = start(config, f"run.output_dir={tmp_path}", "run.name=interrupted")
    killed_at = kill_past_checkpoint(proc, interrupted, 8)
    last_checkpoint = int(list_checkpoints(interrupted)[-1].stem.split("_")[1])
    assert last_checkpoint <= killed_at < STEPS  # usually killed_at > last_checkpoint

    output = finish(start(config, f"run.output_dir={tmp_path}", "run.name=interrupted",
                          "--resume"))
    assert "resumed" in output

    expected = read_metrics(full)
    got = read_metrics(interrupted)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # each step logged once
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "lr", "grad_norm", "logit_scale", "epoch"):
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (have, want)
    for folder in ("final", "final_ema"):
        a = load_file(full / folder / "model.safetensors")
        b = load_file(interrupted / folder / "model.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=key)
