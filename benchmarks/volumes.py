"""Volumes (issue #16): is the 3D data path ever the bottleneck? Three measurements in one run.

1. First pass (index + series assembly + decode + resample + cache write), series/s, at
   1, 2 and all cores (``--workers``), each in a new process into an empty cache
   (benchmarks/first_pass.py), alternated pair by pair (``--repeats``) with the naive loop
   most scripts run every epoch: per series ``dcmread`` every file -> sort by position ->
   modality LUT -> window -> stack -> trilinear resampling -> crop/pad. Target: first pass
   not slower than the naive loop.
2. Epoch 2 from the cache (index + cache lookup + every batch read) vs. that naive loop.
   Target: >= 5x.
3. Training step (3D MAE on monai:vit, views on the device) on real cached batches vs. on
   synthetic tensors of the same shape, interleaved step by step (order alternated). Target: <= 1.10.

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
from sslkit.registry import create_backbone, create_task  # noqa: E402
from sslkit.spec import InputSpec  # noqa: E402
from tests.test_series import write_slice  # noqa: E402
from first_pass import compare, first_pass, parse_workers  # noqa: E402

WINDOW = (400.0, 40.0)  # W, L
SIZE = (64, 64, 64)
OPTIONS = {"sample": "volume", "spacing": "2", "volume_size": "64,64,64", "window": "400,40"}


def make_corpus(out: Path, series: int, slices: int, size: int = 128, seed: int = 0) -> None:
    marker = out / ".complete"
    if marker.exists() and marker.read_text() == f"{series} {slices} {size} {seed}":
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
    marker.write_text(f"{series} {slices} {size} {seed}")


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


def first_pass_rate(root: Path, workers: int) -> float:
    """Series/s of the first pass into an empty cache (a new process: :mod:`first_pass`)."""
    samples, seconds = first_pass(f"dicom:{root}", list(SIZE), OPTIONS, workers)
    return samples / seconds


def cached_epoch(root: Path, cache: str, batch: int) -> float:
    load_data(f"dicom:{root}", 224, None, OPTIONS, cache, progress=False)  # fill
    t0 = time.perf_counter()
    data = load_data(f"dicom:{root}", 224, None, OPTIONS, cache, progress=False)
    loader = BatchLoader(data.prepared.pixels, batch, seed=0)
    for _ in loader.epoch(0):
        pass
    return len(data.prepared) / (time.perf_counter() - t0)


def step_ratio(root: Path, cache: str, batch: int, steps: int) -> tuple[float, float]:
    data = load_data(f"dicom:{root}", 224, None, OPTIONS, cache, progress=False)
    spec = InputSpec(1, 224, (0.3,), (0.3,), "dicom", data.source.describe())
    torch.manual_seed(0)
    task = create_task("mae", create_backbone("monai:vit", 1, spec.volume_size, patch_size=16, hidden_size=192,
                                              num_layers=4, num_heads=4), spec, decoder_dim=96, decoder_heads=4)
    augment = task.views(spec)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
    loader = BatchLoader(data.prepared.pixels, batch, seed=0)

    def step(x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = task(augment(x))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    real, synth = [], []
    # the cached batches, read before the timing (their read cost is the cached-epoch line)
    cached = [b for e in range(steps // max(1, len(loader)) + 1) for b in loader.epoch(e)][: steps + 1]
    for i, x in enumerate(cached):
        if i % 2:  # alternate the order, so that load drifts hit both alike
            r, s = step(x), step(torch.rand_like(x))
        else:
            s, r = step(torch.rand_like(x)), step(x)
        if i:  # the first step warms up
            real.append(r)
            synth.append(s)
    return float(np.median(real)), float(np.median(synth))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ct-corpus"))
    ap.add_argument("--series", type=int, default=12)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", default="1,2,all", help="first-pass decode processes to time, e.g. 1,2,all")
    ap.add_argument("--repeats", type=int, default=2, help="naive / first-pass pairs per worker count")
    ap.add_argument("--first-pass-only", action="store_true", help="stop after the first-pass comparison")
    args = ap.parse_args()
    make_corpus(args.out, args.series, args.slices)
    print(f"corpus: {args.series} series x {args.slices} slices of 128x128 -> volumes 64^3 at 2 mm", flush=True)
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
        real, synth = step_ratio(args.out, cache, args.batch, args.steps)
        print(f"3D MAE step, batch {args.batch} of 64^3: real {real * 1000:.0f} ms, synthetic {synth * 1000:.0f} ms, "
              f"ratio {real / synth:.3f}", flush=True)


if __name__ == "__main__":
    main()
