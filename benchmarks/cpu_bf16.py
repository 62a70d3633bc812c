"""CPU step time of SimCLR in fp32 and under bf16 autocast (``--precision bf16``), as a ratio.

The step of ``benchmarks/cifar10.py`` (timm resnet18 with the CIFAR stem, 32 px, batch 256:
augmentation, forward, NT-Xent, backward, AdamW), channels-last as the engine trains CNNs on
CPU, timed in alternating rounds of fp32 and bf16 so that load from other processes hits
both alike; prints the median CPU and wall seconds of a step and fp32 / bf16. On a CPU with
AMX (``amx_bf16`` in ``lscpu``) bf16 matrix products run in hardware; without native bf16
the ratio can be below 1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_bf16.py [--rounds 3] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds  # noqa: E402
from cifar10 import BACKBONE, SIZE, simclr_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    a = ap.parse_args()
    import torch

    run_step = simclr_step(a.batch_size, channels_last=True)

    def step(bf16: bool) -> tuple[float, float]:
        c0, t0 = cpu_seconds(), time.perf_counter()
        run_step(bf16)
        return cpu_seconds() - c0, time.perf_counter() - t0

    step(False), step(True)  # warm-up: allocations, kernel selection
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(a.rounds):
        for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            times[bf16].append(step(bf16))
    med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in times.items()}
    print(f"SimCLR step, {BACKBONE} cifar_stem, {SIZE} px, batch {a.batch_size}, torch threads "
          f"{torch.get_num_threads()}, {a.rounds} rounds")
    print(f"fp32: {med[False][0]:.2f} CPU s, {med[False][1]:.2f} wall s a step")
    print(f"bf16: {med[True][0]:.2f} CPU s, {med[True][1]:.2f} wall s a step")
    print(f"fp32 / bf16 = {med[False][0] / med[True][0]:.2f} (CPU), {med[False][1] / med[True][1]:.2f} (wall)")


if __name__ == "__main__":
    main()
