"""Signals that stop a run cleanly: finish the current step, checkpoint, return.

SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the step in flight; a second
SIGINT aborts at once (KeyboardInterrupt). Only the main thread can install handlers;
elsewhere the signals keep their default behaviour.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from sslkit import distributed
from sslkit.engine.log import note


class StopSignal:
    """Context manager: ``requested`` turns True when a stop signal arrives."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if distributed.is_main():
            note(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                 f"(Ctrl-C again to abort now)")

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
