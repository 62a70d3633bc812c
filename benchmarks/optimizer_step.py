"""One AdamW step on the CPU: torch's per-tensor loop (``fused=None``, its CPU default) vs the fused
kernel sslkit's ``build_optimizer`` uses on CPU and CUDA, on timm models with random gradients.

    .venv/bin/python benchmarks/optimizer_step.py [--threads 1] [--models resnet18,vit_tiny_patch16_224]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch


def step_ms(model: torch.nn.Module, reps: int, **kwargs) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kwargs)
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"AdamW step on the CPU, {args.threads} thread(s), mean of {args.reps} steps")
    for name in args.models.split(","):
        model = timm.create_model(name)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        loop, fused = step_ms(model, args.reps), step_ms(model, args.reps, fused=True)
        print(f"{name:24s} per-tensor loop {loop:6.1f} ms, fused {fused:6.1f} ms: ratio {fused / loop:.2f}", flush=True)


if __name__ == "__main__":
    main()
