"""Images/s and MFU of the sslkit engine on ViT-S MAE with bf16 autocast + torch.compile (GPU).

The engine's real loop (batched GPU augmentation, autocast, optimizer, metrics) runs on a
fixed batch already on the device, so the data pipeline is out of the picture. Model
FLOPs per step are counted once with ``torch.utils.flop_counter`` on an eager forward +
backward (matmuls, convolutions, attention); MFU = FLOPs per second / the GPU's dense
bf16 peak (``--peak-tflops``, default from the device name: H100/H200 989, A100 312).

    .venv/bin/python benchmarks/mae_mfu.py [--batch-size 256] [--steps 30] [--no-compile]
    .venv/bin/python benchmarks/mae_mfu.py --device cpu --image-size 32 --batch-size 8 --steps 3 --no-compile  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from step_overhead import FixedLoader, engine_step_times, run_engine, sslkit_trainer, synthetic_folder

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def step_flops(trainer, batch: torch.Tensor) -> int:
    """FLOPs of one forward + backward of the task on ``batch`` (eager, autocast as configured)."""
    views = trainer.augment(batch)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype or torch.float32,
                            enabled=trainer.autocast_dtype is not None):
            loss = trainer.task(views)["loss"]
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps (compilation happens here)")
    ap.add_argument("--backbone", default="timm:vit_small_patch16_224")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--profile", action="store_true", help="also print the top GPU kernels of 5 steps")
    args = ap.parse_args()
    device = torch.device(args.device)
    B, S = args.batch_size, args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_folder(work / "data", B, S)
        trainer = sslkit_trainer(f"folder:{data}", work, B, S, task="mae", backbone=args.backbone,
                                 device=args.device, precision=args.precision, compile=not args.no_compile)
        batch = torch.rand(B, trainer.spec.channels, S, S, device=device)
        flops = step_flops(trainer, batch)
        trainer.loader = FixedLoader(batch)
        run_engine(trainer, args.warmup)
        run_engine(trainer, args.steps)
        times = engine_step_times(trainer)[args.warmup:]
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run_engine(trainer, 5)
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    sec = statistics.median(times)
    ips = B / sec
    peak = args.peak_tflops or peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"MAE {args.backbone} {S}px batch {B}, {args.precision}, compile={not args.no_compile}, {name}")
    print(f"median step {sec * 1000:.1f} ms, {ips:.0f} img/s, {flops / 1e9:.1f} GFLOP per step "
          f"({flops / sec / 1e12:.1f} TFLOP/s)")
    if peak:
        print(f"MFU = {flops / sec / (peak * 1e12):.3f} of {peak:.0f} TFLOP/s dense {args.precision} peak")
    else:
        print("MFU: unknown peak for this device; pass --peak-tflops")


if __name__ == "__main__":
    main()
