"""The ``dicom`` source's header index on disk: what a later run need not read again.

One JSON file per data root under the cache's ``headers/`` folder, mode 0600, holding
for every file, keyed by its inode, size and mtime (no path: folder names can carry
patient names), the technical header facts of
:func:`~sslkit_plugins.sources.dicom.read_header`. Free text is not stored: a
SeriesDescription can name a patient (a run that filters on it reads those headers
again). Split groups are not stored, not even hashed: a hash of a PatientID can be
reversed by trying IDs. The file
keeps only which files share a group, as small integers numbered in file order; when
files change, one unchanged file per stored group is read again to recover that group
in memory, so a rerun on unchanged data reads no header and a changed folder reads only
its new files plus one file per patient.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from sslkit.api import UsageError, parallel_map, read_json, write_atomic

FORMAT = 2  # of this file; the reader's own version (``version``) is part of the store's name
NOT_STORED = ("group", "series")  # a patient's group; free text (SeriesDescription)


def store_path(header_cache: Path, root: Path, version: int = 0) -> Path:
    """The header index of data root ``root`` under ``header_cache`` (``version``: the reader's)."""
    key = f"{FORMAT}\0{version}\0{root.resolve()}".encode("utf-8", "surrogateescape")
    root_id = hashlib.sha256(key).hexdigest()[:24]
    return Path(header_cache) / f"dicom-{root_id}.json"


def cached_headers(files: list[str], root: Path, header_cache: Path | None,
                   read: Callable[[str], dict[str, Any]], workers: int = 0, version: int = 0,
                   need_text: bool = False) -> list[dict[str, Any]]:
    """``[read(f) for f in files]``, reading only what the header index cannot answer.

    ``read(f)`` returns a dict; an image's ``"group"`` value is only compared for
    equality (which files share a patient). Groups answered from the index are labels
    ``"stored-group:N"`` when no file had to be read, the values ``read`` gave otherwise.
    ``need_text``: images need their free text (``"series"``), which the index does not
    hold, so their headers are read again.
    """
    if header_cache is None:
        return _read(read, files, workers)
    store = store_path(header_cache, root, version)
    known = _load(store)
    stamps = [_stamp(f) for f in files]
    fresh = [i for i, s in enumerate(stamps) if not s or s not in known
             or (need_text and known[s][0].get("kind") == "image")]
    fresh_set = set(fresh)
    reuse = [i for i in range(len(files)) if i not in fresh_set]
    headers: list[dict[str, Any] | None] = [None] * len(files)
    for i in reuse:
        headers[i] = dict(known[stamps[i]][0])
    if fresh and reuse:  # one unchanged file per stored group gives that group back
        reps = {}
        for i in reuse:
            reps.setdefault(known[stamps[i]][1], i)
        reps.pop(None, None)
        todo = fresh + sorted(reps.values())
    else:
        reps, todo = {}, fresh
    for i, h in zip(todo, _read(read, [files[i] for i in todo], workers)):
        headers[i] = h
    groups = {gi: headers[i].get("group") for gi, i in reps.items()}
    if any(g is None for g in groups.values()):  # a representative changed under us: read everything
        headers, groups, reuse = _read(read, files, workers), {}, []
    for i in reuse:
        gi = known[stamps[i]][1]
        if gi is not None:
            if gi not in groups:  # nothing was read: the groups are only known as numbers
                groups[gi] = f"stored-group:{gi}"
            headers[i]["group"] = groups[gi]
    if fresh or len(known) != len(files):
        _save(store, stamps, headers)
    return headers


def _load(store: Path) -> dict[str, list]:
    """The stored ``{stamp: [header, group number]}``; entries of another shape are dropped
    (their files are read again), and an unreadable or foreign file is an empty index."""
    saved = read_json(store)
    files = saved.get("files") if saved.get("format") == FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], dict)
            and (v[1] is None or type(v[1]) is int)}


def _read(read: Callable[[str], dict[str, Any]], files: list[str], workers: int) -> list[dict[str, Any]]:
    # ~1-2 ms per header: processes pay off only for thousands of files
    return parallel_map(read, files, workers=workers, min_parallel=2000)


def _stamp(path: str) -> str:
    """A file's key in the index: inode, size and mtime (a changed or replaced file gets a new one)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _save(store: Path, stamps: list[str], headers: list[dict[str, Any]]) -> None:
    """Write the index (0600, atomically); groups become integers in order of appearance."""
    numbers: dict[str, int] = {}
    files = {}
    for stamp, h in zip(stamps, headers):
        if not stamp:
            continue
        group = h.get("group")
        gi = numbers.setdefault(group, len(numbers)) if group is not None else None
        files[stamp] = [{k: v for k, v in h.items() if k not in NOT_STORED}, gi]
    try:
        store.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(store, lambda tmp: tmp.write_text(json.dumps({"format": FORMAT, "files": files})), mode=0o600)
    except (OSError, UsageError):
        pass  # the index only saves time: a run without it reads every header


def stable_groups(files: list[str], headers: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """Rename every image's group after the first file (in walk order) that belongs to it.

    The same folder then gives the same groups, and so the same split, whether its headers
    were read now or answered from the index; the name is a hash of that file's path
    relative to ``root``, never of an identifier.
    """
    first: dict[str, str] = {}
    for f, h in zip(files, headers):
        if h.get("kind") == "image":
            rel = first.setdefault(h["group"], os.path.relpath(f, root))
            h["group"] = "g:" + hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return headers
