"""The Trainer's side of the data protocol (train/data.py): loaders, epochs, resume, agreement.

``epoch_batches`` turns ``make_loader(epoch)`` into one endless stream of ``(epoch, index,
batch)``: it starts a resumed run at the right batch (``skip_batches`` when the loader has it,
else by dropping batches) and, under torch.distributed, ends an epoch on every rank as soon as
one rank's loader is exhausted (an all_reduce MIN of "I have a batch" per batch, on the host
over gloo), so ranks whose loaders yield different numbers of batches never wait for each other
forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from imagefm.train import distributed
from imagefm.train.errors import TrainingError

LoaderFactory = Callable[[int], Iterable[dict]]


def as_loader_factory(source: LoaderFactory | Iterable[dict]) -> LoaderFactory:
    """Accept ``make_loader(epoch)`` or a re-iterable such as a DataLoader."""
    if callable(source) and not hasattr(source, "__iter__"):
        return source

    def make_loader(epoch: int) -> Iterable[dict]:
        # Loaders that reshuffle per epoch say so with set_epoch (imagefm.data's loaders),
        # DataLoaders through their sampler (DistributedSampler).
        for owner in (source, getattr(source, "sampler", None)):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
        return source

    return make_loader


def every_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (a collective under torch.distributed)."""
    if not distributed.current().enabled:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=_host_group())
    return bool(value.item())


_HOST_GROUPS: dict[int, Any] = {}


def _host_group() -> Any:
    """A gloo group over all ranks for host-side flags. On the default group a GPU backend
    (nccl) would order the flag after every queued kernel, and reading it back would wait for
    the whole step: once per batch, the very sync ``train.host_sync=log`` avoids."""
    world = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return world
    if id(world) not in _HOST_GROUPS:  # created once per process group, by every rank at once
        _HOST_GROUPS.clear()
        _HOST_GROUPS[id(world)] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[id(world)]


_END = object()


def agreed_batches(iterator: Iterator[dict], more: Callable[[], bool] = lambda: True
                   ) -> Iterator[dict]:
    """The batches of ``iterator`` while every rank has one (and ``more()`` holds everywhere)."""
    while True:
        batch = next(iterator, _END)
        if not every_rank(batch is not _END and more()):
            return
        yield batch  # type: ignore[misc]


def epoch_batches(make_loader: LoaderFactory, epoch: int, skip: int
                  ) -> Iterator[tuple[int, int, dict]]:
    """``(epoch, index in epoch, batch)`` forever, from batch ``skip`` of ``epoch`` on."""
    while True:
        loader = make_loader(epoch)
        index = 0
        if skip and callable(getattr(loader, "skip_batches", None)):
            loader.skip_batches(skip)  # the loader starts at batch `skip` itself
            index = skip
        iterator = iter(loader)
        while index < skip and next(iterator, _END) is not _END:
            index += 1  # no fast path: read and drop the batches a resumed run already did
        produced = 0
        for batch in agreed_batches(iterator):
            produced += 1
            yield epoch, index, batch
            index += 1
        if produced == 0 and skip == 0:
            raise TrainingError(f"make_loader({epoch}) yielded no batches: the data source is "
                                 f"empty (or smaller than one batch)")
        epoch, skip = epoch + 1, 0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def batch_rows(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0
