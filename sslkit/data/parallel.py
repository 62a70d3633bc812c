"""Map a function over many items in worker processes (serial when there are few).

Used for the two passes that touch every file: reading headers (``Source.index``) and
the first decode. Workers are *spawned*, not forked: the parent has torch (and maybe
CUDA and OpenMP thread pools) loaded, which a forked child must not inherit. Spawning
costs seconds (each worker imports its modules), so small jobs run serially; where the
main module cannot be re-imported by a worker (``python -``, some notebooks), or the
pool breaks, the work runs serially instead of failing.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence, TypeVar

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


#: what a spawned worker says when the parent's script, which it re-imports, starts an sslkit run there
RERUN_SCRIPT = ("sslkit: a worker process re-ran this script's top level, which starts another sslkit run; "
                "put the script's code under 'if __name__ == \"__main__\":' (this worker stops here, "
                "the run decodes without it)")


#: the environment variable naming the file whose creation says a worker has shown :data:`RERUN_SCRIPT`
RERUN_SAID = "SSLKIT_RERUN_SAID"


def stop_a_rerun_script() -> None:
    """Exit, with :data:`RERUN_SCRIPT`, where this process is a spawned worker still re-importing its
    parent's main script (spawn runs it as ``__mp_main__`` before the worker's task). A script without the
    ``__main__`` guard would start a second run there: waiting for the parent's cache lock, forever, or
    decoding and training in the worker. The parent's pool breaks and it decodes that share itself. Of the
    workers of one pass (:func:`spawned_workers`) only the first to stop shows the line."""
    if not getattr(multiprocessing.current_process(), "_inheriting", False):  # set by spawn while it prepares
        return
    said = os.environ.get(RERUN_SAID)
    if said:
        try:
            os.close(os.open(said, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise SystemExit(1) from None  # another worker of this pass has said it
        except OSError:
            pass  # the mark cannot be made: say it anyway
    raise SystemExit(RERUN_SCRIPT)


@contextmanager
def spawned_workers() -> Iterator[None]:
    """Around the pools of one pass: the workers it spawns share one :data:`RERUN_SAID` mark, so an unguarded
    script stopped in each of them is reported once, not once per worker."""
    try:
        folder = tempfile.mkdtemp(prefix="sslkit-workers-")
    except OSError:  # no temporary folder (a full or read-only one): each worker says it
        yield
        return
    previous = os.environ.get(RERUN_SAID)
    os.environ[RERUN_SAID] = os.path.join(folder, "said")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RERUN_SAID, None)
        else:
            os.environ[RERUN_SAID] = previous
        shutil.rmtree(folder, ignore_errors=True)


def can_spawn() -> bool:
    """Whether spawned workers can re-import ``__main__`` (false for ``python -`` / stdin)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or os.path.exists(path)


def pool_size(n_items: int, workers: int = 0, min_parallel: int = MIN_PARALLEL) -> int:
    """How many processes to use for ``n_items`` (1 = run in this process)."""
    workers = workers or default_workers()
    if workers <= 1 or n_items < min_parallel or not can_spawn():
        return 1
    return workers


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, chunksize: int = 0,
                 min_parallel: int = MIN_PARALLEL, initializer: Callable[..., Any] | None = None,
                 initargs: tuple = ()) -> list[R]:
    """``[fn(item) for item in items]``, in worker processes when that pays off.

    ``initializer(*initargs)`` runs once per worker (and once here when serial).
    """
    n = pool_size(len(items), workers, min_parallel)
    if n > 1:
        chunksize = chunksize or max(1, min(64, len(items) // (n * 8)))
        try:
            with spawned_workers(), ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                                        initializer=initializer, initargs=initargs) as pool:
                return list(pool.map(fn, items, chunksize=chunksize))
        except BrokenProcessPool:
            pass  # e.g. a worker could not start: do the work here
    if initializer is not None:
        initializer(*initargs)
    return [fn(item) for item in items]
