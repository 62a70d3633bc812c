"""Callback ``csv``: ``RUN_DIR/metrics.csv``, one row per optimizer step (the default).

Columns: ``step, epoch, loss, lr, img_per_s``, then every other scalar in alphabetical order
(the task's own scalars, ``grad_norm`` with clipping). A scalar first returned at a later step
gets its column then: the file is rewritten once (atomically, a row at a time) with the new
header and empty cells in the earlier rows; a step without one of the scalars has an empty
cell. Floats are written with 9 significant digits (``img_per_s`` with one decimal), lines end
with ``\\n``, so a resumed run's rows can be compared with an uninterrupted run's as text.

Each row is flushed when written, and the file is fsynced at every checkpoint. A row that
cannot be written (a full disk) stops the run in one line, as a checkpoint that cannot be
written does (sslkit's own callbacks are never switched off: :mod:`sslkit.engine.events`).
Resuming first rewrites the file (atomically, a row at a time) with its well-formed rows up to
the checkpoint's step: as many fields as the header, an integer step, steps increasing. The
rows logged after the checkpoint are logged again; a damaged line (a cut row, NUL bytes: what a
crash or power loss leaves) is dropped, and one note line says how many. So the file holds
every step exactly once.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from sslkit.api import Callback, RunInfo, hookimpl, write_atomic

METRICS_FILE = "metrics.csv"
FIRST = ["step", "epoch", "loss", "lr", "img_per_s"]
#: bytes: a longer line is damage (a row is ~100 bytes), skipped a piece at a time, never read whole
LINE_MAX = 1 << 16


class CsvMetrics(Callback):
    """Writes metrics.csv; the file is flushed after every row."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.file = None
        self.writer = None
        self.fields: list[str] | None = None  # the header of the file on disk; None: no header yet
        self.known: set[str] = set()  # the same, as a set
        self.failed = False  # a write failed: what is buffered cannot be written either

    def on_run_start(self, run: RunInfo) -> None:
        self.path = run.out / METRICS_FILE
        if run.resumed and self.path.exists():
            with self._writing():
                self._keep_until(run.start_step)

    def _keep_until(self, step: int) -> None:
        """Rewrite the file (atomically) with its well-formed rows up to ``step``, a row at a time:
        a long run's file is never held in memory."""
        dropped = [0]
        with open(self.path, "rb") as f:
            lines = _lines(f)
            first = next(lines, b"")
            if first == b"":  # an empty file: the first step writes the header
                return
            fields = _fields(first)
            if not fields or fields[0] != "step":
                _note(f"{self.path}: its header is damaged (a crash or power loss?); the file is written anew")
                return  # the first step writes it ("w")
            kept = [0]

            def write(tmp: Path) -> None:
                with open(tmp, "w", newline="") as out:
                    writer = csv.writer(out, lineterminator="\n")
                    writer.writerow(fields)
                    for row in _kept_rows(lines, len(fields), step, dropped):
                        writer.writerow(row)
                        kept[0] += 1

            write_atomic(self.path, write)
        self.fields = fields
        missing = step - kept[0]  # kept rows are steps 1..step, each once
        if dropped[0] or missing:
            _note(f"{self.path}: dropped {dropped[0]} damaged line(s) (a cut row or NUL bytes: what a full disk, a "
                  f"crash or a power loss leaves)" + (f"; {missing} of steps 1-{step} have no row" if missing else ""))

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        with self._writing():
            if self.fields is None:
                self._open(FIRST + sorted(k for k in row if k not in FIRST), "w")
            elif not row.keys() <= self.known:
                self._add_columns(row)
            elif self.writer is None:
                self._open(self.fields, "a")
            self.writer.writerow({k: _fmt(k, v) for k, v in row.items()})
            self.file.flush()

    def _open(self, fields: list[str], mode: str) -> None:
        self.fields, self.known = fields, set(fields)
        self.file = open(self.path, mode, newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields, lineterminator="\n")
        if mode == "w":
            self.writer.writeheader()

    def _add_columns(self, row: dict[str, Any]) -> None:
        """``row`` has scalars the header lacks: rewrite the file (atomically, a row at a time) with
        them in the header and empty cells in the earlier rows; go on appending."""
        fields = FIRST + sorted((set(self.fields) | set(row)) - set(FIRST))
        if self.file is not None:
            self.file.close()
            self.file = self.writer = None

        def write(tmp: Path) -> None:
            with open(self.path, newline="") as old, open(tmp, "w", newline="") as out:
                writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
                writer.writeheader()
                writer.writerows(csv.DictReader(old))

        write_atomic(self.path, write)
        self._open(fields, "a")

    def on_checkpoint(self, path: Path) -> None:
        if self.file is not None:  # the rows a resume from this checkpoint keeps are on the disk
            with self._writing():
                os.fsync(self.file.fileno())

    def on_run_end(self, summary: dict[str, Any]) -> None:
        file, self.file, self.writer = self.file, None, None
        if file is None:
            return
        with self._writing():
            try:
                file.close()
            except OSError:
                # a row a full disk refused is still buffered: closing writes it again and fails again
                # (the file is closed all the same); the first error is the one the run reported
                if not self.failed:
                    raise

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write names metrics.csv (a flush's OSError names no file) and is remembered."""
        try:
            yield
        except Exception as exc:
            self.failed = True
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(self.path)
            raise


def _lines(f: BinaryIO) -> Iterator[bytes | None]:
    """``f``'s lines (bytes, newline included); None for one longer than :data:`LINE_MAX`."""
    while line := f.readline(LINE_MAX):
        if len(line) == LINE_MAX and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(LINE_MAX)
            yield None
        else:
            yield line


def _fields(line: bytes | None) -> list[str] | None:
    """A line's fields; None for a damaged one: cut (no newline), NUL bytes, not UTF-8, not one row."""
    if line is None or not line.endswith(b"\n") or b"\0" in line:
        return None
    try:
        rows = list(csv.reader([line.decode("utf-8").rstrip("\r\n")], strict=True))
    except (UnicodeDecodeError, csv.Error):
        return None
    return rows[0] if len(rows) == 1 else None


def _kept_rows(lines: Iterator[bytes | None], width: int, until: int, dropped: list[int]) -> Iterator[list[str]]:
    """The well-formed rows up to step ``until``: ``width`` fields, an integer step above the last
    kept row's. ``dropped[0]`` counts the damaged lines; rows past ``until`` (the steps this session
    logs again) are left out, not counted."""
    last = 0
    for line in lines:
        row = _fields(line)
        ok = row is not None and len(row) == width and row[0].isascii() and row[0].isdigit()
        step = int(row[0]) if ok else None
        if step is not None and step > until:
            continue
        if step is None or step <= last:
            dropped[0] += 1
            continue
        last = step
        yield row


def _note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


def _fmt(key: str, v: Any) -> Any:
    if not isinstance(v, float):
        return v
    return f"{v:.1f}" if key == "img_per_s" else f"{v:.9g}"


@hookimpl
def register_callbacks(register):
    register("csv", CsvMetrics)
