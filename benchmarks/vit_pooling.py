"""Class token vs mean-pooled patch tokens as a ViT's embedding, for trained and random encoders.

For each ViT run of a ``task_table.py`` work dir (``mae``, ``simmim``), CIFAR-10 weighted
kNN (k = 20) top-1 on the table's test images with its bank, with timm's
``global_pool = "token"`` (the class token after the final norm: what ``embed`` and the
ONNX export use) and ``"avg"`` (the mean of the normed patch tokens, as the MAE/I-JEPA
papers probe), each for the trained encoder and the random-init baseline of the same
architecture. Gains over random with the paired SE (same test images).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_pooling.py --work runs/bench-tasks-v2 --test test-5000 \\
        cifar-mae-default cifar-simmim-default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import paired_se  # noqa: E402
from batchnorm_recompute import knn_correct  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-tasks-v2"))
    ap.add_argument("--test", default="test-5000", help="the test split's folder under WORK/split")
    ap.add_argument("runs", nargs="+", help="run names under WORK/runs")
    a = ap.parse_args()
    from sslkit.run import load_run

    bank, test = a.work / "split" / "bank-5000", a.work / "split" / a.test
    print("| run | pooling | trained % | random % | gain (SE) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in a.runs:
        run = load_run(a.work / "runs" / name)
        for pool in ("token", "avg"):
            cells = []
            for weights in (True, False):
                torch.manual_seed(0)  # the same random init as task_table.py's baseline
                encoder = run.build_encoder(weights)
                encoder.model.global_pool = pool  # timm reads it in forward_head; the norm stays before pooling
                cells.append(knn_correct(encoder, run.spec, bank, test))
            g, se = paired_se(*cells)
            print(f"| {name} | {pool} | {100 * cells[0].mean():.1f} | {100 * cells[1].mean():.1f} | "
                  f"{100 * g:+.1f} ({100 * se:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
