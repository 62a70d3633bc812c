"""Images/s, MFU and the kernel-time share of the sslkit engine: ViT-S MAE, eager / compile / graphs.

The engine's real loop (batched augmentation, masking, autocast, optimizer, metrics) runs
on a fixed batch already on the device, so the data pipeline is out of the picture (the
host-to-device copy of a batch is timed on its own line). Modes: ``eager``; ``compile``
(``--compile``: the model and, on CUDA, the views); ``graphs`` (``--compile --capture
graphs``: the whole step replayed as one CUDA graph; without ``--compile`` when
``--no-compile`` is given). Model FLOPs per step are counted once with
``torch.utils.flop_counter`` on an eager forward + backward; MFU = FLOPs per second / the
GPU's dense bf16 peak (``--peak-tflops``, default from the device name: H100 SXM / H200 989,
H100 PCIe 756, H100 / H200 NVL 835, A100 312). The kernel share is the device time of the
kernels in a ``torch.profiler`` trace of ``--profile-steps`` steps, per step, over the median
step time; for a captured step the last column also gives a replay's device time from CUDA
events (a reading that does not depend on the profiler seeing the kernels inside a graph).

    .venv/bin/python benchmarks/mae_mfu.py                       # batch 256 and 1024, all modes
    .venv/bin/python benchmarks/mae_mfu.py --device cpu --batch-sizes 2 --steps 2 --warmup 1 \\
        --image-size 32 --modes eager,graphs --no-compile            # smoke (CPU: graphs fall back)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from sslkit.options import parse_pairs
from step_overhead import FixedLoader, engine_step_times, run_engine, sslkit_trainer

#: dense bf16 peak TFLOP/s by a substring of ``torch.cuda.get_device_name``, the most specific first: the H100
#: PCIe ("NVIDIA H100 PCIe") and the NVL cards ("NVIDIA H100 NVL") run lower clocks than the SXM module
#: ("NVIDIA H100 80GB HBM3"); an H200 is an SXM module unless named NVL
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H200": 989.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
MODES = ("eager", "compile", "graphs")


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def npz_data(root: Path, n: int, size: int) -> str:
    """``n`` random RGB images ``size`` px as one ``npz:`` source (no image files to decode)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"images-{n}-{size}.npz"
    if not path.exists():
        np.savez(path, images=np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return f"npz:{path}"


def step_flops(trainer, batch: torch.Tensor) -> int:
    """FLOPs of one forward + backward of the task on ``batch`` (eager, autocast as configured)."""
    augment = getattr(trainer.augment, "_orig_mod", trainer.augment)  # the uncompiled views
    views = augment(batch)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype or torch.float32,
                            enabled=trainer.autocast_dtype is not None):
            loss = trainer.task(views)["loss"]
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def kernel_ms_per_step(trainer, steps: int, top: int = 0) -> float | None:
    """Device time of all kernels (and copies) in a profile of ``steps`` steps, per step (CUDA;
    None elsewhere); with ``top``, the ``top`` kernels by device time are printed first (ms per
    step, share, launches per step), on a CPU run the ``top`` operators by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    if steps < 1 or not (cuda or top):
        return None
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run_engine(trainer, steps)
        if cuda:
            torch.cuda.synchronize()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=lambda e: -own(e))
    total = sum(own(e) for e in events) / 1000 / steps
    for e in events[:top]:
        ms = own(e) / 1000 / steps
        print(f"  {'kernel' if cuda else 'cpu op'} {ms:8.3f} ms/step {100 * ms / total:5.1f} %  "
              f"x{e.count // steps:<4d} {e.key[:110]}", flush=True)
    return total if cuda else None


def replay_ms(trainer, reps: int = 10) -> float | None:
    """Device time of one replay of the captured step (CUDA events around back-to-back
    replays: the graph's kernels and the gaps inside it, no launch overhead); None when
    the step was not captured. A second reading of the kernel time, one that does not
    depend on the profiler seeing kernels inside graphs."""
    c = getattr(trainer, "capture", None)
    if c is None or not c.captured or trainer.device.type != "cuda":
        return None
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        c.replay()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def capture_note(trainer, sec: float) -> str:
    c = getattr(trainer, "capture", None)
    if c is None:
        return ""
    if not c.captured:
        return f"not captured: {c.reason or 'warming up'}"
    replay = replay_ms(trainer)
    return "captured" if replay is None else f"captured; a replay takes {replay:.1f} ms on the device " \
        f"({100 * replay / (sec * 1000):.0f} % of the step)"


def measure(work: Path, data: str, task: str, backbone: str, batch_size: int, image_size: int, mode: str,
            args: argparse.Namespace, **cfg: Any) -> dict[str, Any]:
    """One (mode, batch) point: median step, img/s, TFLOP/s, MFU, kernel time and share."""
    device = torch.device(args.device)
    compile = mode == "compile" or (mode == "graphs" and not args.no_compile)
    trainer = sslkit_trainer(data, work / f"{mode}-{batch_size}", batch_size, image_size, task=task,
                             backbone=backbone, device=args.device, precision=args.precision, compile=compile,
                             capture="graphs" if mode == "graphs" else "off", cache_dir="", **cfg)
    batch = torch.rand(trainer.micro_batch, trainer.spec.channels, image_size, image_size, device=device)
    flops = step_flops(trainer, batch)
    trainer.loader = FixedLoader(batch)
    run_engine(trainer, args.warmup)
    run_engine(trainer, args.steps)
    sec = statistics.median(engine_step_times(trainer)[args.warmup:])
    kernel = kernel_ms_per_step(trainer, args.profile_steps, args.top_kernels)
    peak = args.peak_tflops or peak_tflops(device)
    out = {"mode": mode, "batch": batch_size, "step_ms": sec * 1000, "img_s": batch_size / sec,
           "tflops": flops / sec / 1e12, "gflop_per_step": flops / 1e9,
           "mfu": flops / sec / (peak * 1e12) if peak else None, "kernel_ms": kernel,
           "kernel_share": kernel / (sec * 1000) if kernel is not None else None, "note": capture_note(trainer, sec)}
    del trainer, batch
    release(device)
    return out


def release(device: torch.device) -> None:
    """Drop compiled code and cached device memory between points."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_ms(batch_size: int, image_size: int, device: torch.device, reps: int = 20) -> dict[str, float]:
    """Host-to-device time of one batch from pinned memory: the cache's uint16 vs float32."""
    if device.type != "cuda":
        return {}
    out = {}
    for dtype in (torch.uint16, torch.float32):
        host = torch.zeros(batch_size, 3, image_size, image_size, dtype=dtype).pin_memory()
        dev = torch.empty_like(host, device=device)
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        out[str(dtype).removeprefix("torch.")] = (time.perf_counter() - t) / reps * 1000
    return out


def row(label: str, r: dict[str, Any]) -> str:
    """One markdown table row of a measured point (``-`` where not known)."""
    if "error" in r:
        return f"| {label} | {r['batch']} | {r['mode']} | {r['error']} | | | | | |"

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (f"| {label} | {r['batch']} | {r['mode']} | {r['step_ms']:.1f} ms | {r['img_s']:,.0f} | "
            f"{r['tflops']:.1f} | {f(r['mfu'], '.3f')} | {f(r['kernel_ms'], '.1f')} ms "
            f"({f(r['kernel_share'] and 100 * r['kernel_share'], '.0f')} %) | {r['note']} |")


HEADER = ("| model | batch | mode | step | img/s | TFLOP/s | MFU | kernel time/step (share) | capture |\n"
          "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")


def sweep(label: str, task: str, backbone: str, args: argparse.Namespace, **cfg: Any) -> list[dict[str, Any]]:
    """Every (batch, mode) point, printed as it is measured; an out-of-memory point is a row too."""
    device = torch.device(args.device)
    results = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{label} {args.image_size}px, {args.precision}, {name}, torch {torch.__version__}, "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for b in args.batch_sizes:
            data = npz_data(work / "data", b, args.image_size)
            for mode in args.modes:
                try:
                    r = measure(work, data, task, backbone, b, args.image_size, mode, args, **cfg)
                except torch.OutOfMemoryError:
                    release(device)
                    r = {"mode": mode, "batch": b, "error": "out of memory"}
                results.append(r)
                print(row(label, r), flush=True)
    for b in args.batch_sizes:
        c = copy_ms(b, args.image_size, device)
        if c:
            print(f"host-to-device copy of a batch of {b} from pinned memory: uint16 {c['uint16']:.2f} ms, "
                  f"float32 {c['float32']:.2f} ms", flush=True)
    return results


def arguments(description: str, backbone: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[256, 1024])
    ap.add_argument("--batch-size", type=int, default=None, help="one batch size (instead of --batch-sizes)")
    ap.add_argument("--modes", type=lambda v: v.split(","), default=list(MODES))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps (compilation and capture happen here)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top-kernels", type=int, default=0, help="print the N kernels with the most device time")
    ap.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="a task option, as pretrain's (e.g. target=pixels); repeatable")
    ap.add_argument("--backbone", default=backbone)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--no-compile", action="store_true", help="graphs mode without torch.compile")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=None)
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    args = ap.parse_args()
    if args.batch_size:
        args.batch_sizes = [args.batch_size]
    bad = sorted(set(args.modes) - set(MODES))
    if bad:
        ap.error(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    if args.device == "cpu" and args.precision == "fp16":
        args.precision = "fp32"
    return args


def main() -> None:
    args = parse(arguments(__doc__.splitlines()[0], "timm:vit_small_patch16_224"))
    options = parse_pairs(args.task_opt, "--task-opt")
    label = f"MAE {args.backbone.removeprefix('timm:')}" + "".join(f" {k}={v}" for k, v in options.items())
    sweep(label, "mae", args.backbone, args, task_options=options)


if __name__ == "__main__":
    main()
