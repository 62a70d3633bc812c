"""Callback ``tensorboard``: every logged scalar but ``epoch`` as ``train/<name>`` in ``RUN_DIR/tensorboard/``.

Each session purges the steps from the one it starts at on that an earlier session logged
(a killed run's steps past its checkpoint; all of them on a resume from step 0, a run killed
before its first checkpoint), so a curve has one value per step.

Needs the ``tensorboard`` package (``pip install tensorboard``); without it the run
refuses to start with one line saying so.
"""

from __future__ import annotations

from typing import Any

from sslkit.api import Callback, RunInfo, UsageError, hookimpl

FOLDER = "tensorboard"


class TensorBoard(Callback):
    """torch's SummaryWriter, one scalar per metric and step."""

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--callbacks tensorboard needs the tensorboard package: pip install tensorboard") \
                from None
        self._writer_cls = SummaryWriter
        self.writer = None

    def on_run_start(self, run: RunInfo) -> None:
        # drop what an earlier session logged from here on: the steps this one trains again (a resume
        # from step 0, of a run killed before its first checkpoint, too; a new run's folder has none)
        self.writer = self._writer_cls(str(run.out / FOLDER), purge_step=run.start_step + 1)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if k != "epoch":
                self.writer.add_scalar(f"train/{k}", v, step)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@hookimpl
def register_callbacks(register):
    register("tensorboard", TensorBoard)
