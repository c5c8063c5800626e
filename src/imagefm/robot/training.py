"""Training a VLA on demonstrations with the project's one Trainer.

    demos (.npz) ─► instruction tokenizer (bilingual BPE trained on training instructions)
                ─► batches {pixel_values, input_ids, attention_mask, actions}
                ─► VLATask (loss, per-dimension accuracy) ─► Trainer ─► run/final (imagefm.load)

Layer: train (imports models, data-level robot modules and imagefm.train; no app, no eval).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imagefm.models.vla import VLA, VLAConfig, vla_config
from imagefm.robot.demos import Demonstrations
from imagefm.robot.expert import ACTION_BINS
from imagefm.robot.instructions import all_instructions
from imagefm.robot.sim import ZONE_COLOURS, allowed_combos
from imagefm.tokenizer import Tokenizer, train_bpe
from imagefm.train.config import TrainConfig
from imagefm.train.tasks import Metrics, unwrap
from imagefm.train.trainer import Trainer, seed_everything

MAX_TEXT_TOKENS = 24


def instruction_tokenizer(vocab_size: int = 800, max_tokens: int = MAX_TEXT_TOKENS) -> Tokenizer:
    """A byte-level BPE trained on every phrasing of the *training* combinations (en + ko).

    Held-out colour–shape pairs still tokenise (byte-level: no unknown token) and their words
    are all in the vocabulary, as each colour and shape occurs in training with other partners.
    Refuses a vocabulary so small that some instruction (of any pair) would be cut at
    ``max_tokens``: with 400 merges the Korean syllables took most of them, English stayed
    near character level (up to 53 tokens) and the first two attempts read "put the red circle
    in the blu" — the zone was cut off. 800 saturates the corpus (491 tokens, at most 14
    per instruction).
    """
    texts = all_instructions(allowed_combos("train"), ZONE_COLOURS)
    tokenizer = train_bpe(texts, vocab_size, context_length=max_tokens, min_frequency=2)
    # pieces() neither truncates nor adds BOS/EOS (2 more).
    length, longest = max((len(tokenizer.pieces(text)) + 2, text)
                          for text in all_instructions(allowed_combos("all"), ZONE_COLOURS))
    if length > max_tokens:
        raise ValueError(f"instructions would be cut: {longest!r} is {length} tokens > "
                         f"max_tokens = {max_tokens}; raise vocab_size or max_tokens")
    return tokenizer


class VLATask:
    """Cross-entropy of the action tokens (+ the pointer loss when the batch carries the true
    positions and the model points); reports the accuracy of each action dimension and, for a
    pointing model, the pointer loss and the mean distance of each pointer from the truth."""

    names = ("dx", "dy", "grip")
    pointers = ("gripper", "object", "zone")

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, Metrics]:
        out = model(batch["pixel_values"], batch.get("input_ids"), batch.get("attention_mask"),
                    actions=batch["actions"], positions=batch.get("positions"))
        correct = (out.logits.argmax(-1) == batch["actions"]).float().mean(0).detach()
        names = self.names if correct.numel() == len(self.names) else \
            [f"dim{d}" for d in range(correct.numel())]
        metrics: Metrics = {f"acc_{name}": correct[d] for d, name in enumerate(names)}
        if out.pointer_loss is not None:
            metrics["action_loss"] = out.action_loss.detach()
            metrics["pointer_loss"] = out.pointer_loss.detach()
            error = (out.positions - batch["positions"]).norm(dim=-1).mean(0).detach()
            metrics.update({f"err_{name}": error[k] for k, name in enumerate(self.pointers)})
        return out.loss, metrics


@dataclass
class DemoBatches:
    """Shuffled micro-batches of a demonstration set, deterministic per epoch (exact resume)."""

    images: torch.Tensor  # uint8 [N, S, S, 3]
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor
    actions: torch.Tensor  # [N, D]
    batch_size: int
    seed: int = 0
    mean: float = 0.5
    std: float = 0.5
    positions: torch.Tensor | None = None  # [N, 3, 2] true pointer targets, when recorded

    @classmethod
    def build(cls, demos: Demonstrations, tokenizer: Tokenizer, batch_size: int,
              seed: int = 0) -> DemoBatches:
        unique = sorted(set(demos.instructions))
        encoded = tokenizer(unique)
        row = {text: i for i, text in enumerate(unique)}
        index = torch.tensor([row[t] for t in demos.instructions], dtype=torch.long)
        positions = None if demos.positions is None else torch.from_numpy(demos.positions)
        return cls(torch.from_numpy(demos.images), encoded["input_ids"][index],
                   encoded["attention_mask"][index], torch.from_numpy(demos.actions),
                   batch_size, seed, positions=positions)

    def __call__(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.actions), generator=generator)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            rows = order[start:start + self.batch_size]
            pixels = self.images[rows].permute(0, 3, 1, 2).float() / 255.0
            batch = {"pixel_values": (pixels - self.mean) / self.std,
                     "input_ids": self.input_ids[rows],
                     "attention_mask": self.attention_mask[rows], "actions": self.actions[rows]}
            if self.positions is not None:
                batch["positions"] = self.positions[rows]
            yield batch


def train_config(run_dir: str | Path, *, steps: int, batch_size: int = 32, lr: float = 1e-3,
                 seed: int = 0, warmup: int = 100, progress: bool = True,
                 resume: bool = False) -> TrainConfig:
    """The Trainer settings of a VLA run (fp32 on CPU, one checkpoint at the end)."""
    run_dir = Path(run_dir)
    return TrainConfig.from_dict({
        "run": {"name": run_dir.name, "output_dir": str(run_dir.parent), "seed": seed,
                "checkpoint_every": max(steps, 1), "keep_last": 1, "log_every": 25,
                "progress": progress, "tensorboard": False, "resume": resume},
        "data": {"batch_size": batch_size},
        "optim": {"lr": lr, "weight_decay": 0.05, "warmup_steps": min(warmup, steps),
                  "min_lr_ratio": 0.05},
        "train": {"steps": steps, "precision": "fp32"},
    })


def build_vla(tokenizer: Tokenizer, image_size: int, *, language: bool = True,
              **overrides: Any) -> VLA:
    config: VLAConfig = vla_config(tokenizer.vocab_size, image_size=image_size,
                                   action_bins=ACTION_BINS,
                                   max_text_tokens=tokenizer.context_length,
                                   language=language, **overrides)
    model = VLA(config)
    model.tokenizer = tokenizer
    return model


def train_vla(demos: Demonstrations, run_dir: str | Path, *, steps: int, batch_size: int = 32,
              lr: float = 1e-3, language: bool = True, seed: int = 0, progress: bool = True,
              tokenizer: Tokenizer | None = None, resume: bool = False,
              init: VLA | None = None, warmup: int = 100,
              **model_overrides: Any) -> tuple[VLA, Path]:
    """Train a VLA (``language=False``: the language-blind control) on ``demos``; returns the
    trained model and the run folder (its ``final/`` loads with ``imagefm.load``).

    ``init``: start from this model's weights, config and tokenizer (a DAgger round continues
    the previous round's policy on the grown data set, with a fresh schedule)."""
    if len(demos) < batch_size:
        raise ValueError(f"{len(demos)} demonstration steps cannot fill one batch of "
                         f"{batch_size}: collect more episodes or lower the batch size")
    seed_everything(seed)
    if init is not None:
        tokenizer = init.tokenizer
        model = VLA(init.config)
        model.load_state_dict(init.state_dict())
        model.tokenizer = tokenizer
    else:
        tokenizer = tokenizer or instruction_tokenizer()
        model = build_vla(tokenizer, demos.images.shape[1], language=language,
                          **model_overrides)
    config = train_config(run_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress, resume=resume, warmup=warmup)
    batches = DemoBatches.build(demos, tokenizer, batch_size, seed)
    batches.mean, batches.std = model.config.image_mean, model.config.image_std
    trainer = Trainer(model, VLATask(), config, batches)
    folder = trainer.fit()
    return unwrap(trainer.model).eval(), folder


def demo_statistics(demos: Demonstrations) -> dict[str, Any]:
    """Counts that describe a demonstration set (for logs and docs)."""
    langs, counts = np.unique(np.asarray(demos.langs), return_counts=True)
    return {"steps": len(demos), "episodes": demos.episodes,
            "steps_per_language": {str(k): int(v) for k, v in zip(langs, counts, strict=True)},
            "grip_closed_fraction": float(demos.actions[:, 2].mean()) if len(demos) else 0.0}
