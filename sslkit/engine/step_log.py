"""The steps' scalars, read one step late (:class:`StepLog`): the loss checked (:class:`Diverged`), each
step's row sent to the callbacks and the progress display.

Under torchrun only rank 0 runs sslkit's own callbacks (``csv`` writes metrics.csv). A row it cannot write
(a full disk) stops the run in one line, as a checkpoint that cannot be written does; but a rank that raised
alone would leave the others in the next step's all-reduce (a gloo traceback on each, or a wait until the
group's timeout). So there the failure is held (:attr:`StepLog.failed`: no row is sent after it) and
reaches every rank where they meet: the next step's all-reduced scalars carry ``halt`` (read one step late,
as ``stop`` is), and a checkpoint first asks rank 0 (:meth:`StepLog.check`), so none is written past the
last row on disk. Every rank then stops with rank 0's line.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch

from sslkit.engine.events import Events
from sslkit.engine.log import Progress
from sslkit.engine.setup import Setup, on_main
from sslkit.engine.state import RunState
from sslkit.errors import UsageError


class Diverged(Exception):
    """The loss became NaN or infinite; the message says at which step."""


def diverged_message(s: Setup, loss: float, step: int) -> str:
    """Why training stopped at a non-finite ``loss``; the newest checkpoint is named only where one exists."""
    from sslkit.checkpoint import list_checkpoints

    if step == 1:  # the loss of the first batch, before any update: no LR can have caused it
        return first_loss_message(s, loss)
    saved = list_checkpoints(s.checkpoint_dir)
    where = f"; the last good checkpoint is {saved[-1]}" if saved else ""
    return (f"loss became {loss} at step {step}; training stopped and no checkpoint holds that step. Lower --lr "
            f"(now {s.schedule.peak_lr:g}) or set --grad-clip{where}")


def first_loss_message(s: Setup, loss: float) -> str:
    """A loss that was not finite at step 1, computed before any optimizer update: the task (its plugin
    named when third-party) or the data (or the ``--init`` weights) is the cause, not the LR."""
    from sslkit.plugins import get_plugins
    from sslkit.registry import plugin_of

    plugin = plugin_of("tasks", s.cfg.task)
    info = get_plugins().infos.get(plugin)
    task = f"task {s.cfg.task!r}" + ("" if info is not None and info.builtin else f" (plugin {plugin!r})")
    weights = ", or the --init weights" if s.cfg.init else ""
    return (f"loss became {loss} at step 1, on the first batch, before any optimizer update (the LR cannot be the "
            f"cause); training stopped. Suspect the loss of {task}, or the data (non-finite or extreme pixel values: "
            f"sslkit data inspect){weights}")


class StepLog:
    """Launched steps whose scalars are still on the device; reading them checks the loss
    and sends each step's row to the callbacks and the progress display."""

    def __init__(self, s: Setup, events: Events, progress: Progress) -> None:
        self.s, self.events, self.progress = s, events, progress
        self.pending: list[dict[str, Any]] = []
        self.images = 0
        self.last: dict[str, float] = {}
        self.requeue = False  # a rank was stopped by SIGTERM / SIGUSR1
        self.failed: UsageError | None = None  # under torchrun: a built-in callback's failed write, held (emit)

    def emit(self, event: str, *args: Any) -> None:
        """Send ``event`` to the callbacks. Under torchrun a failed write of sslkit's own (rank 0's
        metrics.csv) is held, not raised: it stops every rank where they next meet (the module docstring)."""
        if self.failed is not None:  # no row after the one that failed: --resume logs them again
            return
        try:
            self.events.emit(event, *args)
        except UsageError as exc:
            if self.s.world == 1:
                raise
            self.failed = exc

    def check(self) -> None:
        """Raise the held failure (rank 0; under :func:`~sslkit.engine.setup.on_main` every rank raises it)."""
        if self.failed is not None:
            raise self.failed

    def halted(self) -> None:
        """A step's all-reduced ``halt``: rank 0 holds a failed write; every rank stops with its line."""
        self.check()
        raise UsageError("process 0 could not write the run's record; see its error")

    def launched(self, state: RunState, lr: float, scalars: dict[str, torch.Tensor]) -> None:
        self.pending.append({"step": state.step, "epoch": state.epoch, "lr": lr, "scalars": scalars,
                             "seconds": None})

    def launch(self, step: Callable[[], dict[str, torch.Tensor]], state: RunState) -> None:
        """Launch the next step (``step()``: :func:`train_step`); when it raises, the steps launched
        before it, which completed, are logged first (a failure reading them yields to the step's own)."""
        try:
            scalars = step()
        except Exception:
            with contextlib.suppress(Exception):
                self.read(keep=0)
            raise
        self.launched(state, self.s.schedule.lr_at(state.step - 1), scalars)

    def timed(self, seconds: float) -> None:
        """The wall time of the newest launched step: its launch and the previous step's read."""
        self.pending[-1]["seconds"] = seconds

    def read(self, keep: int) -> bool:
        """Read, check and log all but the newest ``keep`` pending steps; True if asked to stop."""
        asked = False
        while len(self.pending) > keep:
            p = self.pending.pop(0)
            names = list(p["scalars"])
            values = dict(zip(names, torch.stack([p["scalars"][n].float().reshape(()) for n in names]).tolist()))
            if values.pop("halt", 0.0) > 0:
                self.halted()
            if not np.isfinite(values["loss"]):
                raise Diverged(diverged_message(self.s, values["loss"], p["step"]))
            self.images += self.s.step_images
            asked = values.pop("stop") > 0 or asked
            self.requeue = values.pop("requeue") > 0 or self.requeue
            grad_norm = values.pop("grad_norm", None)
            self.last = values
            ips = self.s.step_images / max(p["seconds"] or 0.0, 1e-9)
            row = {"step": p["step"], "epoch": p["epoch"], **values, "lr": p["lr"], "img_per_s": ips}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            self.emit("on_step_end", p["step"], {k: v for k, v in row.items() if k != "step"})
            self.progress.update(row)
        return asked
