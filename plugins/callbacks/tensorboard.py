"""Callback ``tensorboard``: every logged scalar but ``epoch`` as ``train/<name>`` in ``RUN_DIR/tensorboard/``.

On ``--resume`` the steps past the checkpoint that a killed run had logged are purged, so a
curve has one value per step.

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
        # a resume drops what a killed run logged past its checkpoint: steps it trains again
        purge = {"purge_step": run.start_step + 1} if run.resumed else {}
        self.writer = self._writer_cls(str(run.out / FOLDER), **purge)

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
