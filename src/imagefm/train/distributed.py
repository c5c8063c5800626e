"""torchrun support: process-group set-up and teardown, DDP / FSDP2 wrapping, small collectives.

    torchrun --nproc-per-node 2 -m imagefm.train config.yaml

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_distributed``
reads them and starts a process group (nccl on GPUs, gloo on CPU). Without them it is a
single process and nothing is initialised. The Trainer itself never initialises anything: it
uses whatever process group exists, so tests can start their own.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current() -> DistInfo:
    """The running process group's rank and size (a single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Start the process group torchrun describes in the environment, if there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        return current()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: "
                           f"launch with torchrun")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=timedelta(minutes=timeout_minutes))
    return current()


def teardown() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(choice: str, info: DistInfo) -> torch.device:
    """``auto`` means this rank's GPU when there is one, else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is available; use run.device=cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", info.local_rank)


def wrap_model(model: nn.Module, strategy: str, device: torch.device,
               ) -> tuple[nn.Module, list[nn.Parameter]]:
    """DDP, or FSDP2 (``fully_shard`` on every transformer block, then on the root).

    Returns the model to call and the parameters whose gradients the caller must average
    itself: FSDP2 cannot shard scalars (``logit_scale``, ``logit_bias``), so they stay
    replicated outside it.
    """
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), []
    from torch.distributed.fsdp import fully_shard

    # DualEncoderOutput holds views (logits.t(), the bias parameter); nothing edits them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for module in list(model.modules()):
        for name, child in module.named_children():
            if name in ("blocks", "layers") and isinstance(child, nn.ModuleList):
                for block in child:
                    fully_shard(block)
    fully_shard(model, ignored_params=scalars or None)
    broadcast_tensors(sorted(scalars, key=id))  # identical start everywhere, as DDP ensures
    return model, [p for p in model.parameters() if p in scalars and p.requires_grad]


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(model, FSDPModule)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a tensor over ranks (the tensor itself in a single process)."""
    if not current().enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks, one flat all-reduce per dtype (DDP's result, no overlap)."""
    world_size = current().world_size
    if world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (a collective: every rank must call it); others as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` sharded the way DTensor ``like`` is (``full`` itself when ``like`` is plain)."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)


def broadcast_parameters(model: nn.Module) -> None:
    """Give every rank rank 0's weights (DDP does this when it wraps; GradCache does not wrap)."""
    broadcast_tensors(list(model.parameters()) + list(model.buffers()))


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    if not current().enabled:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The global gradient norm, clipping gradients to ``max_norm`` (``inf``: no clipping).

    Works with a mix of FSDP-sharded (DTensor) and plain gradients, which torch's own
    ``clip_grad_norm_`` refuses to combine: each kind's norm is taken separately.
    """
    kinds: dict[bool, list[nn.Parameter]] = {}  # sharded or not -> parameters with gradients
    for p in params:
        if p.grad is not None:
            kinds.setdefault(hasattr(p.grad, "device_mesh"), []).append(p)
    squared = 0.0
    for group in kinds.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        squared += float(full_tensor(norm)) ** 2
    total = squared**0.5
    if math.isfinite(max_norm) and total > max_norm:
        scale = max_norm / (total + 1e-6)  # a Python float multiplies sharded and plain alike
        for group in kinds.values():
            for p in group:
                p.grad.mul_(scale)
    return total


def clip_grad_norm_on_device(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """:func:`clip_grad_norm` without reading the norm back to the host: the norm as a device
    tensor, gradients scaled by ``min(1, max_norm / norm)`` on the device. Sharded (DTensor)
    gradients fall back to :func:`clip_grad_norm`."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(hasattr(g, "device_mesh") for g in grads):
        return torch.tensor(clip_grad_norm(params, max_norm))
    total = torch.nn.utils.get_total_norm(grads)
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None],
                                             max_norm, total)
    return total


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not current().enabled:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        dist.barrier()
