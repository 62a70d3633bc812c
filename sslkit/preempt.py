"""Pre-emption before the training loop: SIGTERM / SIGUSR1 unwind ``sslkit pretrain`` and it
exits :data:`EXIT_REQUEUE`. Torch-free, so the command installs it first thing, before torch
is imported (seconds in which the signal used to kill the process: exit 143 or 138). Under
torchrun the processes stop together at the first step instead (:func:`preemptible`). The
loop's own handling is :class:`sslkit.engine.signals.StopSignal`.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from sslkit.errors import say

#: exit status of ``sslkit pretrain`` stopped by SIGTERM / SIGUSR1 after checkpointing
EXIT_REQUEUE = 75
REQUEUE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def requeue_exit() -> int:
    """The exit status of a pre-empted ``sslkit pretrain``: :data:`EXIT_REQUEUE`, but 0 under
    torchrun (``TORCHELASTIC_RUN_ID``), whose agent takes any other status of a worker for a
    crash and, with ``--max-restarts``, restarts the group, which would train on past the
    pre-emption; torchrun's own status never passes a worker's on, so a job script reads
    run.json's ``"status": "interrupted"`` there (``examples/slurm/pretrain.sbatch``)."""
    import os

    return 0 if os.environ.get("TORCHELASTIC_RUN_ID") else EXIT_REQUEUE


class Preempted(KeyboardInterrupt):
    """SIGTERM / SIGUSR1 before the training loop: unwinds (temporary files removed) as Ctrl-C does."""


class Terminated(KeyboardInterrupt):
    """SIGTERM in any other command (``export``, ``embed``, ``eval``, ``data cache``): unwinds as
    Ctrl-C does, so a half-written output's temporary file is removed, and the command exits 143."""


#: exit status of a command other than ``pretrain`` stopped by SIGTERM (128 + 15, as the signal would give)
EXIT_TERMINATED = 143


@contextmanager
def terminable() -> Iterator[None]:
    """Around every command: SIGTERM (sent by ``timeout``, systemd, SLURM, Kubernetes) raises
    :class:`Terminated` once instead of killing the process before its ``finally`` blocks run.
    ``sslkit pretrain`` installs :func:`preemptible` inside it."""
    raised = []

    def handle(signum, frame) -> None:
        if not raised:
            raised.append(signum)
            raise Terminated(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


#: ``loop``: whether the training loop (its :class:`StopSignal`) has begun in this ``sslkit pretrain``;
#: ``deferred``: the pre-emption signal this process of a torchrun group got before the loop (or None);
#: ``raised``: whether :class:`Preempted` was raised (once); ``unwind``: inside :func:`unwinding`
_PHASE: dict = {"loop": False, "deferred": None, "raised": False, "unwind": False}


def in_group() -> bool:
    """Whether this process is one of several (torchrun's ``WORLD_SIZE`` > 1), without torch."""
    import os

    world = os.environ.get("WORLD_SIZE", "1").strip()
    return world.isdigit() and int(world) > 1


def pending() -> str | None:
    """The pre-emption signal (``"SIGUSR1"``) this process of a torchrun group got before the
    training loop, deferred until the processes agree at the first step (see :func:`preemptible`)."""
    return _PHASE["deferred"]


@contextmanager
def preemptible() -> Iterator[None]:
    """Around a whole ``sslkit pretrain``: a pre-emption signal that arrives before the training
    loop raises :class:`Preempted` (once: the unwinding is not cut short by a second signal)
    instead of killing the process (exit 143), so the command can exit :data:`EXIT_REQUEUE`.
    Under torchrun (``WORLD_SIZE`` > 1) one process unwinding alone would leave the others in a
    collective it never joins (a gloo error, or a 30-minute wait at the rendezvous), so there the
    signal is only noted (:func:`pending`) and the processes agree on it in one all-reduce before
    the first step (:func:`sslkit.engine.loop.train`), then stop together; except in
    :func:`unwinding`. After the loop (its last checkpoint written, the final files being written)
    one is noted and the run finishes: there is nothing left to requeue."""

    def handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        if _PHASE["loop"]:
            say(f"{name}: training is done; finishing the run's final files")
        elif _PHASE["raised"]:
            pass
        elif in_group() and not _PHASE["unwind"]:
            if _PHASE["deferred"] is None:
                _PHASE["deferred"] = name
                say(f"{name}: stopping at the first step, where every process learns of it "
                     f"(nothing to checkpoint yet)")
        else:
            _PHASE["raised"] = True
            raise Preempted(name)

    old = {}
    _PHASE.update(loop=False, deferred=None, raised=False, unwind=False)
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, handle) for sig in REQUEUE_SIGNALS}
    try:
        yield
    finally:
        _PHASE.update(loop=False, deferred=None, unwind=False)
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def unwinding() -> Iterator[None]:
    """Under torchrun, around pre-loop work where every other process learns of a :class:`Preempted`
    raised here without a collective (a turn of :func:`sslkit.distributed.rank0_first`, whose
    outcome the others read from the store): a pre-emption deferred before, or arriving inside,
    raises at once instead of waiting for the first step (a first decode can take minutes)."""
    before = _PHASE["unwind"]
    _PHASE["unwind"] = True
    try:
        if _PHASE["deferred"] and not (_PHASE["loop"] or _PHASE["raised"]):
            _PHASE["raised"] = True
            raise Preempted(_PHASE["deferred"])
        yield
    finally:
        _PHASE["unwind"] = before
