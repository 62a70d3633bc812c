"""Walking a source's folder: the files below a root, and the root's own check."""

from __future__ import annotations

import os
from pathlib import Path

from sslkit.errors import UsageError


def walk_files(root: Path, keep) -> list[Path]:
    """Files below ``root`` (sorted, hidden folders skipped) for which ``keep(path)``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and keep(Path(dirpath) / f)]
    return found


def check_dir(location: str, scheme: str) -> Path:
    """``location`` as an existing directory, or a one-line :class:`UsageError` naming ``scheme``."""
    root = Path(location).expanduser()
    if not root.exists():
        raise UsageError(f"{scheme}: data directory {location!r} does not exist")
    if not root.is_dir():
        raise UsageError(f"{scheme}: {location!r} is not a directory")
    return root
