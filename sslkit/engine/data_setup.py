"""The data side of a run, built in :func:`sslkit.engine.setup.build`: the images decoded
once (one process at a time per disk cache: :func:`cache_build_lock`; under DDP rank 0 fills
it while the others wait, however long, then read it together: :func:`load_run_data`), then this
rank's batch loader, the optimizer steps per epoch and the LR schedule scaled from the
batch actually used (:func:`batches_and_schedule`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from typing import Iterator

from sslkit import distributed
from sslkit.data.loader import BatchLoader
from sslkit.data.parallel import stop_a_rerun_script
from sslkit.data.pipeline import LoadedData, load_data
from sslkit.engine.lock import LOCK_HELD, no_locks_error
from sslkit.engine.log import note
from sslkit.engine.model_setup import check_cache_size
from sslkit.engine.schedules import horizon, make_schedule
from sslkit.errors import UsageError
from sslkit.optim import scaled_lr
from sslkit.run import RunConfig

CACHE_LOCK = ".sslkit-cache.lock"


def load_run_data(cfg: RunConfig, rank: int, world: int) -> LoadedData:
    """Decode the data; under DDP with a disk cache rank 0 fills the cache, then the others read it
    (:func:`~sslkit.distributed.rank0_first`: their wait has no collective timeout). Not in a decode worker
    re-importing an unguarded script (:func:`~sslkit.data.parallel.stop_a_rerun_script`)."""
    stop_a_rerun_script()
    check_cache_size(cfg)  # (build checked it already: for callers that come here alone)
    stored_size = cfg.cache_size or cfg.image_size

    def load(shared: bool = False) -> LoadedData:
        with cache_build_lock(cfg.cache_dir, shared):
            return load_data(cfg.data, stored_size, cfg.channels, cfg.source_options, cfg.cache_dir,
                             cfg.progress and rank == 0, val_fraction=cfg.val_fraction, seed=cfg.seed,
                             max_pixels=cfg.max_pixels)

    if cfg.cache_dir != "" and world > 1:  # the others wait for rank 0 however long its decode takes
        return distributed.rank0_first(lambda: load(shared=reads_shared(rank)), "decoding the data into the cache")
    return load()


def check_same_data(data: LoadedData) -> None:
    """Under DDP every process holds the samples it decoded or read from rank 0's cache entry; they must be
    the same: one that failed on one process alone (for want of memory; a file changed between reads) would
    give the processes different step counts, and the collective of the one with more then waits until its
    timeout. Their counts and a digest of their files are compared; a difference is one line, before a step."""
    if distributed.world_size() < 2:
        return
    names = "\n".join(f"{ref.path}\0{ref.frame}" for ref in data.prepared.refs)  # hashed, never shown
    seen = distributed.gather_objects((len(data.prepared.refs), hashlib.sha256(names.encode()).hexdigest()))
    if len(set(seen)) > 1:
        counts = ", ".join(f"process {rank}: {n}" for rank, (n, _) in enumerate(seen))
        raise UsageError(f"the processes of this run hold different samples ({counts}): a file decoded on one "
                         f"and skipped on another (for want of memory, or changed while read); free memory or "
                         f"fix the files, then run the command again")


def reads_shared(rank: int) -> bool:
    """Whether this rank, after rank 0 filled the cache, reads it under a shared lock: the ranks of rank 0's
    node (torchrun's ``GROUP_RANK`` 0, else the first ``LOCAL_WORLD_SIZE`` ranks), whose cache folder rank 0
    filled; on other nodes, or where the node is unknown, the folder may be their own, so one process fills it
    while the others wait (a shared lock would let each decode it)."""
    if rank == 0:
        return False
    node = os.environ.get("GROUP_RANK")  # torchrun's; another launcher: the first LOCAL_WORLD_SIZE ranks
    if node is not None:
        return node.strip() == "0"
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return local.isdigit() and rank < int(local)


@contextlib.contextmanager
def cache_build_lock(cache_dir: str | None, shared: bool = False) -> Iterator[None]:
    """Hold ``CACHE_ROOT/.sslkit-cache.lock`` (``flock``, exclusive) while data is decoded
    into the disk cache: processes that share the cache folder (the ranks of several
    nodes on one file system, or two runs on the same data) decode a dataset once, the
    others wait and then read the finished entry. Nothing without a disk cache.
    ``shared``: the cache was just filled (by rank 0 of this run): only wait for a process
    filling it, not for the other readers (a missing entry is still filled, atomically).
    A file system without locks is one line (:func:`~sslkit.engine.lock.no_locks_error`).

    In a cache this process cannot write (shared read-only) the lock is taken shared,
    through a read-only descriptor (it waits for a process filling the cache, not for other
    readers), or not at all where the lock file does not exist: such a cache is only read."""
    from sslkit.data.cache import mark_root, resolve_cache_dir

    root = resolve_cache_dir(cache_dir)
    if root is None:
        yield
        return
    mark_root(root)
    fd, mode = _open_lock(root / CACHE_LOCK)
    if fd is None:
        yield
        return
    mode = fcntl.LOCK_SH if shared else mode
    try:
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in LOCK_HELD:
                    raise
                note(f"waiting for another process that is filling the cache in {root} ...")
                fcntl.flock(fd, mode)
        except OSError as exc:
            raise no_locks_error(f"the decoded-pixel cache in {str(root)!r}", exc,
                                 "choose another folder with --cache DIR, or use --no-cache") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _open_lock(path) -> tuple[int | None, int]:
    """The lock file's descriptor and the ``flock`` mode to take: exclusive where the cache
    can be written, shared where it cannot (None: no lock file there, none can be made)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600), fcntl.LOCK_EX
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UsageError(f"cache folder {str(path.parent)!r} cannot be written: {exc.strerror or exc}; "
                             f"choose another with --cache DIR, or --no-cache") from None
    try:
        return os.open(path, os.O_RDONLY), fcntl.LOCK_SH
    except OSError:
        return None, fcntl.LOCK_SH


def batches_and_schedule(cfg: RunConfig, data: LoadedData, rank: int, world: int):
    """This rank's batch loader, optimizer steps per epoch, images per step (over all
    ranks) and the LR schedule. The LR is scaled from the batch actually used: a batch
    larger than the data is clamped to it, and so is the LR."""
    loader = BatchLoader(data.prepared.pixels, cfg.batch_size // world, cfg.seed, rank, world)
    steps_per_epoch = len(loader) // cfg.accumulate
    if steps_per_epoch < 1:
        raise UsageError(f"{len(data.prepared)} images are fewer than one optimizer step needs "
                         f"(--batch-size {cfg.batch_size} x --accumulate {cfg.accumulate}); lower them")
    step_images = loader.batch_size * world * cfg.accumulate
    if loader.batch_size * world < cfg.batch_size and rank == 0:
        note(f"note: --batch-size {cfg.batch_size} is more than the {len(data.prepared)} image"
             f"{'' if len(data.prepared) == 1 else 's'}; "
             f"using {loader.batch_size * world} (the LR is scaled from that)")
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, step_images, cfg.lr_scaling)
    total, bound = horizon(cfg.epochs, cfg.max_steps, steps_per_epoch)
    return loader, steps_per_epoch, step_images, make_schedule(cfg.schedule, lr, total, cfg.warmup_epochs,
                                                               steps_per_epoch, bound)
