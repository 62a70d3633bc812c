"""Drive the real ``sslkit`` command line in-process (what a user types, without a new
interpreter per call), so the checks hold for whatever the engine looks like inside."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def sslkit(*args: object) -> str:
    """Run ``sslkit ARGS`` in this process; its output, or ``AssertionError`` with its error."""
    from click.testing import CliRunner

    from sslkit.cli import main

    argv = [str(a) for a in args]
    result = CliRunner().invoke(main, argv, catch_exceptions=True)
    if result.exit_code != 0:
        err = (getattr(result, "stderr", "") or result.output).strip().splitlines()
        why = err[-1] if err else repr(result.exception)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            why = "".join(traceback.format_exception(result.exception)).strip()
        raise AssertionError(f"`sslkit {' '.join(argv)}` exited {result.exit_code}: {why}")
    return result.output


def metric_rows(run: Path) -> list[dict[str, str]]:
    """``metrics.csv`` of ``run`` as dicts (strings, as written)."""
    with open(Path(run) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def finite_losses(rows: list[dict[str, str]], what: str) -> list[float]:
    assert rows and "loss" in rows[0], f"{what}: metrics.csv has no loss column"
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) for v in losses), f"{what}: non-finite loss {losses}"
    return losses
