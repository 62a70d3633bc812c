"""Signals that stop a run cleanly: finish the step in flight (under torchrun, where the processes agree
through the next step's all-reduce, one more), checkpoint, return.

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
from typing import Any

from sslkit import distributed
from sslkit.engine.log import note
from sslkit.preempt import _PHASE, EXIT_REQUEUE, REQUEUE_SIGNALS, Preempted, preemptible  # noqa: F401 (re-exported)
from sslkit.preempt import requeue_exit


def _then(signum: int) -> str:
    """What the stop note says comes next: after Ctrl-C, that a second one aborts; after a pre-emption
    signal (which a second one does not hasten), the exit status a job script requeues on."""
    if signum not in REQUEUE_SIGNALS:
        return " (Ctrl-C again to abort now)"
    code = requeue_exit()
    return (f", then exiting {code} so that the job can be requeued" if code else
            ", then exiting 0 (torchrun would restart on any other status; run.json says interrupted)")


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
            when = "at most two more steps (the processes agree on it)" if distributed.world_size() > 1 else "this step"
            note(f"{signal.Signals(signum).name}: stopping after {when} and writing a checkpoint{_then(signum)}")

    def __enter__(self) -> "StopSignal":
        _PHASE["loop"] = True  # from here on, preemptible() no longer unwinds the command
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
