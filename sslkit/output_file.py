"""Output files a command writes: refused when they would replace something silently,
written through a temporary file in the same folder so nothing half-written is left; and
:func:`read_json`, the one tolerant reader of the JSON files a run left (``run.json``,
``data_report.json``).

:func:`write_atomic` is sslkit's one way to write a file: the data goes to a temporary
file beside the target (``.tmp-*``), is fsynced, renamed over the target, and the folder
is fsynced, so after a crash or power loss the target is either the old file or the
whole new one. A full disk or an unwritable folder is one :class:`UsageError` line, and
the temporary file is removed. Temporary names carry the writer's pid and machine (``.tmp-<pid>@<host>-*``):
those a killed writer (``kill -9``) left are removed by the next write in that folder. Without
``--overwrite`` the finished file is published with ``os.link``, which fails when the name
exists: of two writers racing for one name the second is refused (:class:`OutputExists`),
never silently replaced. The file gets the mode a plain ``open()`` would give it (``0666``
less the umask), or keeps the mode of the file it replaces: not the ``0600`` of the temporary
file, which would hide a run's outputs from the team and the service that reads them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from sslkit.errors import UsageError, first_line

TMP_PREFIX = ".tmp-"
#: a temporary file of :func:`write_atomic` (or :func:`check_writable`'s probe):
#: ``.tmp-<pid>@<host>-<random>[suffix]``, ``host`` 6 hex digits of the machine's name (a shared
#: file system: another machine's pid says nothing here)
TMP_NAME = re.compile(r"\.tmp-(\d+)@([0-9a-f]{6})-")
STALE_TMP_S = 60  # a dead writer's temporary file is removed once it is this old (seconds)
#: check_output's word on each output it checked (absolute path -> ``overwrite``), taken by write_atomic
_OVERWRITE: dict[str, bool] = {}
#: absolute path -> (device, inode) of the file :func:`write_atomic` last published there (:func:`published_here`)
_PUBLISHED: dict[str, tuple[int, int]] = {}


class OutputExists(UsageError):
    """An output that exists and may not be replaced (no ``--overwrite``)."""


def exists_message(out: Path, why: str = "") -> str:
    return f"{str(out)!r} already exists{why}; pass --overwrite to replace it"


def check_output(out: Path, overwrite: bool, suffix: str | None = None) -> None:
    """Refuse an output that exists (without ``overwrite``: :class:`OutputExists`), cannot be written,
    or (``suffix``, e.g. ``".png"``) is named for another kind of file than the one written.
    :func:`write_atomic` on ``out`` later publishes it as ``overwrite`` says (unless told otherwise)."""
    out = Path(out)
    if suffix is not None and out.suffix.lower() != suffix:
        raise UsageError(f"--out {out.name!r} must be a {suffix} file; name it e.g. {out.with_suffix(suffix).name!r}")
    if out.is_dir():
        raise UsageError(f"{str(out)!r} is a directory; give a file name")
    if out.exists() and not out.is_file():  # a FIFO or a device: --overwrite would replace it by a file
        raise UsageError(f"{str(out)!r} is not a regular file (a pipe or a device); give a file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExists(exists_message(out))
    if not out.parent.is_dir():
        nearest_folder(out)  # a file where a folder should be: said so
        raise UsageError(f"output folder {str(out.parent)!r} does not exist")
    check_writable(out.parent)
    _OVERWRITE[os.path.abspath(out)] = overwrite


def nearest_folder(out: Path) -> Path:
    """The nearest existing path above ``out`` (the folder ``out``'s missing folders would be made in),
    as ``out`` spells it; where that is a file, not a folder, sslkit's one message for it (a usage error):
    ``--out 'run.json/x.png': 'run.json' is a file, not a folder``."""
    existing = next((p for p in Path(out).parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise UsageError(f"--out {str(out)!r}: {str(existing)!r} is a file, not a folder")
    return existing


def check_writable(folder: Path) -> None:
    """Refuse a folder in which no file can be created (a real probe: ``access()`` says
    yes to root even where nothing can be created)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(), dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output folder {str(folder)!r} is not writable: {exc.strerror or exc}") from None


def _host() -> str:
    return hashlib.sha256(platform.node().encode("utf-8", "surrogateescape")).hexdigest()[:6]


def temp_prefix() -> str:
    """``.tmp-<pid>@<host>-``: whose temporary file it is, so that one left by a killed writer can be told."""
    return f"{TMP_PREFIX}{os.getpid()}@{_host()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or no such pid number: leave it
        return True
    return True


def _unlocked(path: str) -> bool:
    """Whether no process holds the lock :func:`write_atomic` keeps on its temporary file (a writer in
    another PID namespace, whose pid means nothing here, still holds it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # held, or a file system without locks: leave it
        return False
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove the temporary files (``.tmp-<pid>@<host>-*``) in ``folder`` of this machine whose writer is
    gone (killed: its pid is not alive and nobody holds the file's lock) and that are older than
    :data:`STALE_TMP_S`; no other file is touched (another machine's on a shared file system neither).
    Returns the names removed."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now, host = time.time(), _host()
    for entry in entries:
        match = TMP_NAME.match(entry.name)
        if match is None or match.group(2) != host or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        try:
            if (entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_S
                    and _unlocked(entry.path)):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:  # gone already, or not ours to remove
            pass
    return removed


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """This process's umask: from ``/proc/self/status`` on Linux (read without changing it),
    else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def created_mode(directory: bool = False) -> int:
    """The mode ``open()`` (``0666``) or ``mkdir()`` (``0777``) gives a new file or folder here:
    for what ``mkstemp``/``mkdtemp`` made private (``0600``/``0700``) before it is renamed into place."""
    return (0o777 if directory else 0o666) & ~_umask()


def write_atomic(out: Path, write: Callable[[Path], None], suffix: str = "", *, mode: int | None = None,
                 overwrite: bool | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``out``, fsync it, publish it as ``out`` and fsync
    the folder. A failed write (:func:`write_errors`: disk full, permissions) becomes one
    :class:`UsageError` line; ``out`` keeps its old content and no temporary file stays.
    ``overwrite``: replace an existing ``out`` (else refused, :class:`OutputExists`, even when it
    appeared since it was checked); None: what :func:`check_output` was told for ``out``, else True.
    ``out`` gets ``mode`` (``0o600`` for a private file), else the mode of the file it
    replaces, else the one a plain ``open()`` gives."""
    out = Path(out)
    checked = _OVERWRITE.pop(os.path.abspath(out), True)
    overwrite = checked if overwrite is None else overwrite
    remove_stale_temps(out.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(), suffix=suffix or out.suffix, dir=out.parent)
    except OSError as exc:
        raise UsageError(f"cannot write to {str(out.parent)!r}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):  # held until written: not stale to remove_stale_temps
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    tmp = Path(name)
    try:
        try:
            write(tmp)
            if mode is None:
                mode = stat.S_IMODE(out.stat().st_mode) if overwrite and out.is_file() else created_mode()
            os.chmod(tmp, mode)
            fsync_path(tmp)
            _publish(tmp, out, overwrite)
            _PUBLISHED[os.path.abspath(out)] = _identity(out)
            fsync_path(out.parent)
        except write_errors() as exc:
            why = getattr(exc, "strerror", None) or first_line(exc)
            raise UsageError(f"cannot write {str(out)!r}: {why}") from None
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


#: what ``link()`` says on a file system without hard links (some FUSE, SMB, FAT mounts)
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def published_here(out: Path) -> bool:
    """Whether ``out`` is still the file this process published there (:func:`write_atomic`), not one another
    process (or the user) put there since: what a failed command may remove as its own."""
    return _identity(out) is not None and _PUBLISHED.get(os.path.abspath(out)) == _identity(out)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; without ``overwrite`` hard-link it there instead (fails when ``out``
    exists, even when another writer put it there a moment ago) and remove ``tmp``."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OutputExists(exists_message(out, " (written meanwhile by another process)")) from None
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        if os.path.lexists(out):  # no hard links here: checked, then renamed (a race is not caught)
            raise OutputExists(exists_message(out, " (written meanwhile by another process)")) from None
        os.replace(tmp, out)
        return
    tmp.unlink()


def write_errors() -> tuple[type[BaseException], ...]:
    """What a write that fails on the disk raises: ``OSError``, and safetensors' own error, which
    wraps the I/O error of a full disk (``Error while serializing: I/O error: No space left...``)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - a core dependency
        return (OSError,)
    return (OSError, SafetensorError)


def write_text_atomic(out: Path, text: str, **options: Any) -> None:
    """:func:`write_atomic` for a text file (UTF-8); ``options``: its keywords (``overwrite``, ``mode``)."""
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), **options)


def write_json_atomic(out: Path, data: Any) -> None:
    """:func:`write_atomic` for a JSON file (indented; objects it cannot encode as ``str``)."""
    write_text_atomic(out, json.dumps(data, indent=2, default=str))


def not_regular(path: Path) -> str | None:
    """What ``path`` is when it is there but not a regular file (a symlink is followed): ``"a FIFO"``,
    ``"a directory"``, ``"a device"``, ``"a socket"``; None for a regular file, or one that cannot be
    looked at (missing, no permission: the read that follows says so)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def check_regular(path: Path) -> Path:
    """``path``, refused in one :class:`UsageError` line when it is there but is not a regular file:
    reading a FIFO would wait forever, ``/dev/zero`` never ends. Called before sslkit reads a file of
    its own (a run's ``run.json``, encoder, checkpoint files: :func:`file_sha256`, :func:`read_json`)."""
    kind = not_regular(path)
    if kind is not None:
        raise UsageError(f"{str(path)!r} is {kind}, not a regular file; sslkit reads only regular files there")
    return path


def file_sha256(paths: Iterable[Path]) -> str:
    """The SHA-256 (hex) of the bytes of ``paths``, one file after another, read in 1 MiB blocks
    (one that is not a regular file: :func:`check_regular`'s usage error, nothing read)."""
    h = hashlib.sha256()
    for path in paths:
        with open(check_regular(path), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file's content; ``{}`` when it is missing, unreadable or not an object
    (the callers treat a damaged record as an absent one and report it where it matters), or nested
    too deeply to parse; a FIFO, a directory or a device there is :func:`check_regular`'s usage error."""
    try:
        data = json.loads(check_regular(Path(path)).read_text())
    except (OSError, ValueError, RecursionError, MemoryError):  # RecursionError: [[[[...]]]] 100,000 deep
        return {}
    return data if isinstance(data, dict) else {}
