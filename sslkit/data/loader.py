"""Shuffled batches from a prepared pixel array, prefetched on a background thread for a GPU.

Batches are fancy-indexed reads of the (memory-mapped) uint16 array, so one batch costs
one vectorised copy, not ``B`` Python calls; with CUDA a thread overlaps that copy with
the training step without another process competing for the cores (on the CPU each batch
is read when the step asks for it: see :class:`BatchLoader`). The order is a pure
function of ``(seed, epoch)``, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from sslkit.data.prepare import SCALE


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """A raw batch (the cache's uint16 ``round(x * 65535)``) as float32 in [0, 1], on its
    device; bit-identical to :meth:`BatchLoader.read` without ``raw``."""
    if x.dtype == torch.uint16:  # widened through int32: few kernels take unsigned 16-bit input
        x = x.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
    return x.to(torch.float32).div_(SCALE)


class BatchLoader:
    """``pixels`` ``(N, C, S, S)`` uint16 -> float batches ``(B, C, S, S)`` in [0, 1].

    No worker processes: a batch is one vectorised read, and augmentation runs batched on
    the training device. With CUDA present, batches are returned in pinned memory
    (``pin_memory=None`` = auto) so ``.to(device, non_blocking=True)`` overlaps the copy.
    With ``raw=True`` batches stay the stored integers (half the bytes of float32 to copy
    to a GPU); :func:`to_unit` on the device then gives exactly the float batch.

    ``prefetch`` batches are read ahead on a background thread while the step runs; the
    default (None) is 2 with CUDA present and 0 (each batch read when asked, in the
    caller's thread) without. On the CPU the step's intra-op threads already use every
    core, a read (~1 ms) is <1 % of a step, and a live prefetch thread made a 3D step
    15-35 % slower on a loaded 2-core machine (it needs the GIL; preempted while holding
    it, it stalls the training thread): see BENCHMARKS.md, "Volumes".
    """

    def __init__(self, pixels: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 pin_memory: bool | None = None, raw: bool = False, prefetch: int | None = None):
        if len(pixels) < batch_size * world:
            batch_size = max(1, len(pixels) // world)
        self.pixels = pixels
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.raw = raw
        self.prefetch = (2 if torch.cuda.is_available() else 0) if prefetch is None else prefetch
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), set together

    def __len__(self) -> int:
        """Optimizer steps per epoch (the incomplete last global batch is dropped)."""
        return len(self.pixels) // (self.batch_size * self.world)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation (computed once per epoch, not once per batch)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pixels)))
        return self._order[1]

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's sample indices for global batch ``batch`` of ``epoch`` (sorted)."""
        g = self.batch_size * self.world
        idx = self.order(epoch)[batch * g : (batch + 1) * g]
        return np.sort(idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def read(self, idx: np.ndarray) -> torch.Tensor:
        """Samples ``idx`` as one batch tensor (float in [0, 1], or uint16 with ``raw``), pinned
        when ``pin_memory``.

        Only numpy works here (this runs on the prefetch thread), writing straight into the
        batch's tensor: any torch op on this thread that runs in parallel (a conversion, a
        scale, ``pin_memory()``'s copy) starts the thread's own OpenMP team, whose threads then
        take cores from the training step's. ``torch.empty`` only allocates.
        """
        shape = (len(idx), *self.pixels.shape[1:])
        out = torch.empty(shape, dtype=torch.uint16 if self.raw else torch.float32, pin_memory=self.pin_memory)
        if self.raw:
            np.take(self.pixels, idx, axis=0, out=out.numpy())
        else:
            np.divide(self.pixels[idx], np.float32(SCALE), out=out.numpy(), dtype=np.float32)
        return out

    def epoch(self, epoch: int, start: int = 0, prefetch: int | None = None) -> Iterator[torch.Tensor]:
        """Yield batches ``start..len(self)-1`` of ``epoch`` as float (B, C, S, S) in [0, 1],
        read ``prefetch`` (default: ``self.prefetch``) ahead on a thread, or when asked if 0."""
        prefetch = self.prefetch if prefetch is None else prefetch
        if prefetch <= 0:
            for b in range(start, len(self)):
                yield self.read(self.indices(epoch, b))
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for b in range(start, len(self)):
                    if stop.is_set():
                        return
                    q.put(self.read(self.indices(epoch, b)))
                q.put(None)
            except BaseException as exc:  # surface reader errors in the training thread
                q.put(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)
