"""The CPU step with sslkit's glibc malloc settings vs glibc's own (``SSLKIT_MALLOC=system``).

Runs ``sslkit pretrain`` end to end (2,048 synthetic 32-px PNGs through the ``folder:`` source and
the decoded cache, as a user's run; batch 256, one torch thread, the
table's ViT-Tiny patch 8 for mae/simmim, ResNet-18 otherwise), alternating the two settings
``--rounds`` times per task so that load on the machine hits both alike, and prints each side's
median step (from metrics.csv, the first ``--skip`` steps left out) and the ratio.

    .venv/bin/python benchmarks/host_malloc.py [--tasks simmim,mae,simclr] [--rounds 2] [--steps 16]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from step_overhead import synthetic_folder

SIDES = {"tuned": {}, "glibc's own": {"SSLKIT_MALLOC": "system"}}


def run(task: str, data: str, out: Path, steps: int, skip: int, extra_env: dict[str, str]) -> float:
    """Median step seconds of one ``sslkit pretrain`` run."""
    vit = task in ("mae", "simmim")
    backbone = ["--backbone", "timm:vit_tiny_patch16_224", "--backbone-opt", "patch_size=8"] if vit else \
        ["--backbone", "timm:resnet18"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "OMP_NUM_THREADS": "1",
           **extra_env}
    cmd = [sys.executable, "-m", "sslkit", "pretrain", "--task", task, *backbone, "--data", data, "--out", str(out),
           "--max-steps", str(steps), "--batch-size", "256", "--image-size", "32", "--quiet",
           "--cache", str(out.parent / "cache")]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))[skip:]
    return statistics.median(256 / float(r["img_per_s"]) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="simmim,mae,simclr")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip", type=int, default=4, help="first steps left out (warm-up)")
    ap.add_argument("--data", default=None, help="an image folder to train on (default: 2,048 synthetic PNGs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = f"folder:{args.data or synthetic_folder(work / 'images', 2048, 32)}"
        print(f"sslkit pretrain, 32 px, batch 256, 1 thread, {args.steps} steps (median of the last "
              f"{args.steps - args.skip}), {args.rounds} alternating rounds")
        for task in args.tasks.split(","):
            times: dict[str, list[float]] = {side: [] for side in SIDES}
            for r in range(args.rounds):
                for side, env in (SIDES.items() if r % 2 == 0 else reversed(SIDES.items())):
                    times[side].append(run(task, data, work / f"{task}-{r}-{len(times[side])}-{side[:5]}",
                                           args.steps, args.skip, env))
            tuned, own = (times[side] for side in SIDES)
            each = " vs ".join(", ".join(f"{t * 1000:.0f}" for t in ts) for ts in (tuned, own))
            ratio = statistics.median(tuned) / statistics.median(own)
            print(f"{task:8s} median step tuned {statistics.median(tuned) * 1000:6.0f} ms, glibc's own "
                  f"{statistics.median(own) * 1000:6.0f} ms: ratio {ratio:.3f}  (runs {each} ms)", flush=True)


if __name__ == "__main__":
    main()
