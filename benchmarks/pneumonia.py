"""Chest X-ray (pneumonia vs normal): does MAE pretraining on the unlabelled scans help?

MAE (ViT-Tiny, patch 16, mask ratio 0.75) pretrained on the 1-channel training images at
128 x 128 under a CPU budget, then a linear probe (logistic regression, C on a
validation split) and weighted kNN are scored on held-out *patients*, beside a randomly
initialised ViT-Tiny. AUROC is for the class PNEUMONIA.

The split is by patient: file names identify the patient (``personN_...`` for pneumonia,
``IM-N-...`` and ``NORMAL2-IM-N-...`` for normal scans), and all of a patient's images go
to one side, so no patient is both trained on and scored.

    .venv/bin/python benchmarks/pneumonia.py --work runs/bench-pneumonia [--budget-min 30]
        [--image-size 128] [--batch-size 128] [--eval-train 100000]

Resumable: finished stages are skipped (``WORK/state.json``), an interrupted pretraining
continues with ``--resume``. Prints a markdown table at the end (also ``WORK/results.md``).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stages, check_settings, probe, sslkit_pretrain, table, task_step_cpu_seconds  # noqa: E402
from _data import SHARED_DATA, data_settings, extract, link_split, stratified_subset  # noqa: E402

BACKBONE = "timm:vit_tiny_patch16_224"
PATIENT = re.compile(r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)")


def patient_of(name: str) -> str:
    m = PATIENT.match(name)
    if not m:
        raise ValueError(f"cannot tell the patient of {name!r}")
    return m.group(1)


def split_by_patient(raw: Path, test_fraction: float, seed: int) -> tuple[dict, dict]:
    """``{class: [files]}`` for train and test; each patient's images on one side only."""
    files = {c.name: sorted(c.glob("*.jp*g")) for c in sorted((raw / "train").iterdir()) if c.is_dir()}
    patients = sorted({patient_of(f.name) for v in files.values() for f in v})
    rng = np.random.default_rng(seed)
    test_patients = set(rng.permutation(patients)[: round(len(patients) * test_fraction)].tolist())
    train = {c: [f for f in v if patient_of(f.name) not in test_patients] for c, v in files.items()}
    test = {c: [f for f in v if patient_of(f.name) in test_patients] for c, v in files.items()}
    return train, test


def calibrate(image_size: int, batch_size: int, steps: int = 3) -> float:
    """CPU seconds of one sslkit MAE training step (augment, forward, backward, the run's optimizer) at
    this image and batch size, after _common's three warm-up steps."""
    return task_step_cpu_seconds("mae", BACKBONE, {}, {}, image_size, 1, batch_size, steps)


def plan(st: Stages, a, n_train: int) -> dict:
    """The work dir's arguments (the data archive too) and step count (``state.json``'s ``plan``): recorded on the first run;
    a rerun with other arguments is refused in one line (``check_settings``): the stage names and
    split folders carry none of them, so it would mix the two runs' plans and patient splits."""
    p = check_settings(st, "plan", {"budget_cpu_min": a.budget_min, "batch_size": a.batch_size,
                                    "image_size": a.image_size, "seed": a.seed, "test_fraction": a.test_fraction,
                                    "eval_train": a.eval_train, **data_settings("data", a.data)})
    if "steps" not in p:
        cal = st.run("calibrate", lambda: {"cpu_s_per_step": round(calibrate(a.image_size, a.batch_size), 3)})
        steps = max(2, int(a.budget_min * 60 / cal["cpu_s_per_step"]))
        st.put("plan", p := {**p, "steps": steps, "epochs_seen": round(steps * a.batch_size / n_train, 2)})
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-pneumonia"))
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "pneumonia-train.tar.gz")
    ap.add_argument("--budget-min", type=float, default=30.0, help="CPU minutes of pretraining")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--test-fraction", type=float, default=0.2, help="fraction of patients held out")
    ap.add_argument("--eval-train", type=int, default=100000, help="probe training images (subset of the train split)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    work = a.work.resolve()
    st = Stages(work)
    raw = extract(a.data, work / "raw")
    train_files, test_files = split_by_patient(raw, a.test_fraction, a.seed)
    n_train = sum(len(v) for v in train_files.values())
    steps = plan(st, a, n_train)["steps"]
    assert not ({patient_of(f.name) for v in train_files.values() for f in v}
                & {patient_of(f.name) for v in test_files.values() for f in v})
    train = link_split(train_files, work / "split" / "train")
    test = link_split(test_files, work / "split" / "test")
    eval_train_files = stratified_subset(train_files, a.eval_train, a.seed)
    eval_train = link_split(eval_train_files, work / "split" / f"eval-train-{a.eval_train}")

    print(f"budget {a.budget_min} CPU min -> {steps} MAE steps of {a.batch_size} "
          f"({steps * a.batch_size / n_train:.2f} epochs)", flush=True)
    run = work / "runs" / "mae"
    epochs = math.ceil(steps / max(1, n_train // a.batch_size)) + 1
    st.run("pretrain-mae", lambda: sslkit_pretrain(run, [
        "--task", "mae", "--data", f"folder:{train}", "--backbone", BACKBONE, "--image-size", str(a.image_size),
        "--channels", "1", "--batch-size", str(a.batch_size), "--epochs", str(epochs), "--max-steps", str(steps),
        "--seed", str(a.seed), "--device", "cpu", "--cache", str(work / "cache"), "--quiet"]))
    st.run("probe", lambda: probe(run, eval_train, test, baseline=True, positive="PNEUMONIA"))

    s, pl = st.state, st.state["plan"]
    rows = [(f"MAE ViT-Tiny ({s['pretrain-mae']['cpu_s'] / 60:.1f} CPU min)", s["probe"]["pretrained"]),
            ("random init", s["probe"]["random"])]
    cols = [("linear AUROC", "linear", "auroc"), ("linear bal. acc. %", "linear", "balanced_accuracy"),
            ("kNN k=20 AUROC", "k=20", "auroc"), ("kNN k=20 bal. acc. %", "k=20", "balanced_accuracy")]
    counts = {c: (len(eval_train_files[c]), len(test_files[c])) for c in train_files}
    text = (f"Chest X-ray, {pl['steps']} MAE steps of {pl['batch_size']} at {pl['image_size']} px, 1 channel "
            f"({pl['epochs_seen']} epochs of {n_train}), budget {pl['budget_cpu_min']} CPU min; patient split, "
            f"probe train / test images per class: "
            + ", ".join(f"{c} {a_}/{b_}" for c, (a_, b_) in counts.items()) + "; positive class PNEUMONIA\n\n"
            + table(rows, cols))
    (work / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
