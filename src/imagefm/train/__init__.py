"""Training: one Trainer loop, tasks that own their losses, configs, checkpoints, distributed.

    from imagefm.train import ContrastiveTask, Trainer, load_config

    config = load_config("clip.yaml", ["train.steps=300"])
    Trainer(model, ContrastiveTask("clip"), config, make_loader).fit()

or from the shell: ``imagefm train clip.yaml train.steps=300`` / ``python -m imagefm.train``.
"""

from __future__ import annotations

from imagefm.train.config import TrainConfig, load_config
from imagefm.train.data import ToyPairs, register_data_source
from imagefm.train.gradcache import gradcache_backward
from imagefm.train.tasks import ContrastiveTask, Embeddings, Task
from imagefm.train.trainer import StopTraining, Trainer, TrainingError

__all__ = ["ContrastiveTask", "Embeddings", "StopTraining", "Task", "ToyPairs", "TrainConfig",
           "Trainer", "TrainingError", "gradcache_backward", "load_config",
           "register_data_source"]
