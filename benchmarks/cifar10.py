"""CIFAR-10: is sslkit's SimCLR as good as the field's, and better than random init?

SimCLR (timm resnet18 with the CIFAR stem: 3x3 stride-1 conv, no max-pool; 32 px; NT-Xent
tau 0.5; projection 512-2048-128; simclr's default optimizer and LR, warm-up then cosine:
LARS at 1.2 x sqrt(batch/256) since the twelfth session, AdamW in the records before it)
trained twice under one CPU budget on the same 45k training split:

* ``sslkit``: ``sslkit pretrain --task simclr`` (batched tensor augmentation, one process);
* ``lightly``: lightly 1.6.0's ``SimCLRTransform`` (same crop scale, flip, colour jitter
  0.4/0.4/0.4/0.1 at p 0.8, grey 0.2, no blur at 32 px), ``SimCLRProjectionHead`` and
  ``NTXentLoss`` around the same backbone, optimizer and schedule (``lightly_tasks.simclr``,
  projection hidden width 2048 as sslkit's, trained by ``lightly_tasks.train``).

The budget (``--budget-min`` CPU minutes, user + system over all threads; the issue asks
for 30) is turned into a number of steps by timing sslkit's training step on this
machine; both libraries then train for that many steps, so both see the same images,
and each one's CPU time is reported beside its accuracy. Then weighted kNN (k = 20, 200;
T = 0.07) and a linear probe (logistic regression, C on a validation split) are scored
on the held-out 5k split for both encoders and a randomly initialised one, and the kNN
k = 20 difference sslkit - lightly with its SE paired over the same test images.

    .venv/bin/python benchmarks/cifar10.py --work runs/bench-cifar10 [--budget-min 30 | --steps N]
        [--batch-size 256] [--eval-train 45000] [--eval-test 5000] [--precision bf16] [--parallel]

``--steps`` fixes the step count instead (the issue's 500 x 256); ``--precision bf16`` runs
both sides under CPU autocast (2.3x faster a step on a CPU with AMX); ``--parallel`` trains
the two libraries at the same time, each in its own process (set ``OMP_NUM_THREADS`` to
cores / 2), then scores with all cores.

Resumable: finished stages are skipped (``WORK/state.json``), an interrupted sslkit run
continues with ``--resume``, an interrupted lightly run from its last ``resume.pt``. Prints a
markdown table at the end (also ``WORK/results.md``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lightly_tasks  # noqa: E402
from _common import (Stages, bits, check_settings, knn_correct_string, paired_se, probe,  # noqa: E402
                     sslkit_pretrain, table, task_step_cpu_seconds)
from _data import SHARED_DATA, data_settings, extract, link_split, stratified_subset  # noqa: E402

BACKBONE, BACKBONE_OPTS, SIZE = "timm:resnet18", {"cifar_stem": True}, 32


def split_files(raw: Path, n_val: int, seed: int) -> tuple[dict, dict]:
    """Stratified train / val split of ``raw/train/<class>/*.jpg`` (``n_val`` images held out)."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (raw / "train").iterdir() if p.is_dir())
    total = sum(len(list((raw / "train" / c).glob("*.jpg"))) for c in classes)
    train, val = {}, {}
    for c in classes:
        files = sorted((raw / "train" / c).glob("*.jpg"))
        idx = rng.permutation(len(files))
        k = round(len(files) * n_val / total)
        val[c] = [files[i] for i in sorted(idx[:k])]
        train[c] = [files[i] for i in sorted(idx[k:])]
    return train, val


def simclr_step(batch_size: int, channels_last: bool = False):
    """``step(bf16=False)``: one sslkit SimCLR training step (augment, forward, NT-Xent,
    backward, AdamW) on a fixed random batch, optionally under CPU bf16 autocast."""
    import torch

    from sslkit.optim import build_optimizer
    from sslkit.registry import create_backbone, create_task
    from sslkit.spec import InputSpec

    torch.manual_seed(0)
    spec = InputSpec(3, SIZE, (0.5,) * 3, (0.25,) * 3)
    task = create_task("simclr", create_backbone(BACKBONE, 3, SIZE, **BACKBONE_OPTS), spec)
    if channels_last:
        task = task.to(memory_format=torch.channels_last)
    augment = task.views(spec)
    opt = build_optimizer(task, "adamw", 1e-3, 0.05)
    x = torch.rand(batch_size, 3, SIZE, SIZE)

    def step(bf16: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = task(augment(x))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def calibrate(batch_size: int, steps: int = 3) -> float:
    """CPU seconds of one sslkit SimCLR training step (augment, forward, backward, the run's optimizer:
    simclr's LARS) at this batch, fp32, after _common's three warm-up steps."""
    return task_step_cpu_seconds("simclr", BACKBONE, BACKBONE_OPTS, {}, SIZE, 3, batch_size, steps)


def plan(st: Stages, a, n_train: int) -> dict:
    """The work dir's plan (steps, budget, batch, precision, seed, eval counts, data archive): recorded on the first
    run; a rerun with other settings is refused in one line (``check_settings``), since the stage
    names carry none of them. The steps come from ``--steps`` or the calibrated ``--budget-min``."""
    settings = {"budget_cpu_min": None if a.steps else a.budget_min, "batch_size": a.batch_size,
                "precision": a.precision, "seed": a.seed, "eval_train": a.eval_train, "eval_test": a.eval_test,
                **data_settings("data", a.data)}
    if a.steps:
        settings["steps"] = a.steps
    old = st.state.get("plan")
    if old is not None and "budget_cpu_min" not in old:  # an older dir's --steps plan
        old = {**old, "budget_cpu_min": None}
    p = check_settings(st, "plan", settings, stored=old)
    if "steps" not in p:
        cal = st.run("calibrate", lambda: {"cpu_s_per_step": round(calibrate(a.batch_size), 2)})
        steps = max(2, int(a.budget_min * 60 / cal["cpu_s_per_step"]))
        st.put("plan", p := {**p, "steps": steps, "epochs_seen": round(steps * a.batch_size / n_train, 3)})
    elif "epochs_seen" not in p:
        st.put("plan", p := {**p, "epochs_seen": round(p["steps"] * a.batch_size / n_train, 3)})
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-cifar10"))
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "cifar10-train.tar.gz")
    ap.add_argument("--budget-min", type=float, default=30.0, help="CPU minutes of pretraining per library")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--eval-train", type=int, default=45000, help="kNN bank / probe training images (of 45k)")
    ap.add_argument("--eval-test", type=int, default=5000, help="scored images (of the 5k split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="steps of pretraining (default: from --budget-min)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--parallel", action="store_true", help="train sslkit and lightly at the same time")
    a = ap.parse_args()
    work = a.work.resolve()
    st = Stages(work)
    raw = extract(a.data, work / "raw")
    train_files, val_files = split_files(raw, 5000, a.seed)
    n_train = sum(len(v) for v in train_files.values())
    steps = plan(st, a, n_train)["steps"]
    train = link_split(train_files, work / "split" / "train")
    link_split(val_files, work / "split" / "val")
    eval_train = link_split(stratified_subset(train_files, a.eval_train, a.seed), work / "split" / f"eval-train-{a.eval_train}")
    eval_test = link_split(stratified_subset(val_files, a.eval_test, a.seed), work / "split" / f"eval-test-{a.eval_test}")

    print(f"{steps} steps of {a.batch_size} ({steps * a.batch_size / n_train:.2f} epochs), {a.precision}", flush=True)
    epochs = math.ceil(steps / (n_train // a.batch_size)) + 1
    sslkit_run = work / "runs" / "sslkit-simclr"
    ours = threading.Thread(target=st.run, args=("pretrain-sslkit", lambda: sslkit_pretrain(sslkit_run, [
        "--task", "simclr", "--data", f"folder:{train}", "--backbone", BACKBONE, "--backbone-opt", "cifar_stem=true",
        "--image-size", str(SIZE), "--batch-size", str(a.batch_size), "--epochs", str(epochs),
        "--max-steps", str(steps), "--seed", str(a.seed), "--device", "cpu", "--cache", str(work / "cache"),
        "--precision", a.precision, "--quiet"])))
    ours.start()
    if not a.parallel:
        ours.join()
    while not (sslkit_run / "run.json").exists() and ours.is_alive():
        time.sleep(5)  # lightly reads the run's config (LR, schedule, precision) from it
    if not (sslkit_run / "run.json").exists():
        ours.join()
        sys.exit("the sslkit run failed before it started (see above)")
    lightly_run = work / "runs" / "lightly-simclr"
    st.run("pretrain-lightly", lambda: lightly_tasks.train("simclr", train, sslkit_run, lightly_run, steps, hidden=2048))
    ours.join()
    if "pretrain-sslkit" not in st.state:
        sys.exit("the sslkit run failed (see above); rerun the same command to resume it")
    if a.parallel:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
    st.run("probe-sslkit", lambda: probe(sslkit_run, eval_train, eval_test, baseline=True))
    st.run("probe-lightly", lambda: probe(lightly_run, eval_train, eval_test, baseline=False))
    # each image's kNN verdict from the probe's embeddings (a state file from before they were kept: embed again)
    pair = st.run("knn-pair", lambda: {
        name: st.state[f"probe-{name}"]["pretrained"].get("correct_k20")
        or knn_correct_string(run, eval_train, eval_test, True, a.seed)
        for name, run in (("sslkit", sslkit_run), ("lightly", lightly_run))})
    diff, se = paired_se(bits(pair["sslkit"]), bits(pair["lightly"]))

    s = st.state
    rows = [(f"sslkit SimCLR ({s['pretrain-sslkit']['cpu_s'] / 60:.1f} CPU min)", s["probe-sslkit"]["pretrained"]),
            (f"lightly SimCLR ({s['pretrain-lightly']['cpu_s'] / 60:.1f} CPU min)", s["probe-lightly"]["pretrained"]),
            ("random init", s["probe-sslkit"]["random"])]
    cols = [("kNN k=20 top-1 %", "k=20", "top1"), ("kNN k=200 top-1 %", "k=200", "top1"),
            ("linear top-1 %", "linear", "top1"), ("linear bal. acc. %", "linear", "balanced_accuracy")]
    pl = s["plan"]
    budget = f"budget {pl['budget_cpu_min']} CPU min" if pl.get("budget_cpu_min") else "fixed step count"
    text = (f"CIFAR-10, {pl['steps']} SimCLR steps of {pl['batch_size']} ({pl['epochs_seen']} epochs of "
            f"{n_train}), {pl['precision']}, {budget}; scored on {sum(len(v) for v in stratified_subset(val_files, a.eval_test, a.seed).values())} "
            f"held-out images, kNN bank / probe training set {sum(len(v) for v in stratified_subset(train_files, a.eval_train, a.seed).values())} images\n\n"
            + table(rows, cols)
            + f"\n\nkNN k=20, sslkit - lightly over the same {len(pair['sslkit'])} test images: "
            f"{100 * diff:+.1f} points (paired SE {100 * se:.1f})")
    (work / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
