"""What recomputing BatchNorm statistics on whole images does to kNN, for trained and random encoders.

For each run of a ``task_table.py`` work dir, CIFAR-10 weighted kNN (k = 20) top-1 on the
table's test images with its bank, for four encoders of the run's architecture:

* ``trained``: the saved encoder as it is;
* ``trained+bn``: its BatchNorm running statistics recomputed on whole, un-augmented
  pretraining images (``sslkit.engine.batchnorm.recompute_batchnorm``, what the engine
  does at the end of a task with ``recompute_batchnorm = True``, e.g. jigsaw);
* ``random`` and ``random+bn``: the random-init baseline, without and with the same step:
  what part of a gain is the statistics alone.

Each beside ``random`` with the paired SE (same test images).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batchnorm_recompute.py --work runs/bench-tasks \\
        cifar-jigsaw-default cifar-denoising-default ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_knn_correctness, paired_se  # noqa: E402


def knn_correct(encoder, spec, bank: Path, test: Path) -> np.ndarray:
    from sslkit.embed import Model, torch_encode

    model = Model(spec, {}, torch_encode(encoder, spec, torch.device("cpu")), "torch", {})
    return model_knn_correctness(model, bank, test).astype(float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-tasks"))
    ap.add_argument("runs", nargs="+", help="run names under WORK/runs")
    a = ap.parse_args()
    from sslkit.data.loader import BatchLoader
    from sslkit.data.pipeline import load_data
    from sslkit.engine.batchnorm import recompute_batchnorm
    from sslkit.run import load_run

    split = a.work / "split"
    bank, test = split / "bank-5000", split / "test-2000"
    print("| run | trained % | trained + recomputed BN % | random % | random + recomputed BN % |")
    print("| --- | ---: | ---: | ---: | ---: |")
    loaders = {}  # (size, channels) -> the pretraining images decoded once for every run at that input
    for name in a.runs:
        run = load_run(a.work / "runs" / name)
        shape = (run.spec.image_size, run.spec.channels)
        if shape not in loaders:
            pre = load_data(f"folder:{split / 'pretrain-5000'}", *shape, {}, progress=False)
            loaders[shape] = BatchLoader(pre.prepared.pixels, 128, seed=0, pin_memory=False)
        loader = loaders[shape]
        cells = {}
        for weights in (True, False):
            tag = "trained" if weights else "random"
            cells[tag] = knn_correct(run.build_encoder(weights), run.spec, bank, test)
            encoder = run.build_encoder(weights)
            recompute_batchnorm(encoder, loader, run.spec.mean, run.spec.std, torch.device("cpu"), seed=0)
            cells[f"{tag}+bn"] = knn_correct(encoder, run.spec, bank, test)
        base = cells["random"]
        text = [f"{100 * c.mean():.1f}" + ("" if tag == "random" else
                                           f" ({100 * (c.mean() - base.mean()):+.1f}, SE {100 * paired_se(c, base)[1]:.1f})")
                for tag, c in cells.items()]
        print(f"| {name} | {text[0]} | {text[1]} | {text[2]} | {text[3]} |", flush=True)


if __name__ == "__main__":
    main()
