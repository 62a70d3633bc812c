"""Multi-process training: process group set-up, rank helpers, gathers with gradients.

Launch with torchrun, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``::

    torchrun --nproc-per-node 4 -m sslkit pretrain ...

The backend is NCCL when training on CUDA and gloo on CPU. Outside torchrun every helper
answers for a single process (rank 0 of 1), so code calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import time
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from sslkit.errors import UsageError, first_line
from sslkit.preempt import Preempted, in_group, unwinding

T = TypeVar("T")


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return in_group()


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


#: how long a rank waits for the others' turn of :func:`rank0_first` (a first decode of a large data set
#: takes hours, which the process group's collective timeout, 30 minutes, would cut short)
TURN_WAIT_LIMIT_S = 7 * 24 * 3600.0
#: seconds between two looks at the store while waiting for a turn (one small request each)
TURN_POLL_S = 0.25
_TURNS = itertools.count()  # every rank calls rank0_first in the same order: the same keys


class _Told(Exception):
    """Raised for what another rank posted: not posted again."""


def rank0_first(fn: Callable[[], T], what: str, interruptible: bool = True) -> T:
    """``fn()`` on rank 0, then on every other rank at once (e.g. rank 0 fills the disk cache,
    then the others read it). The ranks waiting for a turn poll the process group's store
    instead of a collective, so a turn may take longer than the group's timeout; they wait
    at most :data:`TURN_WAIT_LIMIT_S`, and a rank that dies ends the wait (its store
    connection, or torchrun, which stops the group). A user error, pre-emption signal
    (:func:`~sslkit.preempt.unwinding`: raised during ``fn`` only, so a turn is either
    posted by all of its ranks or stopped by one) or crash in ``fn`` is posted in place of
    the turn's outcome, and every rank stops with it (the first posted) as soon as it looks.
    ``what``: the work, for messages ("decoding the data"). ``interruptible=False``: a pre-emption
    stays deferred through ``fn`` (to the first step, which checkpoints and records it). One process: ``fn()``."""
    if not (is_initialized() and world_size() > 1):
        return fn()
    store = dist.distributed_c10d._get_default_store()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted group's keys are its own
    tag, me, result = f"sslkit/turn-{restart}-{next(_TURNS)}", rank(), None
    try:
        for turn, ranks in enumerate(([0], range(1, world_size()))):
            if me in ranks:
                with unwinding() if interruptible else contextlib.nullcontext():  # a pre-emption stops the
                    # work at once: the others learn it below
                    result = fn()
                store.set(f"{tag}/{turn}/{me}", "ok")
            _await_turn(store, tag, [f"{tag}/{turn}/{r}" for r in ranks], what)
    except _Told as told:
        _leave(store, tag, me)
        raise told.__cause__ from None
    except BaseException as exc:
        kind = "usage" if isinstance(exc, UsageError) else "preempted" if isinstance(exc, Preempted) else "failed"
        with contextlib.suppress(Exception):  # the first one posted counts; the store gone: nothing to tell
            store.compare_set(f"{tag}/abort", "", f"{kind}:{exc if kind != 'failed' else type(exc).__name__}")
        _leave(store, tag, me)
        raise
    return result


#: how long rank 0 stays, after a turn stopped, for the others to read why (they look every TURN_POLL_S)
TOLD_WAIT_S = 10.0


def _leave(store: Any, tag: str, me: int) -> None:
    """Leaving a stopped :func:`rank0_first`: the others say they read why; rank 0, which holds
    the store where torchrun's agent does not (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, other
    launchers), waits for them (at most :data:`TOLD_WAIT_S`), so they stop with the reason
    (a pre-emption exits as one), not with a lost connection."""
    with contextlib.suppress(Exception):
        if me != 0:
            store.add(f"{tag}/told", 1)
            return
        deadline = time.monotonic() + TOLD_WAIT_S
        while store.add(f"{tag}/told", 0) < world_size() - 1 and time.monotonic() < deadline:
            time.sleep(TURN_POLL_S / 5)


def _await_turn(store: Any, tag: str, keys: list[str], what: str) -> None:
    """Wait until every key is posted, without the collective timeout; raise what a rank posted
    under ``TAG/abort`` (as :class:`_Told`, its cause the exception to raise)."""
    deadline, abort = time.monotonic() + TURN_WAIT_LIMIT_S, f"{tag}/abort"
    try:
        while not store.check(keys):
            if store.check([abort]):
                kind, _, text = store.get(abort).decode().partition(":")
                told = (Preempted(text) if kind == "preempted" else UsageError(text) if kind == "usage" else
                        UsageError(f"a process failed while {what} ({text}); see its messages"))
                raise _Told() from told
            if time.monotonic() > deadline:
                raise UsageError(f"waited {TURN_WAIT_LIMIT_S / 3600:.0f} h for the other processes "
                                 f"{what}; giving up")
            time.sleep(TURN_POLL_S)
    except (RuntimeError, OSError) as exc:  # DistStoreError, DistNetworkError: the store's host ended
        raise UsageError(f"lost contact with the other processes while {what} "
                         f"({first_line(exc)}); one of them stopped: see its messages") from None


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
