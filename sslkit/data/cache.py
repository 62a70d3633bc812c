"""The decoded-pixel cache on disk: where it lives, what names an entry, listing and clearing.

A cache root holds a marker file (:data:`MARKER`) written by sslkit, entries named by their 32-hex-digit key
(``<key>/pixels.npy`` + ``<key>/index.json``) and the sources' header indexes under ``headers/``. Clearing removes
only those, and refuses a folder without the marker: ``--cache`` may name a folder that holds other things too.
Every file sslkit writes here is mode 0600 in folders of mode 0700.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from sslkit.data.digest import file_digest, unreadable_reason
from sslkit.data.room import cache_ways
from sslkit.data.source import SampleRef, Source, described
from sslkit.errors import UsageError
from sslkit.output_file import read_json
from sslkit.progress import human_bytes

CACHE_FORMAT = 2
#: the decoders' revision, in every cache key: raised when a source's pixels change for the same files and options
#: (3: TIFFs as displayed, big-endian npz, 16-bit colour PNGs reduced at 16 bits, grey + alpha PNGs one channel; 4: a
#: compressed DICOM frame whose stream disagrees with its header is skipped before decoding, bounded PNG/TIFF/NIfTI
#: decoding), so no entry decoded the old way (or holding the old skip reasons) is read again
DECODE_REVISION = 4
MARKER = ".sslkit-cache"
_KEY = re.compile(r"[0-9a-f]{32}")
_HEADER_INDEX = re.compile(r"[a-z0-9_]+-[0-9a-f]{24}\.json")


def default_cache_root() -> Path:
    """``$SSLKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sslkit``, else ``~/.cache/sslkit``."""
    if os.environ.get("SSLKIT_CACHE_DIR"):
        return Path(os.environ["SSLKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sslkit"


def resolve_cache_dir(cache_dir: str | Path | bool | None) -> Path | None:
    """``None`` or ``True``: the default cache root; ``False`` or ``""``: no disk cache."""
    if cache_dir is None or cache_dir is True:
        return default_cache_root()
    if cache_dir is False or str(cache_dir) == "":
        return None
    return Path(cache_dir).expanduser()


def check_named_root(cache_dir: Any, root: Path, what: str) -> None:
    """A missing cache folder the user named (``--cache`` or ``$SSLKIT_CACHE_DIR``: a typo?) is one
    line; a default one never made is an empty cache."""
    if (isinstance(cache_dir, (str, Path)) and str(cache_dir)) or os.environ.get("SSLKIT_CACHE_DIR"):
        raise UsageError(f"no cache folder {str(root)!r}; {what}")


def mark_root(root: Path) -> None:
    """Create the cache root (0700) and its marker, so ``--clear`` knows it is sslkit's."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker = root / MARKER
        if not marker.exists():
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"sslkit_cache": CACHE_FORMAT}) + "\n")
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"cache folder {str(root)!r} cannot be written: {exc.strerror or exc}; "
                         f"{cache_ways()}") from None


_real_folder = functools.lru_cache(maxsize=65536)(os.path.realpath)


def cache_key(source: Source, refs: Sequence[SampleRef], channels: int, size: int,
              unreadable: dict[int, tuple[str, str]] | None = None) -> str:
    """Hash of the preprocessing (source: ``describe()`` and its options, :func:`keyed_options`;
    channels, size, pixel limit) and of every sample's file.

    A file's identity is :func:`file_digest` (content + mtime), so editing, replacing or adding a file,
    or changing ``--window`` or a ``--data-opt`` (but one the source names in ``options_not_in_cache_key``,
    which changes no pixel), gives a new key: a stale cache is never read. A file that cannot be read now
    (removed since the index) raises ``OSError``; given ``unreadable``, its samples are left out of the key
    instead and ``unreadable[i]`` is ``(path, reason)`` for each such sample's index ``i`` in ``refs``: the
    key is then that of the other samples, which the caller keeps."""
    h = hashlib.sha256()
    # the pixel limit decides which files are skipped unread: another limit is another entry
    limit = getattr(source, "max_pixels", None)
    config = [CACHE_FORMAT, DECODE_REVISION, source.scheme, described(source), channels, size, limit]
    options = keyed_options(source)
    if options:  # a source without options keeps the key it had before options were keyed
        config.append(options)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    digests: dict[str, str | OSError] = {}
    # a slab or a volume is read from several files (its series' slices): every one counts
    files_of = getattr(source, "files_of", lambda ref: (ref.path,))
    for i, ref in enumerate(refs):
        files = files_of(ref)
        for path in files:
            if path not in digests:
                try:
                    digests[path] = file_digest(path)
                except OSError as exc:
                    if unreadable is None:
                        raise
                    digests[path] = exc
        lost = next((p for p in files if isinstance(digests[p], OSError)), None)
        if lost is not None:
            unreadable[i] = (lost, unreadable_reason(digests[lost]))  # type: ignore[index, arg-type]
            continue
        folder, name = os.path.split(ref.path)  # its folder resolved: one key however --data was typed
        real = os.path.join(_real_folder(folder or "."), name)
        h.update(f"{real}\0{ref.frame}\0{'|'.join(digests[p] for p in files)}\n".encode(  # type: ignore[misc]
            "utf-8", "surrogateescape"))  # a file name that is not UTF-8 keeps its bytes
    return h.hexdigest()[:32]


def keyed_options(source: Source) -> dict[str, Any]:
    """The values of ``source.options`` that go into its cache key: every field of its ``Options`` dataclass
    but those its class declares in ``options_not_in_cache_key``. Taken here, not from ``describe()``, so
    that a plugin whose ``describe()`` leaves an option out (or is the default ``{}``) never reads pixels
    decoded with another value of it. Canonical (:func:`_canonical`): one key in every process. Options
    should be plain values (numbers, strings, lists, sets, dicts of them): another object is keyed by its
    ``str()``, the plugin's to keep stable."""
    options = getattr(source, "options", None)
    if options is None:
        return {}
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        values = dataclasses.asdict(options)
    else:  # not what registration lets through (Options is a dataclass or None): keyed whole all the same
        values = dict(options) if isinstance(options, dict) else {"": options}
    neutral = getattr(source, "options_not_in_cache_key", frozenset())
    return {k: _canonical(v) for k, v in values.items() if k not in neutral}


def _canonical(value: Any) -> Any:
    """``value`` with each set (in ``PYTHONHASHSEED``'s order) a sorted list, each tuple a list, nested too."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, default=str))
    return [_canonical(v) for v in value] if isinstance(value, (list, tuple)) else value


#: a temporary file sslkit writes in ``headers/`` is renamed within seconds; older ones were left by a killed process
STALE_TMP_S = 600


def remove_stale(root: Path) -> list[str]:
    """Remove what a killed first pass left under ``root``: ``.tmp-*`` entry folders whose ``.lock`` no
    process holds (the filling process holds it with ``flock`` until it renames the folder into place; a
    killed one released it), ones without a lock older than :data:`STALE_TMP_S`, and ``headers/.tmp-*``
    files older than that. Safe while other processes fill the same cache: a live folder's lock is held.
    Returns the names."""
    removed = []
    for folder in (root, root / "headers"):
        try:
            names = sorted(p for p in folder.iterdir() if p.name.startswith(".tmp-"))
        except OSError:
            continue
        for p in names:
            try:
                if p.is_dir() and not p.is_symlink() and folder == root:
                    if not (sslkit_folder(p) and _owner_gone(p) and remove_own(p)):
                        continue
                elif p.is_file() and _age(p) > STALE_TMP_S:
                    p.unlink(missing_ok=True)
                else:
                    continue
            except OSError:  # a cache shared read-only: nothing to tidy
                continue
            removed.append(p.name)
    return removed


#: the files an entry folder (or its temporary folder while it is filled) holds: nothing else is sslkit's
ENTRY_FILES = frozenset({"pixels.npy", "index.json", ".lock"})


def sslkit_folder(d: Path) -> bool:
    """Whether ``d`` holds only files sslkit writes in an entry (:data:`ENTRY_FILES`); one holding
    anything else (a user's folder with a key's name) is never listed nor deleted."""
    try:
        return all(f.name in ENTRY_FILES and f.is_file() and not f.is_symlink() for f in d.iterdir())
    except OSError:
        return False


def remove_own(d: Path) -> bool:
    """Delete sslkit's files in the entry folder ``d``, then ``d`` if now empty (False: something
    else appeared in it, left as it is). ``OSError`` where a file cannot be deleted (read-only)."""
    for name in ("index.json", "pixels.npy", ".lock"):  # the index first: a half-deleted entry is never read
        (d / name).unlink(missing_ok=True)
    try:
        d.rmdir()
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _age(p: Path) -> float:
    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


def _owner_gone(tmp: Path) -> bool:
    """Whether no process is filling ``tmp`` any more (its ``.lock`` is free, or absent and old)."""
    try:
        fd = os.open(tmp / ".lock", os.O_RDWR)
    except FileNotFoundError:
        return _age(tmp) > STALE_TMP_S
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def hold_fill_lock(tmp: Path) -> int:
    """Create and ``flock`` ``tmp/.lock`` for as long as this process fills ``tmp``
    (released when the returned descriptor is closed or the process dies)."""
    fd = os.open(tmp / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def reserve(path: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` of ``path`` on the disk now, so that writing into its memory map
    later cannot hit a full disk (which kills the process with SIGBUS)."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                raise
            if shutil.disk_usage(path.parent).free < nbytes:  # no fallocate here: the free space must do
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
    finally:
        os.close(fd)


def disk_full_error(root: Path, exc: OSError, nbytes: int) -> UsageError:
    """The one line for a cache that could not be written."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)  # else read-only, or not ours: no space to free
    return UsageError(f"cannot write the decoded-pixel cache in {str(root)!r} ({human_bytes(nbytes)}): "
                      f"{exc.strerror or exc}; {cache_ways(*(['free space'] if full else []))}")


def open_entry(target: Path, shape: tuple[int, ...]) -> tuple[Any, dict[str, Any]]:
    """The pixels (memory-mapped) and index of the complete entry ``target`` for an array of ``shape``.
    ``ValueError`` names the damage when the entry cannot be what sslkit wrote (index not an sslkit index, sample
    indices out of range, pixels truncated or of another shape): a damaged entry is never read as data."""
    import numpy as np

    try:
        meta = json.loads((target / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"index.json unreadable ({type(exc).__name__})") from None
    if not (isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT and isinstance(meta.get("kept"), list)
            and isinstance(meta.get("skipped"), list)):
        raise ValueError("index.json is not an sslkit cache index")
    kept, skipped = meta["kept"], meta["skipped"]
    if not all(type(i) is int for i in kept) or kept != sorted(set(kept)) or \
            (kept and not 0 <= kept[0] <= kept[-1] < shape[0]):
        raise ValueError("index.json's sample indices are out of range")
    if not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, str) for v in s) for s in skipped):
        raise ValueError("index.json's skipped list is malformed")
    if meta.get("shape") != [len(kept), *shape[1:]]:
        raise ValueError(f"index.json lists {len(kept)} samples and shape {meta.get('shape')}: they disagree")
    try:
        pixels = np.load(target / "pixels.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"pixels.npy unreadable or truncated ({type(exc).__name__})") from None
    if pixels.dtype != np.uint16 or tuple(pixels.shape) != tuple(shape):
        raise ValueError(f"pixels.npy holds {pixels.dtype} {tuple(pixels.shape)}, not uint16 {tuple(shape)}")
    if "check" in meta and meta["check"] != entry_check(pixels, meta):  # entries written before the check have none
        raise ValueError("its index or pixels changed after it was written (check digest differs)")
    return pixels, meta


def entry_check(pixels: Any, meta: dict[str, Any], samples: int = 8) -> str:
    """Digest of an entry's index (shape, kept, skipped) and of the pixels of ``samples`` kept
    samples spread over it, compared on every open (a constant cost, whatever the size): an
    edited index or pixels overwritten wholesale (zeroed) no longer match; one sample among
    many may (hashing all pixels would cost about a second per GB, on every open)."""
    import numpy as np

    n = len(meta["kept"])
    h = hashlib.blake2b(json.dumps([meta["format"], meta["shape"], meta["kept"], meta["skipped"]]).encode(),
                        digest_size=16)
    for i in sorted({int(i) for i in np.linspace(0, n - 1, min(n, samples))}):
        h.update(np.ascontiguousarray(pixels[i]).tobytes())
    return h.hexdigest()


def discard_entry(target: Path, damage: str) -> None:
    """Say on stderr that the entry ``target`` is damaged (``damage``: how), move it aside atomically
    (no process sees half of it), delete it (a process mapping its pixels keeps them); where it
    cannot be moved (a read-only cache), one :class:`UsageError` line: neither read nor replaced."""
    aside = target.parent / f".tmp-damaged-{target.name}-{os.getpid()}"
    try:
        os.replace(target, aside)
    except OSError as exc:
        if os.path.lexists(target):  # not moved first by another process: this cache cannot be written
            raise UsageError(f"the decoded-pixel cache entry {target.name} is damaged: {damage}; it cannot be "
                             f"replaced in {str(target.parent)!r} ({exc.strerror or exc}): {cache_ways()}") from None
    print(f"sslkit: the decoded-pixel cache entry {target.name} is damaged: {damage}; decoding again",
          file=sys.stderr)
    with contextlib.suppress(OSError):  # else left for remove_stale
        remove_own(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink(missing_ok=True)


def cache_entries(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Entries under the cache root: key, path, bytes, samples, shape, source, last use.

    A key-named folder that is not a complete entry of this sslkit's format (damaged, or of
    another version: never read) is listed with ``usable`` False and no samples, so that its
    space shows and clearing removes it; one holding other files is not sslkit's: not listed."""
    root = resolve_cache_dir(cache_dir) or default_cache_root()
    if not root.is_dir():
        check_named_root(cache_dir, root, "nothing to list")
    out = []
    for d in _key_folders(root)[0]:
        index = d / "index.json"
        meta = read_json(index)
        usable = meta.get("format") == CACHE_FORMAT
        meta = meta if usable else {}
        used = (index if usable else d).stat().st_mtime
        out.append({
            "key": d.name, "path": str(d), "usable": usable,
            "bytes": sum(f.stat().st_size for f in d.iterdir() if f.is_file() and not f.is_symlink()),
            "samples": len(meta.get("kept", [])), "shape": meta.get("shape"), "source": meta.get("source"),
            "created": meta.get("created"),
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(used)),
            "age_days": round((time.time() - used) / 86400, 2),
        })
    return out


def _key_folders(root: Path) -> tuple[list[Path], list[Path]]:
    """The key-named folders under ``root``: sslkit's entries, and the others (:func:`sslkit_folder`)."""
    ours = {d: sslkit_folder(d) for d in (sorted(root.iterdir()) if root.is_dir() else [])
            if _KEY.fullmatch(d.name) and not d.is_symlink() and d.is_dir()}  # each folder listed once
    return [d for d, mine in ours.items() if mine], [d for d, mine in ours.items() if not mine]


def clear_cache(cache_dir: str | Path | None = None, older_than_days: float | None = None) -> list[dict[str, Any]]:
    """Delete cache entries (all, or those unused for ``older_than_days``); returns them.

    Only what sslkit wrote is removed: the files of key-named folders (complete entries, and unusable ones: damaged,
    or of another sslkit's format), each folder when that empties it, and (clearing all) the header indexes in
    ``headers/``. A key-named folder holding other files is left whole, named on stderr. A folder without sslkit's
    marker is refused, nothing deleted; a file that cannot be deleted (read-only) is one line naming its folder."""
    root = resolve_cache_dir(cache_dir) or default_cache_root()
    if not root.is_dir():
        check_named_root(cache_dir, root, "nothing deleted")
        return []
    if not (root / MARKER).is_file():
        raise UsageError(f"{str(root)!r} is not an sslkit cache (no {MARKER} marker file); nothing deleted")
    removed, folder = [], root
    try:
        for entry in cache_entries(root):
            if older_than_days is None or entry["age_days"] >= older_than_days:
                folder = Path(entry["path"])
                if remove_own(folder):
                    removed.append(entry)
        headers = folder = root / "headers"
        if older_than_days is None and headers.is_dir() and not headers.is_symlink():
            for f in headers.iterdir():
                if _HEADER_INDEX.fullmatch(f.name) and f.is_file():
                    f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                headers.rmdir()  # only if nothing else is left in it
    except OSError as exc:
        raise UsageError(f"cannot delete in {str(folder)!r}: {exc.strerror or exc}; "
                         f"{len(removed)} cache entries removed before it") from None
    for d in _key_folders(root)[1]:
        print(f"sslkit: left {str(d)!r}: it holds files sslkit does not write", file=sys.stderr)
    return removed
