"""Rank helpers that fall back to a single process, process-group setup, and small collectives.

Everything here works without ``torch.distributed`` being initialised (one process, rank 0 of 1), so
the trainer, the tests and the tools call the same functions everywhere. The process group is never
created at import time: :func:`init_distributed` does it, from the environment ``torchrun`` sets.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext", "init_distributed", "destroy_distributed", "select_device", "is_distributed",
    "get_rank", "get_world_size", "get_local_rank", "is_main_process", "barrier", "all_gather_tensor",
    "all_gather_autograd",
    "all_gather_object", "broadcast_object", "all_reduce_sum", "scale_gradient",
]


def is_distributed() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Rank on this node (``LOCAL_RANK`` from torchrun), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def select_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """Pick this process's device: ``"auto"`` means CUDA ``local_rank`` when available, else CPU.

    On CUDA the current device is also set, so that NCCL and ``torch.cuda`` calls without an
    explicit index use the right GPU.
    """
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"runtime.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    local_rank = get_local_rank() if local_rank is None else local_rank
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but torch.cuda.is_available() is False")
    chosen = torch.device(device) if device.startswith("cuda:") else torch.device("cuda", local_rank)
    torch.cuda.set_device(chosen)
    return chosen


@dataclass(frozen=True)
class DistContext:
    """What :func:`init_distributed` decided: who we are and where we compute."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, device: str = "auto",
                     timeout_s: float = 1800.0) -> DistContext:
    """Set up the default process group from the ``torchrun`` environment, or run as one process.

    ``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
    without them (plain ``python -m ...``) no process group is created and rank 0 of 1 is returned.
    ``backend=None`` chooses NCCL when the selected device is CUDA and gloo on CPU. Calling it again
    after the group exists just returns the context.
    """
    local_rank = get_local_rank()
    chosen_device = select_device(device, local_rank)
    if is_distributed():
        return DistContext(get_rank(), get_world_size(), local_rank, chosen_device, dist.get_backend())
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistContext(0, 1, 0, chosen_device, None)
    if backend is None:
        backend = "nccl" if chosen_device.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    kwargs: dict[str, Any] = {"backend": backend, "timeout": dt.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        # Binding the group to the device lets NCCL create its communicator eagerly on the right GPU.
        kwargs["device_id"] = chosen_device
    dist.init_process_group(**kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen_device, backend)


def destroy_distributed() -> None:
    """Tear the default process group down if there is one."""
    if is_distributed():
        dist.destroy_process_group()


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along dim 0 (no autograd; see
    ``torch.distributed.nn.functional.all_gather`` for the differentiable one)."""
    if get_world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((get_world_size() * tensor.shape[0], *tensor.shape[1:]),
                      dtype=tensor.dtype, device=tensor.device)
    # all_gather_single is the non-deprecated name from torch 2.14 on; older torch has only the other.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor)
    return out


def all_gather_autograd(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable concatenation over ranks along dim 0 (equal shapes on every rank).

    PyTorch's functional collective: the backward is ONE reduce-scatter (sum) of the incoming
    gradient, i.e. each rank's slice receives the sum of what every rank's graph contributed to it.
    """
    if get_world_size() == 1:
        return tensor
    try:
        from torch.distributed._functional_collectives import all_gather_single
    except ImportError:  # torch < 2.14: the (now deprecated) autograd-aware collective
        import torch.distributed.nn.functional as dist_nn

        return torch.cat(dist_nn.all_gather(tensor), dim=0)
    gathered = all_gather_single(tensor.contiguous(), 0, dist.group.WORLD)
    # Materialise the async result so callers get a plain tensor.
    return gathered.wait() if hasattr(gathered, "wait") else gathered


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no autograd); returns the tensor for chaining."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``factor`` in the backward.

    Why the trainer needs it: :class:`arcface.head.partial_fc.PartialFC` returns the mean loss over the
    GLOBAL batch and gives each rank's embeddings exactly the gradient of that loss. DDP then AVERAGES
    the backbone gradients over the ``W`` ranks, i.e. divides the (already complete) sum of the
    per-sample contributions by ``W``. Putting ``scale_gradient(embeddings, world_size)`` between the
    DDP backbone and PartialFC cancels that division, so backbone gradients equal those of the dense
    single-process computation on the global batch.
    """
    if factor == 1:
        return tensor
    return _ScaleGradient.apply(tensor, float(factor))
