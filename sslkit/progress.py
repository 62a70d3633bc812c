"""Progress of a counted loop (decoding, embedding, fine-tuning) on stderr.

On a terminal, tqdm's redrawn bar. Elsewhere (a log file, a SLURM job, CI) a redrawn bar
piles ``\\r`` frames into the file, so plain lines instead: one when the loop starts and one
at most every :data:`EVERY_S` seconds::

    decoding: 1200/5216 img

Training steps print their own lines (:mod:`sslkit.engine.log`).
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
EVERY_S = 30.0


def human_bytes(n: float) -> str:
    """``n`` bytes for a message: ``"512 B"``, ``"3.4 MiB"``, ``"1.2 GiB"``: binary units (1 MiB = 2^20
    bytes), named as such: 16.46e6 bytes is 15.7 MiB, which an "MB" (10^6) would misstate."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def counted(items: Iterable[T], total: int, desc: str, unit: str, enabled: bool = True,
            every_s: float | None = None) -> Iterator[T]:
    """``items`` unchanged, with progress on stderr (see the module docstring)."""
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        return
    every = EVERY_S if every_s is None else every_s
    print(f"{desc}: 0/{total} {unit}", file=sys.stderr, flush=True)
    last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        if time.monotonic() - last >= every and i < total:
            print(f"{desc}: {i}/{total} {unit}", file=sys.stderr, flush=True)
            last = time.monotonic()
