"""Worker for the multi-process loss tests (spawned processes must import it by name).

Every rank builds the same tiny two-tower model and the same global batch from fixed seeds, takes
its contiguous slice of rows, computes a distributed loss, runs backward and then averages the
parameter gradients over ranks exactly as DistributedDataParallel would. Results go to
``<out_dir>/rank<r>.pt`` for the parent test to compare with a single process on the global batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from imagefm.losses import clip_loss, siglip_loss

GLOBAL_BATCH = 6  # divisible by the world sizes under test (2 and 3)
IMAGE_DIM, TEXT_DIM, EMBED_DIM = 5, 7, 4

# name -> keyword arguments of the loss; "loss" picks the function.
CASES: dict[str, dict] = {
    "clip_local": {"loss": "clip", "local_loss": True, "gather_with_grad": True},
    "clip_full": {"loss": "clip", "local_loss": False, "gather_with_grad": True},
    "clip_full_detached": {"loss": "clip", "local_loss": False, "gather_with_grad": False},
    "siglip": {"loss": "siglip"},
}


class TinyDualEncoder(nn.Module):
    """Two linear "towers" plus the learnable temperature and bias of CLIP/SigLIP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_tower = nn.Linear(IMAGE_DIM, EMBED_DIM, dtype=torch.float64)
        self.text_tower = nn.Linear(TEXT_DIM, EMBED_DIM, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0, dtype=torch.float64))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_features = F.normalize(self.image_tower(images), dim=-1)
        text_features = F.normalize(self.text_tower(texts), dim=-1)
        return image_features, text_features


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, IMAGE_DIM, generator=generator, dtype=torch.float64)
    texts = torch.randn(GLOBAL_BATCH, TEXT_DIM, generator=generator, dtype=torch.float64)
    return images, texts


def loss_and_grads(
    model: TinyDualEncoder, images: torch.Tensor, texts: torch.Tensor, case: str, distributed: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward of ``case``; returns the loss and a copy of every parameter gradient."""
    options = dict(CASES[case])
    model.zero_grad(set_to_none=True)
    image_features, text_features = model(images, texts)
    scale = model.log_scale.exp()
    if options.pop("loss") == "clip":
        loss = clip_loss(image_features, text_features, scale, distributed=distributed, **options)
    else:
        loss = siglip_loss(
            image_features, text_features, scale, model.logit_bias, distributed=distributed
        )
    loss.backward()
    grads = {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }
    return loss.detach(), grads


def run_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    torch.set_num_threads(1)  # the ranks share a small machine
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        model = TinyDualEncoder()
        images, texts = global_batch()
        rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        results = {}
        for case in CASES:
            loss, grads = loss_and_grads(model, images[rows], texts[rows], case, distributed=True)
            for grad in grads.values():  # DDP semantics: average gradients over ranks
                dist.all_reduce(grad)
                grad /= world_size
            results[case] = {"loss": loss, "grads": grads}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def uneven_toy_source(config, model, info):
    """``data.source=_dist_worker:uneven_toy_source``: the toy pairs, but rank r's loader yields
    2 + r batches an epoch (a stream whose shards split unevenly over ranks)."""
    from imagefm.train.data import toy_source

    make_loader = toy_source(config, model, info)
    make_loader.batches_per_epoch = 2 + info.rank
    return make_loader
