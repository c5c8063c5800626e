"""Two "nodes" on this machine: two ``torchrun --nnodes 2`` launches (one process each, gloo
over loopback) training on streamed shards give the same losses and weights as one process
with the same global batch.

The streamed data is read as virtual streams (imagefm.data.stream): with ``streams`` fixed, the
global batches do not depend on how many processes read them, so the two runs see the same
samples at every step and the distributed losses make the same gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stream_fixtures import build_data
from tests.test_train_distributed import assert_same_weights, free_port, wait_for_all

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 5


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def test_two_torchrun_nodes_match_one_process(tmp_path):
    data = build_data(tmp_path / "data")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
run: {{progress: false, tensorboard: false, checkpoint_every: 100, log_every: 1}}
model: {{init: {data['model']}}}
data:
  source: stream
  path: {data['shards']}
  batch_size: 8
  options: {{streams: 2, shuffle_buffer: 4, augment: {{scale: [0.7, 1.0], hflip_prob: 0.5}}}}
optim: {{warmup_steps: 1, lr: 2.0e-3}}
train: {{steps: {STEPS}, precision: fp32}}
""")
    command = ["-m", "imagefm", "train", str(config), f"run.output_dir={tmp_path}"]
    wait_for_all([subprocess.Popen([sys.executable, *command, "run.name=single"], env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)],
                 240, "single")
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
         str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
         str(port), *command, "run.name=nodes"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in range(2)]
    wait_for_all(nodes, 240, "node")

    from imagefm.train.metrics import read_metrics

    single, nodes_run = tmp_path / "single", tmp_path / "nodes"
    losses = [r["loss"] for r in read_metrics(single)]
    assert len(losses) == STEPS
    assert [r["loss"] for r in read_metrics(nodes_run)] == pytest.approx(losses, abs=1e-5)
    assert_same_weights(single, nodes_run, atol=1e-5)
