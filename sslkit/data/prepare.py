"""Decode every sample once into a fixed-size pixel array (optionally a disk cache).

The array is ``(N, C, S, S)`` uint16 holding ``round(x * 65535)`` for pixels ``x`` in
[0, 1]: 16-bit data keeps its precision, and the training loop reads batches from it
(memory-mapped when cached) without touching a source file again.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sslkit.data.cache import (CACHE_FORMAT, cache_key, discard_entry, disk_full_error, entry_check, hold_fill_lock,
                               mark_root, open_entry, remove_stale, reserve, resolve_cache_dir)
from sslkit.data.digest import PROGRESS_FROM, readable
from sslkit.data.digest import FINGERPRINT_SCHEME, FINGERPRINT_SCHEMES, fingerprint  # noqa: F401 (imported from here)
from sslkit.data.parallel import pool_size, spawned_workers
from sslkit.data.quantize import SCALE, to_uint16
from sslkit.data.resize import resize_axis_aa
from sslkit.data.room import check_room, sides
from sslkit.data.skips import skip_reason, transient
from sslkit.data.source import NotAnImage, SampleRef, Source, to_channels
from sslkit.errors import UsageError
from sslkit.host_malloc import tune_host_malloc
from sslkit.progress import counted


@dataclass
class Prepared:
    pixels: np.ndarray  # (N, C, S, S) uint16
    refs: list[SampleRef]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache_path: str | None = None

    def __len__(self) -> int:
        return len(self.refs)


def resize_square(x: np.ndarray, size: int) -> np.ndarray:
    """``(C, H, W)`` -> ``(C, size, size)``: shorter side to ``size`` (antialiased), centre crop.

    Antialiased bilinear as torch's ``F.interpolate(..., antialias=True)`` computes it (up
    to float rounding), in numpy (:mod:`sslkit.data.resize`), so decode workers need no torch.
    """
    c, h, w = x.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = np.asarray(x, dtype=np.float32)
        x = resize_axis_aa(resize_axis_aa(x, 2, nw), 1, nh) if w / nw >= h / nh else \
            resize_axis_aa(resize_axis_aa(x, 1, nh), 2, nw)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = np.ascontiguousarray(x[:, top : top + size, left : left + size])
    return x


def majority_channels(source: Source, refs: Sequence[SampleRef], limit: int = 512) -> int:
    """The channel count most samples have (1 on a tie), read from headers where possible.

    A 2D sample has at most 4 channels (a slab of K slices: 4 K); a source whose samples mostly have
    more (channels last, ``(H, W, C)``) is refused in one line rather than training a wide encoder."""
    from sslkit.data.volume import sample_mode

    counts: dict[int, int] = {}
    step = max(1, len(refs) // limit)
    for ref in refs[::step]:
        c = source.channels_of(ref)
        if c is None:
            try:
                c = source.load(ref).shape[0]
            except Exception:
                continue
        c = 3 if c in (3, 4) else (c if c > 4 else 1)  # > 4: a slab of K slices (sslkit.data.volume)
        counts[c] = counts.get(c, 0) + 1
    best = max(sorted(counts), key=lambda k: (counts[k], -k)) if counts else 1
    most = 4 * sample_mode(source).slab
    if best > most and not sample_mode(source).volumetric:
        raise UsageError(f"source {getattr(source, 'scheme', '?')!r} gives samples of {best} channels; a sample is "
                         f"(C, H, W) with at most {most} channels (is it channels last, (H, W, C)?)")
    return best


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
    Its disk space is allocated before the first write, so a full disk is one
    :class:`UsageError` line, not a SIGBUS. An array that cannot fit the disk (or, in
    memory, the RAM) is refused before anything is decoded. Files that cannot be read
    are skipped with a reason. Decoding runs in ``workers`` processes (0: one per CPU;
    serial for few samples). ``skipped`` paths are relative to the data root.
    """
    if isinstance(size, int):  # what a decoder may reduce a huge image to (Source.sample_side); in its describe()
        source.sample_side = size
    refs = list(refs)
    refs, unreadable = readable(counted(refs, len(refs), "checking files", "samples",
                                        progress and len(refs) >= PROGRESS_FROM), source.relative)
    root = resolve_cache_dir(cache_dir)
    if root is None:
        shape = (len(refs), channels, *sides(size))
        check_room(None, int(np.prod(shape, dtype=np.int64)) * 2, shape, channels, size)
        pixels = np.empty(shape, dtype=np.uint16)
        kept, skipped = _decode(source, refs, pixels, progress, workers)
        return Prepared(pixels[: len(kept)], [refs[i] for i in kept], unreadable + skipped)
    mark_root(root)
    remove_stale(root)  # what a killed first pass left
    key, refs = _keyed(source, refs, channels, size, unreadable)
    shape = (len(refs), channels, *sides(size))
    nbytes = int(np.prod(shape, dtype=np.int64)) * 2
    target = root / key
    entry = None
    if os.path.lexists(target):  # entries appear whole (renamed into place): this one is complete or damaged
        try:
            entry = open_entry(target, shape)
        except ValueError as exc:
            discard_entry(target, str(exc))  # says so; one line where it cannot (a read-only cache)
        else:
            try:
                os.utime(target / "index.json")  # "last used", for `sslkit data cache --clear-older-than`
            except OSError:
                pass  # a cache shared read-only is still read
    if entry is None:
        check_room(root, nbytes, shape, channels, size)  # a cached entry needs neither room nor decoding
        entry = _fill_entry(source, refs, shape, target, progress, workers) or open_entry(target, shape)
    pixels, meta = entry
    pixels = pixels[: len(meta["kept"])]
    kept_refs = [refs[i] for i in meta["kept"]]
    return Prepared(pixels, kept_refs, unreadable + [tuple(s) for s in meta["skipped"]], str(target))


def _keyed(source: Source, refs: list[SampleRef], channels: int, size, unreadable: list[tuple[str, str]]
           ) -> tuple[str, list[SampleRef]]:
    """The cache key and the samples it covers: a file removed (or made unreadable) since
    :func:`readable` checked it is skipped as unreadable, one reason per file added to
    ``unreadable``, and its samples are left out, as if it had been gone at the index."""
    gone: dict[int, tuple[str, str]] = {}
    key = cache_key(source, refs, channels, size, gone)
    if not gone:
        return key, refs
    unreadable += dict.fromkeys((source.relative(path), why) for path, why in gone.values())
    return key, [ref for i, ref in enumerate(refs) if i not in gone]


def _fill_entry(source: Source, refs: list[SampleRef], shape: tuple[int, ...], target: Path, progress: bool,
                workers: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Decode into ``target`` through a temporary folder beside it (removed on any failure;
    after a SIGKILL, by the next :func:`prepare`: its ``.lock`` is then free). A pass with a
    :func:`transient` skip is not kept: its pixels and index are returned (the folder removed)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * 2
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        lock = hold_fill_lock(tmp)
    except OSError as exc:
        raise disk_full_error(target.parent, exc, nbytes) from None
    try:
        try:
            out = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint16, shape=shape)
            os.chmod(tmp / "pixels.npy", 0o600)
            reserve(tmp / "pixels.npy", out.offset + nbytes)
        except OSError as exc:
            raise disk_full_error(target.parent, exc, nbytes) from None
        kept, skipped = _decode(source, refs, out, progress, workers)
        meta = {"format": CACHE_FORMAT, "source": f"{source.scheme}:{source.location}",
                "preprocessing": source.describe(), "shape": [len(kept), *shape[1:]],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kept": kept, "skipped": [list(s) for s in skipped]}
        meta["check"] = entry_check(out, meta)  # what open_entry compares: an edited index or pixels
        short = sum(transient(reason) for _, reason in skipped)
        if short:  # mapped: its pages outlive the removed file
            print(f"sslkit: {short} file{'s' if short > 1 else ''} skipped for lack of memory (data_report.json): "
                  f"these decoded pixels are not cached, so the next run decodes them all again and retries; "
                  f"free memory (or remove such files) to keep them", file=sys.stderr)
            return out, meta
        try:
            out.flush()
            del out
            fd = os.open(tmp / "index.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f, default=str)
        except OSError as exc:
            raise disk_full_error(target.parent, exc, nbytes) from None
        try:
            (tmp / ".lock").unlink()
            os.replace(tmp, target)
        except OSError:  # another process finished the same entry first: use theirs
            if not (target / "index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)
    return None


_WORKER: dict[str, Any] = {}


def _init_worker(source: Source, channels: int, size: int) -> None:
    # as the sslkit command's own process (cli.py): a spawned worker untuned page-faulted its decode buffers
    # in afresh, ~3x the faults (BENCHMARKS.md "First pass on an RLE Lossless corpus")
    tune_host_malloc()
    if "torch" in sys.modules:  # only where a source needs it: the decode itself does not
        sys.modules["torch"].set_num_threads(1)
    _WORKER.update(source=source, channels=channels, size=size)


def _decode_one(ref: SampleRef) -> np.ndarray | str | None:
    """uint16 ``(C, S, S)``, a skip reason (values outside [0, 1] too), or None for a skipped non-image."""
    source, channels, size = _WORKER["source"], _WORKER["channels"], _WORKER["size"]
    try:
        x = source.load(ref)
        if not isinstance(size, int):  # a volume (C, D, H, W), already fitted by the source
            if x.shape[1:] != tuple(size):
                raise ValueError(f"volume of shape {tuple(x.shape)}, expected (C, {', '.join(map(str, size))})")
            x = to_channels(x, channels)
        elif x.ndim != 3 or min(x.shape[1:]) < 2:
            raise ValueError(f"unusable image shape {tuple(x.shape)}")
        else:
            x = resize_square(to_channels(x, channels), size)
    except NotAnImage:
        return None
    except Exception as exc:
        return " ".join(skip_reason(exc).split())[:500]
    return to_uint16(x, source)  # or why its values cannot be stored


#: decode this long (seconds) in this process before deciding on worker processes
PROBE_S = 0.5
#: start workers only when the rest would take longer than this (seconds) here: a spawned
#: worker needs ~0.6 s of CPU to start (numpy, pydicom, the source's plugin: no torch)
POOL_PAYOFF_S = 2.0


def _decode(
    source: Source, refs: list[SampleRef], out: np.ndarray, progress: bool, workers: int = 0
) -> tuple[list[int], list[tuple[str, str]]]:
    """Fill ``out`` front to back with the decodable samples; return kept indices, skips.

    Skips are one ``(path relative to the data root, reason)`` per file, however many of
    its frames failed (the reason then says how many). Results are consumed in order as
    they arrive (:func:`_results`), so memory stays bounded by the chunks in flight.
    """
    kept: list[int] = []
    failed: dict[str, list] = {}  # path -> [first reason, frames failed]
    channels, size = out.shape[1], (out.shape[2] if out.ndim == 4 else tuple(out.shape[2:]))
    n = min(pool_size(len(refs), workers, min_parallel=2), len(refs)) if source.parallel_decode else 1
    results = _results(source, refs, channels, size, n)
    bar = counted(results, len(refs), "decoding", "img", progress)
    for i, (ref, res) in enumerate(zip(refs, bar)):
        if res is None:
            continue
        if isinstance(res, str):
            failed.setdefault(ref.path, [res, 0])[1] += 1
            continue
        out[len(kept)] = res
        kept.append(i)
    skipped = [(source.relative(path), reason if n == 1 else f"{reason} ({n} frames)")
               for path, (reason, n) in failed.items()]
    return kept, skipped


def _results(source: Source, refs: list[SampleRef], channels: int, size, n: int):
    """:func:`_decode_one` of every ref, in order: in this process for :data:`PROBE_S`, then,
    when the rest would take longer than :data:`POOL_PAYOFF_S` at the rate seen, in ``n``
    processes: this one and ``n - 1`` spawned workers (:mod:`sslkit.data.parallel`), in
    chunks of adjacent refs (the frames of a multi-frame file mostly read by one process
    once, a whole-file source's files each by one: :func:`_shared`). A worker that dies (out
    of memory, a crashing codec) leaves the rest to this process."""
    i, t0 = 0, time.perf_counter()
    _WORKER.update(source=source, channels=channels, size=size)
    try:
        while i < len(refs):
            yield _decode_one(refs[i])
            i += 1
            spent = time.perf_counter() - t0
            if n > 1 and spent >= PROBE_S:
                if spent / i * (len(refs) - i) > POOL_PAYOFF_S:
                    break
                n = 1  # the rest is quicker here than a pool's start
        if i < len(refs):
            yield from _shared(source, refs[i:], channels, size, min(n, len(refs) - i))
    finally:
        _WORKER.clear()


def _shared(source: Source, rest: list[SampleRef], channels: int, size, n: int):
    """``rest`` in order, by this process and ``n - 1`` spawned workers, in chunks (:func:`_plan`):
    process 0's here, the others submitted up to :data:`AHEAD` chunks a worker ahead (memory holds
    that many chunks of results). ``loads_whole_file`` (a compressed volume read whole for any slice) and
    files of several refs: each file's on one process (a worker: a pool of its own), 4 x as far ahead."""
    if n < 2:
        yield from (_decode_one(ref) for ref in rest)
        return
    by_file = bool(getattr(source, "loads_whole_file", False)) and len({r.path for r in rest}) < len(rest)
    chunks = _plan(rest, n, max(1, min(32, len(rest) // (n * 4))), by_file)
    with spawned_workers():  # an unguarded script stopped in each worker: one line, not one per worker
        pools = [_pool(source, channels, size, w) for w in ([1] * (n - 1) if by_file else [n - 1])]
        ahead = AHEAD * (4 if by_file else 1)
        pending: dict[int, Any] = {}
        done = 0
        try:
            for k, (owner, part) in enumerate(chunks):
                busy = Counter(chunks[j][0] for j in pending)
                for j in range(k, min(len(chunks), k + ahead * n)):  # keep the workers fed
                    who = chunks[j][0]
                    if who and j not in pending and busy[who] < ahead:
                        pending[j] = pools[(who - 1) % len(pools)].submit(_decode_chunk, chunks[j][1])
                        busy[who] += 1
                results = pending.pop(k).result() if owner else _decode_chunk(part)
                yield from results
                done += len(part)
        except BrokenProcessPool:
            yield from (_decode_one(ref) for ref in rest[done:])  # the rest here
        finally:  # also when the caller stops early: drop the chunks not started
            for pool in pools:
                pool.shutdown(cancel_futures=True)


AHEAD = 2  # chunks a worker may be ahead of the results taken (x 4 where it holds whole files)


def _pool(source: Source, channels: int, size, workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(source, channels, size))


def _plan(refs: list[SampleRef], n: int, chunk: int, by_file: bool) -> list[tuple[int, list[SampleRef]]]:
    """``(process, refs)`` of adjacent refs, up to ``chunk`` a chunk, the processes (0: this one)
    taking turns chunk by chunk. ``by_file``: a file's refs stay with the process that met it first,
    however many chunks they fill; the next process takes the next file once this turn has a chunk."""
    plan: list[tuple[int, list[SampleRef]]] = []
    owners: dict[str, int] = {}
    turn, taken = 0, 0  # refs given to this turn's process
    for ref in refs:
        owner = owners.get(ref.path) if by_file else None
        if owner is None:
            if taken >= chunk:
                turn, taken = turn + 1, 0
            owner = turn % n
            if by_file:
                owners[ref.path] = owner
        taken += owner == turn % n
        if not plan or plan[-1][0] != owner or len(plan[-1][1]) >= chunk:
            plan.append((owner, []))
        plan[-1][1].append(ref)
    return plan


def _decode_chunk(refs: list[SampleRef]) -> list:
    return [_decode_one(ref) for ref in refs]


def channel_stats(pixels: np.ndarray, limit: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``limit`` evenly spaced samples, in [0, 1] units."""
    step = max(1, len(pixels) // limit)
    sample = np.asarray(pixels[::step], dtype=np.float64) / SCALE
    axes = tuple(a for a in range(sample.ndim) if a != 1)  # all but channels (2D or 3D samples)
    mean = sample.mean(axis=axes)
    std = np.maximum(sample.std(axis=axes), 1e-3)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


#: below this span of the data's values (in [0, 1] units), the views see the data rescaled to [0, 1]
NARROW_SPAN = 0.5


def value_range(pixels: np.ndarray, limit: int = 4096) -> tuple[float, float]:
    """The lowest and highest value (in [0, 1] units) of up to ``limit`` evenly spaced samples
    when they span less than :data:`NARROW_SPAN` (12-bit content in 16-bit files spans about
    0.0625), else ``(0.0, 1.0)``: the range the views' intensity ops take as the data's full one
    (:attr:`sslkit.spec.InputSpec.value_range`)."""
    if not len(pixels):
        return 0.0, 1.0
    sample = np.asarray(pixels[:: max(1, len(pixels) // limit)])
    lo, hi = float(sample.min()) / SCALE, float(sample.max()) / SCALE
    return (round(lo, 6), round(hi, 6)) if 0 < hi - lo < NARROW_SPAN else (0.0, 1.0)
