"""Is the data pipeline ever the bottleneck? Ratios, measured in one run.

0. The first pass (index + decode + cache write, into an empty cache, in a new process)
   at 1, 2 and all cores (``--workers``) vs. the naive loop below, alternated pair by
   pair (``--repeats``). Target: not slower than the naive loop.
1. Samples/s of epoch 2 with sslkit's decoded-pixel cache (index the folder, find the
   cache entry, read every batch) vs. the naive loop most scripts run every epoch:
   per file ``dcmread`` -> ``pixel_array`` -> modality LUT -> VOI LUT -> MONOCHROME1
   inversion -> resize. Target: >= 5x.
2. Training step time (SimCLR views + ResNet-18 forward/backward/step) on real cached
   batches from ``BatchLoader`` vs. on synthetic tensors of the same shape, interleaved
   step by step so machine load hits both alike. Target: <= 1.10.

The corpus is built by benchmarks/make_dicom_corpus.py (CR, 12-bit, MONOCHROME1 every
4th file, uncompressed / RLE / JPEG 2000, or all in one of them with ``--syntax``) from
../shared/data/pneumonia-train.tar.gz.

    .venv/bin/python benchmarks/data_pipeline.py --corpus /tmp/cr-corpus --count 300
    .venv/bin/python benchmarks/data_pipeline.py --corpus /tmp/rle-corpus --syntax rle --first-pass-only
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from first_pass import compare, first_pass, parse_workers
from make_dicom_corpus import CORPUS_SYNTAXES, make_corpus
from sslkit.data.loader import BatchLoader
from sslkit.data.pipeline import load_data
from sslkit.data.prepare import channel_stats
from sslkit.registry import create_backbone, create_task
from sslkit.spec import InputSpec


def naive_epoch(files: list[Path], size: int, batch: int) -> float:
    """Samples/s of the per-file pydicom loop (decode + LUTs + resize), batched like training."""
    t0 = time.perf_counter()
    buf = []
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f)
            x = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            x = 1 - x
        t = torch.from_numpy(x)[None, None]
        buf.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
        if len(buf) == batch:
            torch.stack(buf)
            buf = []
    return len(files) / (time.perf_counter() - t0)


def cached_epoch(data: str, size: int, batch: int, cache: Path) -> tuple[float, float]:
    """(samples/s including index + cache lookup, samples/s of the batch reads alone)."""
    t0 = time.perf_counter()
    loaded = load_data(data, size, cache_dir=cache, progress=False)
    t1 = time.perf_counter()
    loader = BatchLoader(loaded.prepared.pixels, batch, seed=1)
    n = 0
    for x in loader.epoch(0):
        n += x.shape[0]
    t2 = time.perf_counter()
    return n / (t2 - t0), n / (t2 - t1)


def step_ratio(data: str, size: int, batch: int, cache: Path, steps: int) -> dict:
    loaded = load_data(data, size, cache_dir=cache, progress=False)
    pixels = loaded.prepared.pixels
    mean, std = channel_stats(pixels)
    spec = InputSpec(loaded.channels, size, mean, std)
    torch.manual_seed(0)
    task = create_task("simclr", create_backbone("timm:resnet18", in_chans=loaded.channels, image_size=size), spec)
    views = task.views(spec)
    opt = torch.optim.SGD(task.parameters(), lr=1e-3, momentum=0.9)
    loader = BatchLoader(pixels, batch, seed=0)
    synthetic = torch.rand(loader.batch_size, loaded.channels, size, size)

    def step(x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = task(views(x))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    real_t, syn_t = [], []
    epoch, it = 0, None
    for i in range(steps + 2):
        t0 = time.perf_counter()
        try:
            x = next(it) if it is not None else None
        except StopIteration:
            x = None
        if x is None:
            epoch += 1
            it = loader.epoch(epoch)
            t0 = time.perf_counter()
            x = next(it)
        wait = time.perf_counter() - t0  # waiting for the batch counts against real data
        if i % 2:  # alternate the order so neither side always runs on a warmer cache
            real = wait + step(x)
            syn = step(synthetic)
        else:
            syn = step(synthetic)
            real = wait + step(x)
        if i >= 2:  # warm-up
            real_t.append(real)
            syn_t.append(syn)
    return {"real_s": float(np.median(real_t)), "synthetic_s": float(np.median(syn_t)),
            "ratio": float(np.median(real_t) / np.median(syn_t)), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "sslkit-cr-corpus")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--syntax", choices=CORPUS_SYNTAXES, default="mixed",
                    help="the corpus's transfer syntax (make_dicom_corpus.py): mixed, or every file in one")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-size", type=int, default=128, help="image side for the training-step ratio")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", default="1,2,all", help="first-pass decode processes to time, e.g. 1,2,all")
    ap.add_argument("--repeats", type=int, default=2, help="naive / first-pass pairs per worker count")
    ap.add_argument("--first-pass-only", action="store_true", help="stop after the first-pass comparison")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    files = make_corpus(args.corpus, args.count, syntax=args.syntax)
    data = f"dicom:{args.corpus}"
    print("first pass (index + decode + cache write, new process, empty cache) vs the naive loop, alternated:",
          flush=True)

    def ours(workers: int) -> tuple[int, float, float]:
        return first_pass(data, args.image_size, {}, workers)

    ratios = compare(lambda: naive_epoch(files, args.image_size, args.batch_size), ours,
                     parse_workers(args.workers), args.repeats, "samples")
    if args.first_pass_only:
        print("met" if all(statistics.median(r) >= 1 for r in ratios.values()) else "NOT met", "(first pass >= naive)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        load_data(data, args.image_size, cache_dir=cache, progress=False)  # fill the cache
        naive = naive_epoch(files, args.image_size, args.batch_size)
        cached, reads = cached_epoch(data, args.image_size, args.batch_size, cache)
        print(f"corpus: {len(files)} CR files, {args.syntax} ({sum(f.stat().st_size for f in files) / 2**20:.0f} MB), "
              f"{args.image_size} px, batch {args.batch_size}")
        print(f"naive per-file pydicom decode + window: {naive:8.1f} samples/s")
        print(f"sslkit epoch 2 (index + cache lookup + batch reads): {cached:8.1f} samples/s "
              f"-> {cached / naive:.1f}x naive (target >= 5x)")
        print(f"sslkit epoch 2 batch reads alone: {reads:8.1f} samples/s -> {reads / naive:.1f}x naive")
        load_data(data, args.train_size, cache_dir=cache, progress=False)
        r = step_ratio(data, args.train_size, args.batch_size, cache, args.steps)
        print(f"training step, SimCLR + ResNet-18, {args.train_size} px, batch {args.batch_size}, median of "
              f"{r['steps']}: real cached {r['real_s']:.3f}s vs synthetic {r['synthetic_s']:.3f}s "
              f"-> ratio {r['ratio']:.3f} (target <= 1.10)")
        read_ms = 1000 * args.batch_size / reads
        print(f"one batch read from the cache: {read_ms:.2f} ms = {100 * read_ms / 1000 / r['synthetic_s']:.3f}% "
              f"of a synthetic step (the bound on what the pipeline can add)")


if __name__ == "__main__":
    main()
