"""One process per run directory: an advisory lock on ``RUN_DIR/.sslkit.lock``.

Rank 0 takes the lock (``fcntl.flock``, exclusive, non-blocking) before it writes
anything in the run directory and holds it until the process ends. The kernel drops the
lock when its holder exits or dies (even by SIGKILL), so a lock is never stale: the
next start simply takes it. A second ``sslkit pretrain`` on the same directory (a
``--resume`` while the run still trains, a requeued job racing its predecessor) is
refused in one line. The file stays; it holds the holder's process id, for the message.
A file system that refuses ``flock`` itself is one line too (:func:`no_locks_error`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from sslkit.errors import UsageError
from sslkit.run import LOCK_FILE


#: the ``flock`` errors that mean another process holds the lock (anything else: no locks there)
LOCK_HELD = frozenset({errno.EWOULDBLOCK, errno.EAGAIN})


def no_locks_error(what: str, exc: OSError, remedy: str) -> UsageError:
    """The one line for a ``flock`` refused by the file system itself (ENOSYS, ENOLCK,
    EOPNOTSUPP: Lustre mounted without ``flock``, NFS without a lock daemon)."""
    return UsageError(f"cannot lock {what}: its file system does not support file locks "
                      f"({exc.strerror or exc}; e.g. Lustre mounted without flock, NFS without lockd); {remedy}")


class RunLock:
    """``acquire()`` once the directory exists; ``release()`` (or process exit) frees it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        """Take the lock (idempotent); a :class:`UsageError` when another process holds it."""
        if self.fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot lock run directory {str(self.path.parent)!r}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno not in LOCK_HELD:
                raise no_locks_error(f"run directory {str(self.path.parent)!r}", exc,
                                     "give --out a folder on a file system with locks (e.g. local disk)") from None
            raise UsageError(f"run directory {str(self.path.parent)!r} is in use by another sslkit process "
                             f"(pid {holder}); wait for it to end, or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
