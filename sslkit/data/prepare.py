"""Decode every sample once into a fixed-size pixel array (optionally a disk cache).

The array is ``(N, C, S, S)`` uint16 holding ``round(x * 65535)`` for pixels ``x`` in
[0, 1]: 16-bit data keeps its precision, and the training loop reads batches from it
(memory-mapped when cached) without touching a source file again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sslkit.data.source import SampleRef, Source, to_channels

CACHE_FORMAT = 1
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


def cache_key(source: Source, refs: Sequence[SampleRef], channels: int, size: int) -> str:
    """Hash of the preprocessing and of every file's identity (path, size, mtime)."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, source.scheme, source.describe(), channels, size], sort_keys=True, default=str).encode())
    for ref in refs:
        st = os.stat(ref.path)
        h.update(f"{ref.path}\0{ref.frame}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def prepare(
    source: Source,
    refs: Sequence[SampleRef],
    channels: int,
    size: int,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Prepared:
    """Decode, convert channels, resize; reuse ``cache_dir/<key>`` when it exists.

    Without ``cache_dir`` the array lives in memory; with it, it is written straight to a
    memory-mapped file in a temporary folder that is renamed into place when complete.
    """
    refs = list(refs)
    shape = (len(refs), channels, size, size)
    if cache_dir is None:
        pixels = np.empty(shape, dtype=np.uint16)
        kept, skipped = _decode(source, refs, pixels, progress)
        return Prepared(pixels[: len(kept)], [refs[i] for i in kept], skipped)
    target = Path(cache_dir) / cache_key(source, refs, channels, size)
    if not (target / "index.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            out = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint16, shape=shape)
            kept, skipped = _decode(source, refs, out, progress)
            out.flush()
            del out
            (tmp / "index.json").write_text(json.dumps({"kept": kept, "skipped": skipped}))
            if not target.exists():
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((target / "index.json").read_text())
    pixels = np.load(target / "pixels.npy", mmap_mode="r")[: len(meta["kept"])]
    kept_refs = [refs[i] for i in meta["kept"]]
    return Prepared(pixels, kept_refs, [tuple(s) for s in meta["skipped"]], str(target))


def _decode(
    source: Source, refs: list[SampleRef], out: np.ndarray, progress: bool
) -> tuple[list[int], list[tuple[str, str]]]:
    """Fill ``out`` front to back with the decodable samples; return kept indices, skips."""
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    bar = tqdm(refs, desc="decoding", unit="img", disable=not progress, leave=False)
    for i, ref in enumerate(bar):
        try:
            x = source.load(ref)
            if x.ndim != 3 or min(x.shape[1:]) < 2:
                raise ValueError(f"unusable image shape {tuple(x.shape)}")
            x = resize_square(to_channels(x, out.shape[1]), out.shape[2])
        except Exception as exc:
            skipped.append((ref.id, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
            continue
        out[len(kept)] = np.clip(np.rint(x * SCALE), 0, SCALE).astype(np.uint16)
        kept.append(i)
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
