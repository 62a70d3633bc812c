"""Volumes (issue #16): is the 3D data path ever the bottleneck? Three measurements in one run.

1. First pass (index + series assembly + decode + resample + cache write), series/s, at
   1, 2 and all cores (``--workers``), each in a new process into an empty cache
   (benchmarks/first_pass.py), alternated pair by pair (``--repeats``) with the naive loop
   most scripts run every epoch: per series ``dcmread`` every file -> sort by position ->
   modality LUT -> window -> stack -> trilinear resampling -> crop/pad. Target: first pass
   not slower than the naive loop.
2. Epoch 2 from the cache (index + cache lookup + every batch read) vs. that naive loop.
   Target: >= 5x.
3. Training step (3D MAE on monai:vit, views on the device) through the engine's loop, on
   real cached batches from the run's BatchLoader (as a run reads them) vs. on
   synthetic tensors of the same shape, interleaved step by step (ABBA). Target: <= 1.10.

The corpus is synthetic CT written with pydicom (int16 stored values with a rescale to
HU, shuffled file names, 0.8 mm pixels, 2.5 mm slices), so nothing is downloaded.

    .venv/bin/python benchmarks/volumes.py --out /tmp/ct-corpus --series 12 --slices 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.pixels import apply_modality_lut

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslkit.data.loader import BatchLoader  # noqa: E402
from sslkit.data.pipeline import load_data  # noqa: E402
from sslkit.data.volume import crop_or_pad  # noqa: E402
from tests.test_series import write_slice  # noqa: E402
from first_pass import compare, first_pass, parse_workers  # noqa: E402
from make_dicom_corpus import finish_corpus, start_corpus  # noqa: E402

WINDOW = (400.0, 40.0)  # W, L
SIZE = (64, 64, 64)
OPTIONS = {"sample": "volume", "spacing": "2", "volume_size": "64,64,64", "window": "400,40"}


def make_corpus(out: Path, series: int, slices: int, size: int = 128, seed: int = 0) -> None:
    """Write ``series`` CT series of ``slices`` files below ``out`` (skipped when ``out/.complete``
    says so; another corpus there is removed first, :func:`make_dicom_corpus.start_corpus`)."""
    settings = f"{series} {slices} {size} {seed}"
    if start_corpus(out, settings, r"s\d+(/\d+\.dcm)?"):
        return
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for s in range(series):
        uid = generate_uid()
        names = rng.permutation(slices)
        for k in range(slices):
            body = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.16) * (40 + 30 * np.sin(xx * 9 + k / 7 + s))
            hu = np.where(body > 0, body, -1000) + rng.normal(0, 10, (size, size))
            write_slice(out / f"s{s:03d}" / f"{names[k]:05d}.dcm", (hu + 1024).clip(0, 4095).astype(np.uint16),
                        uid, [0.0, 0.0, 2.5 * k], spacing=(0.8, 0.8))
    finish_corpus(out, settings)


def naive_epoch(root: Path, size: tuple[int, int, int], spacing: float) -> float:
    """Series/s of the per-file pydicom + numpy loop (what a script does every epoch)."""
    series = sorted(p for p in root.iterdir() if p.is_dir())
    t0 = time.perf_counter()
    lo, hi = WINDOW[1] - WINDOW[0] / 2, WINDOW[1] + WINDOW[0] / 2
    for folder in series:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dss = [pydicom.dcmread(f) for f in folder.glob("*.dcm")]
        dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        vol = np.stack([apply_modality_lut(d.pixel_array, d) for d in dss]).astype(np.float32)
        vol = np.clip((vol - lo) / (hi - lo), 0, 1)
        dz = float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2])
        dy, dx = (float(v) for v in dss[0].PixelSpacing)
        shape = [max(1, round(n * s / spacing)) for n, s in zip(vol.shape, (dz, dy, dx))]
        t = F.interpolate(torch.from_numpy(vol)[None, None], size=shape, mode="trilinear", align_corners=False)
        crop_or_pad(t[0].numpy(), size)
    return len(series) / (time.perf_counter() - t0)


def first_pass_rate(root: Path, workers: int) -> tuple[int, float, float]:
    """(series, wall s, CPU s) of the first pass into an empty cache (a new process: :mod:`first_pass`)."""
    return first_pass(f"dicom:{root}", list(SIZE), OPTIONS, workers)


def cached_epoch(root: Path, cache: str, batch: int) -> float:
    load_data(f"dicom:{root}", 224, None, OPTIONS, cache, progress=False)  # fill
    t0 = time.perf_counter()
    data = load_data(f"dicom:{root}", 224, None, OPTIONS, cache, progress=False)
    loader = BatchLoader(data.prepared.pixels, batch, seed=0)
    for _ in loader.epoch(0):
        pass
    return len(data.prepared) / (time.perf_counter() - t0)


class Alternating:
    """Stands in for the engine's loader: the run's own :class:`BatchLoader` read as a run
    reads it (one ``epoch`` after another, as ``train`` opens them; ahead on its prefetch
    thread with CUDA, when asked on the CPU), with pre-made synthetic batches of the same shape put between its batches in
    ABBA order (real, synthetic, synthetic, real, ...), so that load drifts hit both alike.
    Everything the data path costs (the wait on the queue, a new epoch's thread and first
    read, the thread's read of the next batch while the step runs) falls in the real steps."""

    def __init__(self, real: BatchLoader, synthetic: list[torch.Tensor]) -> None:
        self.real, self.synthetic = real, synthetic

    @staticmethod
    def is_real(i: int) -> bool:
        return (i % 2 == 0) == ((i // 2) % 2 == 0)

    def epoch(self, epoch: int, start: int = 0):
        def real_batches():
            e = 0
            while True:
                yield from self.real.epoch(e)
                e += 1

        real = real_batches()
        try:
            i = 0
            while True:
                yield next(real) if self.is_real(i) else self.synthetic[i % len(self.synthetic)]
                i += 1
        finally:
            real.close()


class StepClock:
    """A run callback: each step's own wall time (the engine's ``img_per_s``, unrounded) and
    the process CPU time between rows (a row is emitted just after the next step ran)."""

    def __init__(self, step_images: int) -> None:
        self.step_images, self.wall, self.cpu_at = step_images, [], []

    def on_step_end(self, step: int, metrics: dict) -> None:
        self.wall.append(self.step_images / metrics["img_per_s"])
        self.cpu_at.append(time.process_time())

    def cpu(self) -> dict[int, float]:
        """CPU seconds by step index (row i is emitted right after step i + 1 ran)."""
        return {i + 1: self.cpu_at[i] - self.cpu_at[i - 1] for i in range(1, len(self.cpu_at))}


def step_ratio(root: Path, cache: str, batch: int, steps: int) -> tuple[float, float, float]:
    """Median wall seconds of a 3D MAE step through the engine's loop (``sslkit.engine.train``,
    the run's BatchLoader as a run uses it) on real cached volumes and on
    synthetic tensors, alternated; and the ratio of their median CPU times."""
    from step_overhead import run_engine, sslkit_trainer

    with tempfile.TemporaryDirectory() as work:
        # no image size: a volume run's samples are OPTIONS' volume_size (--image-size is refused there)
        run = sslkit_trainer(f"dicom:{root}", Path(work), batch, None, task="mae", backbone="monai:vit",
                             backbone_options=dict(patch_size=16, hidden_size=192, num_layers=4, num_heads=4),
                             task_options=dict(decoder_dim=96, decoder_heads=4), source_options=dict(OPTIONS),
                             cache_dir=cache)
        real = run.loader
        shape = real.read(real.indices(0, 0)).shape
        g = torch.Generator().manual_seed(1)
        run.loader = Alternating(real, [torch.rand(shape, generator=g) for _ in range(4)])
        clock = StepClock(run.step_images)
        run.events.active.append(("step-clock", clock))
        warm = 4  # a fresh process's first steps are slower (allocator, kernel caches)
        run_engine(run, warm + 2 * steps)
    wall = {i: t for i, t in enumerate(clock.wall) if i >= warm}
    cpu = {i: t for i, t in clock.cpu().items() if i >= warm}

    def median(d: dict[int, float], real_steps: bool) -> float:
        return float(np.median([t for i, t in d.items() if Alternating.is_real(i) == real_steps]))

    return median(wall, True), median(wall, False), median(cpu, True) / median(cpu, False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ct-corpus"))
    ap.add_argument("--series", type=int, default=12)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--size", type=int, default=128, help="slice side in pixels (CT is usually 512)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", default="1,2,all", help="first-pass decode processes to time, e.g. 1,2,all")
    ap.add_argument("--repeats", type=int, default=2, help="naive / first-pass pairs per worker count")
    ap.add_argument("--first-pass-only", action="store_true", help="stop after the first-pass comparison")
    args = ap.parse_args()
    make_corpus(args.out, args.series, args.slices, args.size)
    print(f"corpus: {args.series} series x {args.slices} slices of {args.size}x{args.size} (0.8 mm pixels, 2.5 mm "
          f"apart) -> volumes 64^3 at 2 mm", flush=True)
    print("first pass (index + series assembly + decode + resample + cache write, new process, empty cache) "
          "vs the naive loop, alternated:", flush=True)
    ratios = compare(lambda: naive_epoch(args.out, SIZE, 2.0), lambda w: first_pass_rate(args.out, w),
                     parse_workers(args.workers), args.repeats, "series")
    naive = naive_epoch(args.out, SIZE, 2.0)
    if args.first_pass_only:
        print("met" if all(statistics.median(r) >= 1 for r in ratios.values()) else "NOT met", "(first pass >= naive)")
        return
    with tempfile.TemporaryDirectory() as cache:
        cached = cached_epoch(args.out, cache, args.batch)
        print(f"epoch 2 from the cache: {cached:.1f} series/s ({cached / naive:.1f}x naive)", flush=True)
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        real, synth, cpu = step_ratio(args.out, cache, args.batch, args.steps)
        print(f"3D MAE step through the engine (its BatchLoader as a run uses it), batch {args.batch} of 64^3, "
              f"{torch.get_num_threads()} torch threads, {args.steps} steps each: real {real * 1000:.0f} ms, "
              f"synthetic {synth * 1000:.0f} ms (medians), ratio {real / synth:.3f} wall, {cpu:.3f} CPU", flush=True)


if __name__ == "__main__":
    main()
