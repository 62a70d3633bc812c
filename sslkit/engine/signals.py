"""Signals that stop a run cleanly: finish the current step, checkpoint, return.

* SIGINT (Ctrl-C): stop after the step in flight and checkpoint; the command exits 0
  with the line to resume. A second SIGINT aborts at once (KeyboardInterrupt).
* SIGTERM, SIGUSR1 (a scheduler pre-empting the job; SLURM's ``--signal=USR1@120``):
  the same, then the command exits with :data:`EXIT_REQUEUE` (75, ``EX_TEMPFAIL``: "try
  again"), so a job script can requeue itself; ``--resume auto`` continues exactly.

Before the loop starts (resolving, decoding, building), SIGTERM / SIGUSR1 unwind the
command as Ctrl-C does (:class:`Preempted`, under :func:`preemptible`), and it exits 75 too:
there is nothing to checkpoint yet, and the requeued ``--resume auto`` starts again.

Only the main thread can install handlers; elsewhere the signals keep their default
behaviour. Under DDP each rank's request is all-reduced with the step's scalars, so all
ranks stop after the same step.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from sslkit import distributed
from sslkit.engine.log import note

#: exit status of ``sslkit pretrain`` stopped by SIGTERM / SIGUSR1 after checkpointing
EXIT_REQUEUE = 75
REQUEUE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Context manager: ``requested`` turns True when a stop signal arrives; ``requeue``
    when that signal was SIGTERM or SIGUSR1 (pre-emption) rather than Ctrl-C."""

    SIGNALS = (signal.SIGINT, *REQUEUE_SIGNALS)

    def __init__(self) -> None:
        self.requested = False
        self.requeue = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.requeue = self.requeue or signum in REQUEUE_SIGNALS
        if distributed.is_main():
            note(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                 f"(Ctrl-C again to abort now)")

    def __enter__(self) -> "StopSignal":
        _PHASE["loop"] = True  # from here on, preemptible() no longer unwinds the command
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Preempted(KeyboardInterrupt):
    """SIGTERM / SIGUSR1 before the training loop: unwinds (temporary files removed) as Ctrl-C does."""


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
            note(f"{name}: training is done; finishing the run's final files")
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
