"""Room for the data before it is decoded: one resized sample in memory, the cache on its disk
(or, without a cache, the decoded array in memory). Checked before any pixel is read, and the
sample's size before a run builds a model sized from it."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Collection, Sequence

from sslkit.errors import UsageError
from sslkit.progress import human_bytes


def sides(size: int | Sequence[int]) -> tuple[int, ...]:
    """The stored sample's spatial shape: ``(S, S)`` for an image side, ``(D, H, W)`` for a volume."""
    return (size, size) if isinstance(size, int) else tuple(int(v) for v in size)


def check_room(root: Path | None, nbytes: int, shape: tuple[int, ...], channels: int, size: int | tuple,
               flags: Collection[str] | None = None) -> None:
    """Refuse, before decoding, an array the cache's disk (or, without a cache, the RAM)
    cannot hold, and a side so large that one resized sample does not fit in memory. The advice
    names only the options of ``flags`` (default: :func:`command_flags`)."""
    n = shape[0]
    flags = command_flags() if flags is None else flags
    _, at, lower = size_words(size, flags)
    check_sample_room(channels, size, flags)
    avail = available_memory()
    if root is None:
        if avail is not None and nbytes > avail:
            ways = [lower] if lower else []
            ways += ["use the disk cache"] if "--no-cache" in flags else []
            raise UsageError(f"{n} images at {at} need {human_bytes(nbytes)} of memory"
                             f"{' with --no-cache' if '--no-cache' in flags else ''}, {human_bytes(avail)} is "
                             f"available; {either(ways) if ways else 'free memory'}")
        return
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes > free:
        raise UsageError(f"the decoded-pixel cache for {n} images at {at} needs {human_bytes(nbytes)}, "
                         f"{str(probe)!r} has {human_bytes(free)} free; "
                         f"{either(['free space', cache_elsewhere(flags)] + ([lower] if lower else []))}")


def check_sample_room(channels: int, size: int | tuple, flags: Collection[str] | None = None) -> None:
    """Refuse a sample (an ``--image-size`` side, a volume's ``(D, H, W)``) too large for one resize in
    memory: from :func:`check_room`, and before a run builds a model sized from it (a ViT's positions)."""
    sample = channels * math.prod(sides(size)) * 4 * 5  # float32: decoded, resized, cropped, scaled, rounded
    avail = available_memory()
    if avail is not None and sample > avail:
        flags = command_flags() if flags is None else flags
        flag, _, lower = size_words(size, flags)
        raise UsageError(f"{flag}: resizing one {'x'.join(map(str, (channels, *sides(size))))} sample needs "
                         f"about {human_bytes(sample)} of memory, {human_bytes(avail)} is available; "
                         f"{lower or 'free memory'}")


#: the options of ``sslkit pretrain`` that :func:`check_room` may advise: what it assumes outside a command
PRETRAIN_FLAGS = frozenset({"--cache", "--no-cache", "--image-size", "--cache-size"})


def command_flags() -> frozenset[str]:
    """The options of the running ``sslkit`` command (click's current context), so that advice names only
    what it accepts: ``embed`` and ``eval`` have no ``--cache``, ``--no-cache`` or ``--image-size`` (the
    model's). Outside a command (the Python API, ``sslkit.engine.pretrain``): :data:`PRETRAIN_FLAGS`."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return PRETRAIN_FLAGS
    return frozenset(opt for param in ctx.command.params for opt in (*param.opts, *param.secondary_opts))


def cache_elsewhere(flags: Collection[str]) -> str:
    """How to put the decoded-pixel cache in another folder with the options of ``flags``."""
    return "choose another folder with --cache DIR" if "--cache" in flags else \
        "set SSLKIT_CACHE_DIR to a folder with room"


def either(ways: list[str]) -> str:
    """``"a, b, or c"``; ``"a"`` alone."""
    return ways[0] if len(ways) == 1 else ", ".join(ways[:-1]) + ", or " + ways[-1]


def cache_ways(*first: str) -> str:
    """What to do about a decoded-pixel cache folder that cannot be used, in the running command's options
    (:func:`command_flags`): ``first`` (``"free space"``), another folder, ``--no-cache`` where it has one."""
    flags = command_flags()
    return either([*first, cache_elsewhere(flags), *(["use --no-cache"] if "--no-cache" in flags else [])])


def size_words(size: int | tuple, flags: Collection[str] = PRETRAIN_FLAGS) -> tuple[str, str, str | None]:
    """``size`` as the user set it (``--image-size`` side, ``--volume-size`` D,H,W), as a sample size, and what
    to lower: None where the command takes its size from the model (no ``--image-size`` in ``flags``)."""
    own = "--image-size" in flags  # pretrain; embed and eval decode at the model's size
    if isinstance(size, int):
        lower = "lower --image-size" + (" (or --cache-size)" if "--cache-size" in flags else "")
        return f"{'--image-size' if own else 'image size'} {size}", f"{size} px", lower if own else None
    dims = ",".join(map(str, sides(size)))
    return (f"{'--volume-size' if own else 'volume size'} {dims}", f"{dims.replace(',', 'x')} voxels",
            "lower --volume-size" if own else None)


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
