"""Map a function over many items in worker processes (serial when there are few).

Used for the two passes that touch every file: reading headers (``Source.index``) and
the first decode. Workers are *spawned*, not forked: the parent has torch (and maybe
CUDA and OpenMP thread pools) loaded, which a forked child must not inherit.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: below this many items a process pool costs more (start-up, imports) than it saves
MIN_PARALLEL = 256


def default_workers() -> int:
    """One worker per CPU this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def imap(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, chunksize: int = 0,
         min_parallel: int = MIN_PARALLEL) -> Iterator[R]:
    """``fn(item)`` for every item, in order. ``workers``: 0 = :func:`default_workers`, 1 = serial."""
    workers = workers or default_workers()
    if workers <= 1 or len(items) < min_parallel:
        yield from map(fn, items)
        return
    chunksize = chunksize or max(1, min(64, len(items) // (workers * 8)))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(fn, items, chunksize=chunksize)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, chunksize: int = 0,
                 min_parallel: int = MIN_PARALLEL) -> list[R]:
    return list(imap(fn, items, workers, chunksize, min_parallel))
