"""Walking a source's folder: the files below a root, and the root's own check."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from sslkit.errors import UsageError

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
"""File suffixes of the image formats sslkit's image decoding reads (Pillow, tifffile): the ``folder``
source's files, and what another source reports as an image file that is not its own."""


def walk_files(root: Path, keep, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Regular files below ``root`` (sorted, hidden entries skipped) for which ``keep(path)``.

    Symbolic links are followed, but every real directory is walked once: a link back to
    the root or to a folder already walked (``ln -s . data/self``) or two links to one
    folder add nothing twice and never loop. A link to a folder *above* the root
    (``ln -s .. data/up``, ``ln -s / data/all``) is not followed and is reported: it
    would add the root's siblings, folders the user did not name. Links to other folders
    outside the root are followed. A file reached by several paths (a link to a file under
    the root, a hard link) is listed once, by the first of its paths in sorted order; a
    link to a file outside the root is listed. Entries that are not regular files (FIFOs, sockets,
    devices, dangling links) are never opened; those ``keep`` would take, such links
    above the root, and folders that cannot be listed, are appended to ``skipped`` as
    ``(path, reason)``.
    """
    skipped = skipped if skipped is not None else []
    found: list[Path] = []
    ids: list[tuple[int, int]] = []  # (st_dev, st_ino) of each file found
    seen: set[tuple[int, int]] = set()
    try:
        st = os.stat(root)
        seen.add((st.st_dev, st.st_ino))
    except OSError:
        pass
    above = _ancestors(root)

    def unreadable(exc: OSError) -> None:
        skipped.append((str(exc.filename), f"unreadable folder: {type(exc).__name__}: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        kept_dirs = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(dirpath, d))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in above:  # `ln -s .. data/up`: the root's siblings are not the data
                skipped.append((os.path.join(dirpath, d), ABOVE_ROOT))
            elif (st.st_dev, st.st_ino) not in seen:  # each real directory once
                seen.add((st.st_dev, st.st_ino))
                kept_dirs.append(d)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not keep(path):
                continue
            why, st = _not_regular(path)
            if why:
                skipped.append((str(path), why))
            else:
                found.append(path)
                ids.append((st.st_dev, st.st_ino))
    return _distinct(found, ids)


def _distinct(found: list[Path], ids: list[tuple[int, int]]) -> list[Path]:
    """``found`` in its order with each file (``ids``: device and inode) once: the first of its
    paths in sorted order (``data/a/x.png`` before a link ``data/link.png`` to it)."""
    if len(set(ids)) == len(ids):
        return found
    first: dict[tuple[int, int], str] = {}
    for path, key in sorted(zip(map(str, found), ids)):
        first.setdefault(key, path)
    return [p for p, key in zip(found, ids) if first[key] == str(p)]


#: the reason reported for a folder link that leads above the data root
ABOVE_ROOT = "symbolic link to a folder above the data root: not followed (it would add folders outside the data)"


def _ancestors(root: Path) -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of every folder above ``root``, through its real path and as written."""
    found: set[tuple[int, int]] = set()
    for path in {Path(os.path.realpath(root)), Path(os.path.abspath(root))}:
        for parent in path.parents:
            try:
                st = os.stat(parent)
            except OSError:
                continue
            found.add((st.st_dev, st.st_ino))
    try:  # the root itself (a parent of its path as written can be a link to it)
        st = os.stat(root)
        found.discard((st.st_dev, st.st_ino))
    except OSError:
        pass
    return found


def _not_regular(path: Path) -> tuple[str | None, os.stat_result | None]:
    """Why ``path`` is not a regular file to read (None when it is one), and its ``os.stat``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            return ("symbolic link loop" if exc.errno == errno.ELOOP else "dangling symbolic link"), None
        return f"unreadable: {type(exc).__name__}: {exc.strerror}", None
    if stat.S_ISREG(st.st_mode):
        return None, st
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    return f"not a regular file ({kind}): skipped without opening it", st


def check_dir(location: str, scheme: str) -> Path:
    """``location`` as an existing directory, or a one-line :class:`UsageError` naming ``scheme``."""
    root = Path(location).expanduser()
    if not root.exists():
        raise UsageError(f"{scheme}: data directory {location!r} does not exist")
    if not root.is_dir():
        raise UsageError(f"{scheme}: {location!r} is not a directory")
    return root


def first_files(root: Path, limit: int = 200, max_folders: int = 2000) -> list[Path]:
    """Up to ``limit`` files below ``root`` (hidden entries skipped), depth first, for a source's
    ``sniff``: a root of 300 patient folders is not 300 folder entries and no file (``rglob``'s
    first 200 entries were all folders). At most ``max_folders`` folders are listed; links to
    folders are not followed, so it ends quickly on any tree."""
    found: list[Path] = []
    folders = 0
    for top, dirs, files in os.walk(root, onerror=lambda exc: None):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / f for f in sorted(files) if not f.startswith(".")][: limit - len(found)]
        folders += 1
        if len(found) >= limit or folders >= max_folders:
            break
    return found
