"""glibc's malloc set for a training process: large activations reused, not page-faulted in each step.

A training step allocates and frees the same multi-megabyte tensors every step (a ViT-Tiny's MLP
activations at batch 256 are 13 MB each). glibc serves an allocation above ``M_MMAP_THRESHOLD``
with a fresh ``mmap`` and gives free memory at the top of the heap back to the OS above
``M_TRIM_THRESHOLD`` (both adjusted dynamically from 128 KiB), so such tensors often come back as
new pages that the kernel must fault in and zero (in a profile of the table's SimMIM step on one
thread, the product writing a fresh 13 MB output took 20.7 ms a call, 16.7 ms tuned).
:func:`tune_host_malloc` sets both thresholds once, at the CLI's start: mmap only above 32 MiB
(glibc's largest threshold; bigger blocks still come from mmap, so no allocation can fail for
want of one heap), and no trimming, as jemalloc and tcmalloc behave. Measured (BENCHMARKS.md
"glibc's malloc and the CPU step"): on CIFAR-10 images, one thread, the table's SimMIM and MAE steps
3-7 % shorter, SimCLR ResNet-18 about 2 %; level where glibc's own thresholds had already grown
(synthetic data); a single run's peak memory level.

Not trimming keeps what a pass over the data freed (a decoder's image buffers come from the heap
below 32 MiB): :func:`release_freed` gives it back once that pass is done (``malloc_trim``), so a
run trains without the first pass's peak held, and one image that failed to decode for want of
memory does not leave the steps without room.

Left alone where someone chose: ``SSLKIT_MALLOC=system``, any ``MALLOC_*_`` tuning variable, an
``LD_PRELOAD``-ed allocator; and where the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
NO_TRIM = 2**31 - 1
_tuned: list = []  # the C library, once tune_host_malloc has set it
OWN_CHOICE = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def why_not(env: Mapping[str, str]) -> str | None:
    """Why the allocator is left as it is, or None to tune it."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if env.get("SSLKIT_MALLOC", "").lower() == "system":
        return "SSLKIT_MALLOC=system"
    chosen = [name for name in OWN_CHOICE if name in env]
    if chosen:
        return f"{chosen[0]} is set"
    if "malloc" in env.get("LD_PRELOAD", ""):
        return "an allocator is preloaded"
    return None


def tune_host_malloc(env: Mapping[str, str] | None = None) -> str:
    """Set glibc's mmap and trim thresholds for this process (see the module docstring); returns
    what was done, or why nothing was (never raises: an untuned allocator is only slower)."""
    reason = why_not(os.environ if env is None else env)
    if reason:
        return f"left as it is: {reason}"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only; AttributeError elsewhere  # noqa: B018
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM) == 1
    except (OSError, AttributeError):
        return "left as it is: not glibc"
    if ok:
        _tuned[:] = [libc]
    return "tuned: mmap above 32 MiB, no trimming" if ok else "left as it is: mallopt refused"


def release_freed() -> bool:
    """Return the heap memory freed so far to the OS (glibc's ``malloc_trim(0)``) where
    :func:`tune_host_malloc` turned trimming off; whether it did (a no-op elsewhere)."""
    if not _tuned:
        return False
    return _tuned[0].malloc_trim(0) == 1
