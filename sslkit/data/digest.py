"""What identifies a data file's content without reading it all: :func:`content_digest` (the
size and sampled blocks), the cache's :func:`file_digest` (that and the mtime), :func:`readable`
(which files can be read at all) and the dataset's :func:`fingerprint` (every file's digest)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Iterable, Sequence

from sslkit.data.source import SampleRef
from sslkit.errors import reports_here, without_quoted
from sslkit.progress import counted

#: (path, block, interior) -> (the file's stat identity, its content digest): one pass reads each file once
_DIGESTS: dict[tuple[str, int, int], tuple[tuple[int, ...], str]] = {}
_DIGESTS_MAX = 1 << 20
#: the dataset fingerprint's schemes, by name: how many interior blocks each file's digest reads
#: besides its first and last 4 KiB (:func:`content_digest`). ``content-v2`` (runs before
#: 2026-12-06) let an uncompressed volume or array edited in place pass as unchanged.
FINGERPRINT_SCHEMES = {"content-v2": 0, "content-v3": 14}
FINGERPRINT_SCHEME = "content-v3"
#: a file up to this size whose digest has interior blocks is read in one call, its blocks hashed
#: from memory (the same digest): one read, not 16 scattered ones; with a cold page cache about 1.5 x
#: as fast for files of 256 and 512 KiB, even at 1 MiB, slower from 4 MiB
WHOLE_READ = 512 << 10
#: passes over at least this many samples (the readability check, the fingerprint) say so on stderr
PROGRESS_FROM = 5000


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
    the dataset fingerprint of one run share their reads. A file no longer than every scheme's
    blocks (64 KiB), or than :data:`WHOLE_READ` for interior blocks, is read in one call, and what
    was read gives every scheme's digest it holds: the readability check reads such a small file
    once for the fingerprint too, and interior blocks hold the first and last ones.
    """
    known = _DIGESTS.get((path, block, interior))
    if known is not None and known[0] == _identity(os.stat(path)):
        return known[1]
    interiors = {interior, *FINGERPRINT_SCHEMES.values()}
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size, wanted = st.st_size, _block_starts(st.st_size, block, interior)
        whole = size <= block * (2 + max(interiors)) or bool(interior and size <= WHOLE_READ)
        data, blocks = f.read(size) if whole else b"", {}
        for start in () if whole else wanted:
            f.seek(start)
            blocks[start] = f.read(block)
    if len(_DIGESTS) >= _DIGESTS_MAX:
        _DIGESTS.clear()
    identity = _identity(st)
    for j in interiors:  # every scheme's digest that what was read gives
        starts = _block_starts(size, block, j)
        if whole or all(start in blocks for start in starts):
            h = hashlib.blake2b(str(size).encode(), digest_size=16)
            for start in starts:
                h.update(data[start : start + block] if whole else blocks[start])
            _DIGESTS[(path, block, j)] = (identity, h.hexdigest())
    return _DIGESTS[(path, block, interior)][1]


def file_digest(path: str, block: int = 4096) -> str:
    """:func:`content_digest` and the mtime: what keys a cache entry (a touched file is re-decoded)."""
    digest = content_digest(path, block)
    return f"{digest}:{_DIGESTS[(path, block, 0)][0][3]}"


def unreadable_reason(exc: OSError) -> str:
    """The skip reason of a data file that cannot be read (no path: ``strerror`` alone where it has one)."""
    return f"unreadable: {type(exc).__name__}: {exc.strerror or without_quoted(str(exc)) or 'error'}"


def readable(refs: Iterable[SampleRef], relative=str) -> tuple[list[SampleRef], list[tuple[str, str]]]:
    """``refs`` whose files can be read, and ``(relative(path), reason)`` for each file that cannot
    (``refs`` is gone through once: it may be a progress wrapper)."""
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


def fingerprint(refs: Sequence[SampleRef], extra: Any = None, scheme: str = FINGERPRINT_SCHEME,
                progress: bool = False) -> str:
    """A hash of the dataset's content, for run.json: every sample's frame and its file's
    :func:`content_digest` (size, first and last 4 KiB and, in ``content-v3``, 14 evenly spaced
    4 KiB blocks between them), in path order, and ``extra`` (the preprocessing). Holds no path
    or name; a replaced, added or removed file changes it, a copy of the folder elsewhere does
    not. ``--resume`` compares it, under the run's own ``scheme``. ``progress``: a progress line
    on stderr for :data:`PROGRESS_FROM` samples or more (in the process that reports).
    """
    interior = FINGERPRINT_SCHEMES[scheme]
    h = hashlib.sha256(json.dumps([scheme, extra], sort_keys=True, default=str).encode())
    lost = 0
    ordered = sorted(refs, key=lambda r: (r.path, r.frame or 0))
    shown = progress and len(ordered) >= PROGRESS_FROM and reports_here()
    for ref in counted(ordered, len(ordered), "dataset fingerprint", "samples", shown):
        try:
            digest = content_digest(ref.path, interior=interior)
        except OSError:  # removed since it was read: counted as such, not a traceback
            digest, lost = "unreadable", lost + 1
        h.update(f"{ref.frame}\0{digest}\n".encode())
    if lost:
        print(f"note: {lost} samples' files were removed or became unreadable after they were read; "
              f"the dataset fingerprint counts them as unreadable", file=sys.stderr)
    return h.hexdigest()[:16]
