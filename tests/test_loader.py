"""BatchLoader: values, order, resume, and what runs on its prefetch thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sslkit.data.loader import BatchLoader, to_unit


@pytest.fixture
def pixels(tmp_path):
    """A memory-mapped uint16 cache array, as prepare writes it, with the extremes in it."""
    x = np.random.default_rng(0).integers(0, 65536, (10, 2, 4, 4), dtype=np.uint16)
    x[0, 0, 0, :3] = [0, 65535, 32768]
    np.save(tmp_path / "pixels.npy", x)
    return np.load(tmp_path / "pixels.npy", mmap_mode="r")


def test_read_gives_the_stored_values(pixels):
    floats, raw = BatchLoader(pixels, 3, 0, pin_memory=False), BatchLoader(pixels, 3, 0, pin_memory=False, raw=True)
    for idx in (np.array([0, 4, 9]), np.arange(10), np.array([7])):
        f, r = floats.read(idx), raw.read(idx)
        assert f.dtype == torch.float32 and f.shape == (len(idx), 2, 4, 4) and f.is_contiguous()
        # the reference: the cache's integers over 65535, in float32 (what a float32 division gives)
        expected = np.asarray(pixels[idx], dtype=np.float32) / np.float32(65535)
        assert np.array_equal(f.numpy(), expected)
        assert r.dtype == torch.uint16 and np.array_equal(r.numpy(), pixels[idx])
        assert torch.equal(to_unit(r), f)
    assert floats.read(np.array([0]))[0, 0, 0, :3].tolist() == [0.0, 1.0, np.float32(32768) / np.float32(65535)]


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("raw", [False, True])
def test_read_runs_no_torch_compute_op(pixels, raw):
    """On the prefetch thread a parallel torch op (conversion, scale, pin_memory's copy) would
    start the thread's own OpenMP team next to the training step's; read only allocates."""
    loader = BatchLoader(pixels, 4, 0, pin_memory=False, raw=raw)
    with _Ops() as ops:
        loader.read(loader.indices(0, 1))
    assert ops.seen.count("aten.empty.memory_format") == 1
    assert set(ops.seen) <= {"aten.empty.memory_format", "aten.detach.default"}  # .numpy(): a view


@pytest.mark.parametrize("prefetch", [0, 2])
def test_epoch_order_and_resume(pixels, prefetch):
    """Read when asked (0, the CPU default) or ahead on a thread (CUDA's): the same batches."""
    loader = BatchLoader(pixels, 3, seed=5, prefetch=prefetch)
    assert len(loader) == 3  # 10 samples: the incomplete last batch is dropped
    whole = list(loader.epoch(2))
    assert [torch.equal(b, loader.read(loader.indices(2, k))) for k, b in enumerate(whole)] == [True] * 3
    seen = np.concatenate([loader.indices(2, k) for k in range(3)])
    assert len(set(seen.tolist())) == 9
    resumed = list(loader.epoch(2, start=1))  # a resumed run continues with the same batches
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, whole[1:]))
    assert not all(torch.equal(a, b) for a, b in zip(loader.epoch(3), whole))


def test_closing_an_epoch_early_stops_its_thread(pixels):
    import threading

    before = threading.active_count()
    batches = BatchLoader(pixels, 1, 0, prefetch=2).epoch(0)
    next(batches)
    batches.close()
    assert threading.active_count() == before


def test_a_prefetch_thread_only_for_a_gpu(pixels):
    import threading

    loader = BatchLoader(pixels, 2, 0)
    assert loader.prefetch == (2 if torch.cuda.is_available() else 0)
    before = threading.active_count()
    batches = BatchLoader(pixels, 2, 0, prefetch=0).epoch(0)
    next(batches)
    assert threading.active_count() == before  # read in the caller's thread, none started
    batches.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("raw", [False, True])
def test_pinned_batches_equal_the_plain_ones(pixels, raw):
    pinned, plain = BatchLoader(pixels, 4, 0, pin_memory=True, raw=raw), BatchLoader(pixels, 4, 0, pin_memory=False,
                                                                                      raw=raw)
    idx = pinned.indices(1, 0)
    x = pinned.read(idx)
    assert x.is_pinned() and torch.equal(x, plain.read(idx))
