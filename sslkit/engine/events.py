"""Events of a run for callbacks: loggers, trackers, anything that observes training.

A callback is an object with any of these methods (subclass :class:`Callback`, which
has them all, doing nothing)::

    on_run_start(run: RunInfo)             the run directory, config, step to start from
    on_step_end(step: int, metrics: dict)  after every optimizer step (1-based ``step``);
                                           ``metrics``: epoch, loss, lr, img_per_s, the task's
                                           scalars, grad_norm with clipping (floats)
    on_checkpoint(path: Path)              a checkpoint folder was written
    on_run_end(summary: dict)              always, also after a failure (``summary["status"]``)

Callbacks run on rank 0 only unless their class sets ``all_ranks = True``. A callback
that raises is reported in one line naming it, and not called again; the run goes on.
Plugins register callback factories with the ``register_callbacks`` hook; ``--callbacks``
picks them by name (:func:`sslkit.engine.callbacks.create_callbacks`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslkit.errors import first_line

EVENTS = ("on_run_start", "on_step_end", "on_checkpoint", "on_run_end")


@dataclass(frozen=True)
class RunInfo:
    """What ``on_run_start`` receives. ``info`` is the ``run.json`` record (task, backbone,
    ``config``, ``input_spec``, dataset counts, environment); ``start_step`` is 0 for a new
    run and the checkpoint's step on resume; ``total_steps`` the schedule's horizon."""

    out: Path
    info: dict[str, Any]
    start_step: int
    total_steps: int
    rank: int
    world_size: int

    @property
    def resumed(self) -> bool:
        return self.start_step > 0

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config", {})


class Callback:
    """Base class of run callbacks; override the events you need (see the module docstring)."""

    #: called on every rank (True) or on rank 0 only (False, the default)
    all_ranks: bool = False

    def on_run_start(self, run: RunInfo) -> None:
        """The run directory exists, the state is restored, no step has run yet."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Optimizer step ``step`` (1-based) is done and its scalars are read."""

    def on_checkpoint(self, path: Path) -> None:
        """Checkpoint folder ``path`` is complete on disk."""

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """The run ended: ``status`` (finished, interrupted, diverged, failed), ``steps``,
        ``final_loss``, ``encoder`` (path of ``encoder.safetensors`` when written)."""


class Events:
    """Sends each event to the active callbacks, ``(label, callback)`` pairs in order."""

    def __init__(self, callbacks: list[tuple[str, Any]], rank: int = 0) -> None:
        self.active = [(label, cb) for label, cb in callbacks if rank == 0 or getattr(cb, "all_ranks", False)]

    def emit(self, event: str, *args: Any) -> None:
        for label, cb in list(self.active):
            method = getattr(cb, event, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception as exc:  # a logger must not take the run down
                self.active.remove((label, cb))
                why = first_line(exc)
                print(f"sslkit: callback {label} raised {type(exc).__name__} in {event}: {why}; "
                      f"disabled for the rest of this run", file=sys.stderr, flush=True)
