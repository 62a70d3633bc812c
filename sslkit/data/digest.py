"""What identifies a data file's content without reading it all: :func:`content_digest` (the
size and sampled blocks), the cache's :func:`file_digest` (that and the mtime), and
:func:`readable` (which files can be read at all)."""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from sslkit.data.source import SampleRef
from sslkit.errors import without_quoted

#: (path, block, interior) -> (the file's stat identity, its content digest): one pass reads each file once
_DIGESTS: dict[tuple[str, int, int], tuple[tuple[int, ...], str]] = {}
_DIGESTS_MAX = 1 << 20


def _identity(st: os.stat_result) -> tuple[int, ...]:
    # ctime changes on every write, rename over and utime, even one that restores the mtime
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _block_starts(size: int, block: int, interior: int) -> list[int]:
    """Where the digest's blocks start: the first and last ``block`` bytes and ``interior``
    blocks evenly spaced between them (the whole file when it is no longer than they are)."""
    if size <= block * (2 + interior):
        return list(range(0, size, block)) or [0]
    step = (size - block) / (interior + 1)
    return [0, *(int(step * (i + 1)) for i in range(interior)), size - block]


def content_digest(path: str, block: int = 4096, interior: int = 0) -> str:
    """Identity of a file's content: its size, its first and last ``block`` bytes and
    ``interior`` blocks evenly spaced between them.

    Cheap (8 KiB read per file with no interior blocks), and for images enough to tell a
    replaced file from the old one: headers, UIDs and compressed streams differ at both ends.
    An uncompressed volume or array edited in place keeps its header and its background at
    both ends, so the dataset fingerprint also reads interior blocks. Raises ``OSError`` for
    an unreadable file. Within a process, a file whose stat identity (device, inode, size,
    mtime, ctime) is unchanged is not read again: the readability check, the cache key and
    the dataset fingerprint of one run share their reads.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        known = _DIGESTS.get((path, block, interior))
        if known is not None and known[0] == _identity(st):
            return known[1]
        h = hashlib.blake2b(str(st.st_size).encode(), digest_size=16)
        for start in _block_starts(st.st_size, block, interior):
            f.seek(start)
            h.update(f.read(block))
    if len(_DIGESTS) >= _DIGESTS_MAX:
        _DIGESTS.clear()
    _DIGESTS[(path, block, interior)] = (_identity(st), h.hexdigest())
    return h.hexdigest()


def file_digest(path: str, block: int = 4096) -> str:
    """:func:`content_digest` and the mtime: what keys a cache entry (a touched file is re-decoded)."""
    digest = content_digest(path, block)
    return f"{digest}:{_DIGESTS[(path, block, 0)][0][3]}"


def unreadable_reason(exc: OSError) -> str:
    """The skip reason of a data file that cannot be read (no path: ``strerror`` alone where it has one)."""
    return f"unreadable: {type(exc).__name__}: {exc.strerror or without_quoted(str(exc)) or 'error'}"


def readable(refs: Sequence[SampleRef], relative=str) -> tuple[list[SampleRef], list[tuple[str, str]]]:
    """``refs`` whose files can be read, and ``(relative(path), reason)`` for each file that cannot."""
    ok, bad, why = [], [], {}
    for ref in refs:
        if ref.path not in why:
            try:
                content_digest(ref.path)
                why[ref.path] = None
            except OSError as exc:
                why[ref.path] = unreadable_reason(exc)
                bad.append((relative(ref.path), why[ref.path]))
        if why[ref.path] is None:
            ok.append(ref)
    return ok, bad
