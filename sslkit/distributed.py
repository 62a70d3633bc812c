"""Multi-process training: process group set-up, rank helpers, gathers with gradients.

Launch with torchrun, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``::

    torchrun --nproc-per-node 4 -m sslkit pretrain ...

The backend is NCCL when training on CUDA and gloo on CPU. Outside torchrun every helper
answers for a single process (rank 0 of 1), so code calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank under ``torchrun`` (0 for a single process)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of training processes (1 unless launched with ``torchrun``)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that logs and writes files."""
    return rank() == 0


def init(device_type: str, timeout_min: float = 30.0) -> bool:
    """Join the process group torchrun described (``nccl`` on CUDA, ``gloo`` on CPU).

    Returns whether this call created the group (and so :func:`teardown` should end it).
    """
    if not launched() or is_initialized():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    return True


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, in place (identity for one process)."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.n
        return grad[start : start + ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(n, ...)`` on each of ``W`` ranks -> ``(W * n, ...)``, rank order, differentiable.

    Each rank's loss may use every rank's rows (e.g. the global batch as negatives of a
    contrastive loss). The backward pass sends each rank the sum over ranks of the
    gradient with respect to its rows, so with DDP's gradient averaging the update equals
    that of ``mean_r loss_r`` computed in one process. Every rank must pass the same
    ``n``. One process: ``x`` itself.
    """
    if not (is_initialized() and world_size() > 1):
        return x
    return _GatherWithGrad.apply(x)
