"""Room for the data before it is decoded: one resized sample in memory, the cache on its disk
(or, without a cache, the decoded array in memory). Checked before any pixel is read, and the
sample's size before a run builds a model sized from it."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Sequence

from sslkit.errors import UsageError
from sslkit.progress import human_bytes


def sides(size: int | Sequence[int]) -> tuple[int, ...]:
    """The stored sample's spatial shape: ``(S, S)`` for an image side, ``(D, H, W)`` for a volume."""
    return (size, size) if isinstance(size, int) else tuple(int(v) for v in size)


def check_room(root: Path | None, nbytes: int, shape: tuple[int, ...], channels: int, size: int | tuple) -> None:
    """Refuse, before decoding, an array the cache's disk (or, without a cache, the RAM)
    cannot hold, and a side so large that one resized sample does not fit in memory."""
    n = shape[0]
    _, at, lower = size_words(size)
    check_sample_room(channels, size)
    avail = available_memory()
    if root is None:
        if avail is not None and nbytes > avail:
            raise UsageError(f"{n} images at {at} need {human_bytes(nbytes)} of memory with --no-cache, "
                             f"{human_bytes(avail)} is available; {lower}, or use the disk cache")
        return
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes > free:
        raise UsageError(f"the decoded-pixel cache for {n} images at {at} needs {human_bytes(nbytes)}, "
                         f"{str(probe)!r} has {human_bytes(free)} free; free space, choose another folder "
                         f"with --cache DIR, or {lower}")


def check_sample_room(channels: int, size: int | tuple) -> None:
    """Refuse a sample (an ``--image-size`` side, a volume's ``(D, H, W)``) too large for one resize in
    memory: from :func:`check_room`, and before a run builds a model sized from it (a ViT's positions)."""
    sample = channels * math.prod(sides(size)) * 4 * 5  # float32: decoded, resized, cropped, scaled, rounded
    avail = available_memory()
    if avail is not None and sample > avail:
        flag, _, lower = size_words(size)
        raise UsageError(f"{flag}: resizing one {'x'.join(map(str, (channels, *sides(size))))} sample needs "
                         f"about {human_bytes(sample)} of memory, {human_bytes(avail)} is available; {lower}")


def size_words(size: int | tuple) -> tuple[str, str, str]:
    """``size`` as the user set it (``--image-size`` side, ``--volume-size`` D,H,W), as a sample size, what to lower."""
    if isinstance(size, int):
        return f"--image-size {size}", f"{size} px", "lower --image-size (or --cache-size)"
    dims = ",".join(map(str, sides(size)))
    return f"--volume-size {dims}", f"{dims.replace(',', 'x')} voxels", "lower --volume-size"


def available_memory() -> int | None:
    """Bytes free for new allocations: ``MemAvailable``, capped by an address-space limit
    (``ulimit -v``); None where unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        pass
    try:
        avail = avail or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY and soft > 0:
            avail = min(avail or soft, soft)
    except (ImportError, OSError, ValueError):
        pass
    return avail
