"""CIFAR-10: do SimCLR, BYOL, MAE and rotation beat a random encoder under one CPU budget?

Each task pretrains with ``sslkit pretrain`` on the same training images for the same CPU
budget (``--budget-min`` CPU minutes, user + system over all threads, turned into a step
count by timing five of that task's training steps here; one torch thread by default, so
CPU time measures compute rather than threads spin-waiting on a busy machine), then a cosine kNN (weighted
votes, k = 20, T = 0.07; :mod:`sslkit.eval.knn`) on the held-out split scores its encoder
beside a randomly initialised encoder of the same architecture
(``sslkit.embed.embed_run(weights=False)``).

Split: the 50k CIFAR-10 training images -> 45k / 5k (stratified, seeded). For speed the
pretraining set, the kNN bank and the scored set are stratified subsets
(``--pretrain-images``, ``--eval-train``, ``--eval-test``). Backbones at 32 px: the CNN
tasks use ``timm:resnet18`` (standard stem), MAE ``timm:vit_tiny_patch16_224`` with
``patch_size=8`` (16 tokens) - small enough for minutes of CPU.

    .venv/bin/python benchmarks/quality.py --work runs/bench-quality [--budget-min 2]
        [--tasks simclr,byol,mae,rotation] [--batch-size 128]

Resumable (``WORK/state.json``; a rerun with other settings or ``--data`` is refused in one line);
prints a markdown table (also ``WORK/results.md``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Stages, check_settings, knn_correctness, refuse, run_arch, sslkit_pretrain,  # noqa: E402
                     task_step_cpu_seconds)
from _data import CIFAR_ARCHIVE, data_settings, extract, link_split, stratified_subset  # noqa: E402
from cifar10 import split_files  # noqa: E402

SIZE = 32
SETUPS = {  # task -> (backbone, backbone options, task options)
    "simclr": ("timm:resnet18", {}, {}),
    "byol": ("timm:resnet18", {}, {}),
    "rotation": ("timm:resnet18", {}, {}),
    "mae": ("timm:vit_tiny_patch16_224", {"patch_size": 8}, {}),
    "moco": ("timm:resnet18", {}, {}),
    "dino": ("timm:resnet18", {}, {}),
    "barlowtwins": ("timm:resnet18", {}, {}),
    "vicreg": ("timm:resnet18", {}, {}),
}


def calibrate(task_name: str, batch_size: int, steps: int = 5) -> float:
    """CPU seconds of one training step (augment, forward, backward, AdamW, on_step_end)."""
    backbone, bopts, topts = SETUPS[task_name]
    return task_step_cpu_seconds(task_name, backbone, bopts, topts, SIZE, 3, batch_size, steps)


def knn_accuracy(run_dir: Path, bank: Path, test: Path, weights: bool, k: int = 20, seed: int = 0) -> float:
    """Top-1 of the weighted cosine kNN (bank = labelled train subset) on ``test``."""
    return float(knn_correctness(run_dir, bank, test, weights, seed, k).mean())


def check_quality_settings(st: Stages, a) -> dict:
    """The settings the stage names (``calibrate-TASK``, ``pretrain-TASK``, ``knn-TASK``) do not carry,
    one set per work dir: recorded on the first run, another set refused in one line
    (``check_settings``), so that no rerun prints its heading over the first run's numbers."""
    return check_settings(st, "settings", {
        "budget_min": a.budget_min, "batch_size": a.batch_size, "seed": a.seed, "pretrain_images": a.pretrain_images,
        "eval_train": a.eval_train, "eval_test": a.eval_test, "threads": a.threads, **data_settings("data", a.data)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-quality"))
    ap.add_argument("--data", type=Path, default=CIFAR_ARCHIVE)
    ap.add_argument("--budget-min", type=float, default=2.0, help="CPU minutes of pretraining per task")
    ap.add_argument("--tasks", default="simclr,byol,mae,rotation")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pretrain-images", type=int, default=10000, help="of the 45k training split")
    ap.add_argument("--eval-train", type=int, default=5000, help="kNN bank (of the 45k split)")
    ap.add_argument("--eval-test", type=int, default=1000, help="scored images (of the 5k split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads here and in the pretraining processes (1: CPU time is compute time, "
                         "not spin-waiting, on a shared machine)")
    a = ap.parse_args()
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by the sslkit pretrain subprocesses
    torch.set_num_threads(a.threads)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SETUPS]
    if unknown:
        refuse(f"error: no benchmark setup for {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    work = a.work.resolve()
    st = Stages(work)
    raw = extract(a.data, work / "raw")
    check_quality_settings(st, a)
    train_files, val_files = split_files(raw, 5000, a.seed)
    pre_files = stratified_subset(train_files, a.pretrain_images, a.seed)
    pretrain = link_split(pre_files, work / "split" / f"pretrain-{a.pretrain_images}")
    bank = link_split(stratified_subset(train_files, a.eval_train, a.seed + 1), work / "split" / f"bank-{a.eval_train}")
    test = link_split(stratified_subset(val_files, a.eval_test, a.seed), work / "split" / f"test-{a.eval_test}")
    n_pre = sum(len(v) for v in pre_files.values())

    rows = []
    for task in tasks:
        backbone, bopts, topts = SETUPS[task]
        cal = st.run(f"calibrate-{task}", lambda: {"cpu_s_per_step": round(calibrate(task, a.batch_size), 3)})
        steps = max(2, int(a.budget_min * 60 / cal["cpu_s_per_step"]))
        epochs = math.ceil(steps / max(1, n_pre // a.batch_size)) + 1
        run = work / "runs" / task
        args = ["--task", task, "--data", f"folder:{pretrain}", "--backbone", backbone, "--image-size", str(SIZE),
                "--channels", "3", "--batch-size", str(a.batch_size), "--epochs", str(epochs), "--max-steps",
                str(steps), "--seed", str(a.seed), "--device", "cpu", "--cache", str(work / "cache"), "--quiet"]
        for k, v in bopts.items():
            args += ["--backbone-opt", f"{k}={v}"]
        for k, v in topts.items():
            args += ["--task-opt", f"{k}={v}"]
        trained = st.run(f"pretrain-{task}", lambda: sslkit_pretrain(run, args))
        arch = run_arch(run)
        acc = st.run(f"knn-{task}", lambda: knn_accuracy(run, bank, test, True))
        rand = st.run(f"knn-random-init-{arch}", lambda: knn_accuracy(run, bank, test, False, seed=a.seed))
        rows.append((task, arch, steps, trained, {"pretrained": acc, "random": rand}))

    lines = [f"CIFAR-10 32 px, budget {a.budget_min} CPU min per task, batch {a.batch_size}, pretraining on "
             f"{n_pre} of the 45k split; weighted cosine kNN (k=20) top-1 on {a.eval_test} held-out images "
             f"with a {a.eval_train}-image bank", "",
             "| task | backbone | steps | epochs seen | CPU min | kNN top-1 % | random init % | gain (points) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for task, bb, steps, trained, acc in rows:
        lines.append(f"| {task} | {bb} | {steps} | {steps * a.batch_size / n_pre:.2f} | {trained['cpu_s'] / 60:.1f} | "
                     f"{100 * acc['pretrained']:.1f} | {100 * acc['random']:.1f} | "
                     f"{100 * (acc['pretrained'] - acc['random']):+.1f} |")
    text = "\n".join(lines)
    (work / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
