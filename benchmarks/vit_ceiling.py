"""The MFU a bare timm ViT encoder reaches on MAE's visible tokens: the ceiling for mae_mfu.py.

MAE's step is mostly its encoder on the visible quarter of the patches (49 of 196 at 224 px, plus
the class token). This times that encoder alone, in a plain PyTorch loop with nothing of sslkit:
the timm blocks on random tokens ``(B, 1 + n_visible, D)``, forward + backward of the mean output,
fused AdamW, bf16 autocast, ``torch.compile`` (default mode; ``--max-autotune`` for inductor's
GEMM autotuning without its CUDA graphs). FLOPs counted with ``torch.utils.flop_counter`` on one
eager step; MFU against the dense bf16 peak (mae_mfu.py's table). If this ceiling is near
the MFU that mae_mfu.py measures for the whole step, what is left is the size of the matrix
products (ViT-S: width 384 over 50 tokens), not sslkit's step.

    python3 benchmarks/vit_ceiling.py --batch-sizes 1024,2048
    .venv/bin/python benchmarks/vit_ceiling.py --device cpu --batch-sizes 2 --steps 2 --warmup 1 --no-compile  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_mfu import peak_tflops


def encoder_step(run, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, device: torch.device) -> None:
    """Forward (``run``: the blocks, compiled or not) + backward of the mean output + the optimizer."""
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = run(tokens).float().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(batch: int, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    vit = timm.create_model(args.model, num_classes=0).to(device)
    blocks = torch.nn.Sequential(*vit.blocks, vit.norm)
    tokens = torch.randn(batch, 1 + args.visible, vit.embed_dim, device=device)
    optimizer = torch.optim.AdamW(blocks.parameters(), lr=1e-4, fused=device.type == "cuda")
    with FlopCounterMode(display=False) as counter:
        encoder_step(blocks, optimizer, tokens, device)
    flops = counter.get_total_flops()
    if not args.no_compile:
        options = {"max_autotune": True, "triton.cudagraphs": False} if args.max_autotune else None
        run = torch.compile(blocks, options=options)
    else:
        run = blocks
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        encoder_step(run, optimizer, tokens, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = args.peak_tflops or peak_tflops(device)
    return {"step_ms": sec * 1000, "tok_img_s": batch / sec, "tflops": flops / sec / 1e12,
            "mfu": flops / sec / (peak * 1e12) if peak else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--visible", type=int, default=49, help="visible patches per image (MAE at 224 px: 49)")
    ap.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1024])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--max-autotune", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    mode = "eager" if args.no_compile else "compile, max-autotune" if args.max_autotune else "compile"
    print(f"bare {args.model} blocks on 1 + {args.visible} tokens, bf16, {mode}, torch {torch.__version__}")
    print("| encoder alone | batch | step | img/s | TFLOP/s | MFU |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for b in args.batch_sizes:
        r = measure(b, args)
        print(f"| {args.model} ({mode}) | {b} | {r['step_ms']:.1f} ms | {r['tok_img_s']:,.0f} | "
              f"{r['tflops']:.3g} | {r['mfu']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
