"""Decode every sample once into a fixed-size pixel array (optionally a disk cache).

The array is ``(N, C, S, S)`` uint16 holding ``round(x * 65535)`` for pixels ``x`` in
[0, 1]: 16-bit data keeps its precision, and the training loop reads batches from it
(memory-mapped when cached) without touching a source file again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sslkit.data.parallel import pool_size
from sslkit.data.source import NotAnImage, SampleRef, Source, Undecodable, to_channels

CACHE_FORMAT = 2
SCALE = 65535.0


@dataclass
class Prepared:
    pixels: np.ndarray  # (N, C, S, S) uint16
    refs: list[SampleRef]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache_path: str | None = None

    def __len__(self) -> int:
        return len(self.refs)


def resize_square(x: np.ndarray, size: int) -> np.ndarray:
    """``(C, H, W)`` -> ``(C, size, size)``: shorter side to ``size`` (antialiased), centre crop."""
    c, h, w = x.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        x = t[:, top : top + size, left : left + size].numpy()
    return x


def majority_channels(source: Source, refs: Sequence[SampleRef], limit: int = 512) -> int:
    """The channel count most samples have (1 on a tie), read from headers where possible."""
    counts: dict[int, int] = {}
    step = max(1, len(refs) // limit)
    for ref in refs[::step]:
        c = source.channels_of(ref)
        if c is None:
            try:
                c = source.load(ref).shape[0]
            except Exception:
                continue
        c = 3 if c in (3, 4) else 1
        counts[c] = counts.get(c, 0) + 1
    if not counts:
        return 1
    return max(sorted(counts), key=lambda k: (counts[k], -k))


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


def file_digest(path: str, block: int = 4096) -> str:
    """Identity of a file's content: size, mtime and its first and last ``block`` bytes."""
    st = os.stat(path)
    h = hashlib.blake2b(f"{st.st_size}\0{st.st_mtime_ns}\0".encode(), digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(block))
        if st.st_size > block:
            f.seek(max(block, st.st_size - block))
            h.update(f.read(block))
    return h.hexdigest()


def cache_key(source: Source, refs: Sequence[SampleRef], channels: int, size: int) -> str:
    """Hash of the preprocessing (source config, channels, size) and of every sample's file.

    A file's identity is :func:`file_digest` (content + mtime), so editing, replacing or
    adding a file, or changing ``--window`` etc., gives a new key: a stale cache is never read.
    """
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, source.scheme, source.describe(), channels, size], sort_keys=True, default=str).encode())
    digests: dict[str, str] = {}
    for ref in refs:
        if ref.path not in digests:
            digests[ref.path] = file_digest(ref.path)
        h.update(f"{ref.path}\0{ref.frame}\0{digests[ref.path]}\n".encode())
    return h.hexdigest()[:32]


def prepare(
    source: Source,
    refs: Sequence[SampleRef],
    channels: int,
    size: int,
    cache_dir: str | Path | bool | None = False,
    progress: bool = True,
    workers: int = 0,
) -> Prepared:
    """Decode, convert channels, resize; reuse the cache entry ``<cache_dir>/<key>`` if any.

    ``cache_dir`` as in :func:`resolve_cache_dir`. Without a cache the array lives in
    memory; with one it is written straight to a memory-mapped file in a temporary
    folder renamed into place when complete (an interrupted pass leaves no half entry).
    Decoding runs in ``workers`` processes (0: one per CPU; serial for few samples).
    """
    refs = list(refs)
    shape = (len(refs), channels, size, size)
    root = resolve_cache_dir(cache_dir)
    if root is None:
        pixels = np.empty(shape, dtype=np.uint16)
        kept, skipped = _decode(source, refs, pixels, progress, workers)
        return Prepared(pixels[: len(kept)], [refs[i] for i in kept], skipped)
    target = root / cache_key(source, refs, channels, size)
    if not (target / "index.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            out = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint16, shape=shape)
            kept, skipped = _decode(source, refs, out, progress, workers)
            out.flush()
            del out
            (tmp / "index.json").write_text(json.dumps({
                "format": CACHE_FORMAT, "source": f"{source.scheme}:{source.location}",
                "preprocessing": source.describe(), "shape": [len(kept), *shape[1:]],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kept": kept, "skipped": skipped,
            }, default=str))
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished the same entry first: use theirs
                if not (target / "index.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.utime(target / "index.json")  # "last used", for `sslkit data cache --clear-older-than`
    meta = json.loads((target / "index.json").read_text())
    pixels = np.load(target / "pixels.npy", mmap_mode="r")[: len(meta["kept"])]
    kept_refs = [refs[i] for i in meta["kept"]]
    return Prepared(pixels, kept_refs, [tuple(s) for s in meta["skipped"]], str(target))


def cache_entries(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Complete entries under the cache root: key, path, bytes, samples, shape, source, last use."""
    root = resolve_cache_dir(cache_dir) or default_cache_root()
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        index = d / "index.json"
        if d.name.startswith(".") or not index.is_file():
            continue
        try:
            meta = json.loads(index.read_text())
        except ValueError:
            meta = {}
        out.append({
            "key": d.name, "path": str(d), "bytes": sum(f.stat().st_size for f in d.iterdir() if f.is_file()),
            "samples": len(meta.get("kept", [])), "shape": meta.get("shape"), "source": meta.get("source"),
            "created": meta.get("created"), "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(index.stat().st_mtime)),
            "age_days": round((time.time() - index.stat().st_mtime) / 86400, 2),
        })
    return out


def clear_cache(cache_dir: str | Path | None = None, older_than_days: float | None = None) -> list[dict[str, Any]]:
    """Delete cache entries (all, or those unused for ``older_than_days``); returns them."""
    removed = []
    for entry in cache_entries(cache_dir):
        if older_than_days is None or entry["age_days"] >= older_than_days:
            shutil.rmtree(entry["path"], ignore_errors=True)
            removed.append(entry)
    if older_than_days is None:  # everything: the sources' header indexes too
        shutil.rmtree((resolve_cache_dir(cache_dir) or default_cache_root()) / "headers", ignore_errors=True)
    return removed


_WORKER: dict[str, Any] = {}


def _init_worker(source: Source, channels: int, size: int) -> None:
    torch.set_num_threads(1)
    _WORKER.update(source=source, channels=channels, size=size)


def _decode_one(ref: SampleRef) -> np.ndarray | str | None:
    """uint16 ``(C, S, S)``, a skip reason, or None for a silently skipped non-image."""
    source, channels, size = _WORKER["source"], _WORKER["channels"], _WORKER["size"]
    try:
        x = source.load(ref)
        if x.ndim != 3 or min(x.shape[1:]) < 2:
            raise ValueError(f"unusable image shape {tuple(x.shape)}")
        x = resize_square(to_channels(x, channels), size)
    except NotAnImage:
        return None
    except Exception as exc:
        reason = str(exc) if isinstance(exc, Undecodable) else f"{type(exc).__name__}: {exc}"
        return " ".join(reason.split())[:300]
    return np.clip(np.rint(x * SCALE), 0, SCALE).astype(np.uint16)


def _decode(
    source: Source, refs: list[SampleRef], out: np.ndarray, progress: bool, workers: int = 0
) -> tuple[list[int], list[tuple[str, str]]]:
    """Fill ``out`` front to back with the decodable samples; return kept indices, skips.

    Runs in worker processes for many samples (:mod:`sslkit.data.parallel`), in chunks of
    adjacent refs, so the frames of a multi-frame file are mostly read by one worker once.
    Results are consumed in order as they arrive, so memory stays bounded by the chunks
    in flight.
    """
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    channels, size = out.shape[1], out.shape[2]
    n = pool_size(len(refs), workers) if source.parallel_decode else 1
    pool = None
    if n > 1:
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                   initargs=(source, channels, size))
        results = pool.map(_decode_one, refs, chunksize=max(1, min(32, len(refs) // (n * 4))))
    else:
        _WORKER.update(source=source, channels=channels, size=size)
        results = map(_decode_one, refs)
    try:
        bar = tqdm(results, total=len(refs), desc="decoding", unit="img", disable=not progress, leave=False)
        for i, (ref, res) in enumerate(zip(refs, bar)):
            if res is None:
                continue
            if isinstance(res, str):
                skipped.append((ref.id, res))
                continue
            out[len(kept)] = res
            kept.append(i)
    except BrokenProcessPool:  # a worker died (out of memory, a crashing codec...): redo it all here
        pool.shutdown(cancel_futures=True)
        pool = None
        return _decode(source, refs, out, progress, workers=1)
    finally:
        _WORKER.clear()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return kept, skipped


def channel_stats(pixels: np.ndarray, limit: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``limit`` evenly spaced samples, in [0, 1] units."""
    step = max(1, len(pixels) // limit)
    sample = np.asarray(pixels[::step], dtype=np.float64) / SCALE
    mean = sample.mean(axis=(0, 2, 3))
    std = np.maximum(sample.std(axis=(0, 2, 3)), 1e-3)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def fingerprint(refs: Sequence[SampleRef], extra: Any = None) -> str:
    """A hash naming the dataset (file names and sizes), for run.json. Holds no paths."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for ref in sorted(refs, key=lambda r: (r.path, r.frame or 0)):
        h.update(f"{Path(ref.path).name}\0{ref.frame}\0{os.path.getsize(ref.path)}\n".encode())
    return h.hexdigest()[:16]
