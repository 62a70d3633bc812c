"""NCHW vs channels-last training step of a timm CNN on this machine (CPU by default).

fwd + bwd + AdamW on the same random batch, two copies of the same model, rounds
interleaved (order swapped each round), medians printed with their ratio; the forward
outputs of the two layouts are compared first.

    .venv/bin/python benchmarks/channels_last.py --model resnet18 --batch-size 512 --image-size 32 [--cifar-stem]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sslkit.registry import create_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    opts = {"cifar_stem": True} if a.cifar_stem else {}
    x = torch.randn(a.batch_size, 3, a.image_size, a.image_size, device=a.device)
    models, optims = {}, {}
    for cl in (False, True):
        torch.manual_seed(0)
        m = create_backbone(f"timm:{a.model}", in_chans=3, image_size=a.image_size, **opts).to(a.device)
        models[cl] = m.to(memory_format=torch.channels_last) if cl else m
        optims[cl] = torch.optim.AdamW(models[cl].parameters())

    def inputs(cl: bool) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    with torch.no_grad():
        ref, out = models[False](inputs(False)), models[True](inputs(True))
    diff = float((ref - out).abs().max())

    def step(cl: bool) -> float:
        t = time.perf_counter()
        loss = models[cl](inputs(cl)).square().mean()
        optims[cl].zero_grad(set_to_none=True)
        loss.backward()
        optims[cl].step()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for cl in (False, True):
        step(cl), step(cl)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(a.rounds):
        for cl in ((False, True) if r % 2 == 0 else (True, False)):
            times[cl].append(step(cl))
    nchw, last = statistics.median(times[False]), statistics.median(times[True])
    print(f"{a.model}{' (CIFAR stem)' if a.cifar_stem else ''} batch {a.batch_size} {a.image_size} px on {a.device}, "
          f"torch threads {torch.get_num_threads()}: forward max abs diff {diff:.1e}")
    print(f"NCHW {nchw * 1000:.0f} ms, channels-last {last * 1000:.0f} ms a step: ratio {last / nchw:.2f}")


if __name__ == "__main__":
    main()
