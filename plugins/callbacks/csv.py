"""Callback ``csv``: ``RUN_DIR/metrics.csv``, one row per optimizer step (the default).

Columns: ``step, epoch, loss, lr, img_per_s``, then every other scalar of the first row
in alphabetical order (the task's own scalars, ``grad_norm`` with clipping); fixed by the
first row. Floats are written with 9 significant digits (``img_per_s`` with one
decimal), so a resumed run's rows can be compared with an uninterrupted run's as text.
Resuming first drops the rows logged after the checkpoint's step, so the file holds
every step exactly once.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sslkit.api import Callback, RunInfo, hookimpl, write_atomic

METRICS_FILE = "metrics.csv"
FIRST = ["step", "epoch", "loss", "lr", "img_per_s"]


class CsvMetrics(Callback):
    """Writes metrics.csv; the file is flushed after every row."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.file = None
        self.writer = None
        self.fields: list[str] | None = None

    def on_run_start(self, run: RunInfo) -> None:
        self.path = run.out / METRICS_FILE
        if run.resumed and self.path.exists():
            self._keep_until(run.start_step)

    def _keep_until(self, step: int) -> None:
        """Rewrite the file (atomically) without the rows after ``step``, a row at a time:
        a long run's file is never held in memory."""
        with open(self.path, newline="") as f:
            rows = csv.reader(f)
            fields = next(rows, None)
            if fields is None:  # an empty file: the first step writes the header
                return
            self.fields = fields

            def write(tmp: Path) -> None:
                with open(tmp, "w", newline="") as out:
                    writer = csv.writer(out)
                    writer.writerow(fields)
                    writer.writerows(r for r in rows if r and int(r[0]) <= step)

            write_atomic(self.path, write)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        if self.writer is None:
            append = self.fields is not None
            if not append:
                self.fields = FIRST + sorted(k for k in row if k not in FIRST)
            self.file = open(self.path, "a" if append else "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore")
            if not append:
                self.writer.writeheader()
        self.writer.writerow({k: _fmt(k, v) for k, v in row.items()})
        self.file.flush()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.file:
            self.file.close()
            self.file = self.writer = None


def _fmt(key: str, v: Any) -> Any:
    if not isinstance(v, float):
        return v
    return f"{v:.1f}" if key == "img_per_s" else f"{v:.9g}"


@hookimpl
def register_callbacks(register):
    register("csv", CsvMetrics)
