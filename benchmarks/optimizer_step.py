"""One AdamW step on the CPU: torch's per-tensor loop (``fused=None``, its CPU default) vs the fused
kernel sslkit's ``build_optimizer`` uses on CPU and CUDA, on timm models with random gradients.
``--lars``: also sslkit's LARS step against torch's fused SGD with momentum (the same update
without the trust ratio), both as ``build_optimizer`` makes them.

    .venv/bin/python benchmarks/optimizer_step.py [--threads 1] [--models resnet18,vit_tiny_patch16_224] [--lars]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch


def step_ms(model: torch.nn.Module, reps: int, opt: torch.optim.Optimizer | None = None, **kwargs) -> float:
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-3, **kwargs)
    for _ in range(3):
        opt.step()
    t = time.perf_counter()
    for _ in range(reps):
        opt.step()
    return (time.perf_counter() - t) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,vit_tiny_patch16_224")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--lars", action="store_true", help="also time sslkit's LARS against fused SGD")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"AdamW step on the CPU, {args.threads} thread(s), mean of {args.reps} steps")
    for name in args.models.split(","):
        model = timm.create_model(name)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        loop, fused = step_ms(model, args.reps), step_ms(model, args.reps, fused=True)
        print(f"{name:24s} per-tensor loop {loop:6.1f} ms, fused {fused:6.1f} ms: ratio {fused / loop:.2f}", flush=True)
        if args.lars:
            from sslkit.optim import build_optimizer

            sgd = step_ms(model, args.reps, build_optimizer(model, "sgd", 0.1, 1e-6))
            lars = step_ms(model, args.reps, build_optimizer(model, "lars", 0.1, 1e-6))
            print(f"{name:24s} fused SGD {sgd:6.1f} ms, sslkit LARS {lars:6.1f} ms: ratio {lars / sgd:.2f}", flush=True)


if __name__ == "__main__":
    main()
