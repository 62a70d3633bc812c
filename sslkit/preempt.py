"""Pre-emption before the training loop: SIGTERM / SIGUSR1 unwind ``sslkit pretrain`` and it
exits :data:`EXIT_REQUEUE`. Torch-free, so the command installs it first thing, before torch
is imported (seconds in which the signal used to kill the process: exit 143 or 138). The loop's
own handling is :class:`sslkit.engine.signals.StopSignal`.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

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


#: whether the training loop (its :class:`StopSignal`) has begun in this ``sslkit pretrain``
_PHASE = {"loop": False}


@contextmanager
def preemptible() -> Iterator[None]:
    """Around a whole ``sslkit pretrain``: a pre-emption signal that arrives before the training
    loop raises :class:`Preempted` (once: the unwinding is not cut short by a second signal)
    instead of killing the process (exit 143), so the command can exit :data:`EXIT_REQUEUE`.
    After the loop (its last checkpoint written, the final files being written) one is noted
    and the run finishes: there is nothing left to requeue."""
    raised = []

    def handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        if _PHASE["loop"]:
            print(f"{name}: training is done; finishing the run's final files", file=sys.stderr)
        elif not raised:
            raised.append(name)
            raise Preempted(name)

    old = {}
    _PHASE["loop"] = False
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, handle) for sig in REQUEUE_SIGNALS}
    try:
        yield
    finally:
        _PHASE["loop"] = False
        for sig, handler in old.items():
            signal.signal(sig, handler)
