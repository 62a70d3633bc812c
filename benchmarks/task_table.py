"""Every task at one small CPU budget: an LR sweep on CIFAR-10, then CIFAR-10 kNN and chest X-ray AUROC.

For each of the 14 image tasks:

1. **LR sweep (CIFAR-10, 32 px, 3 channels)**: ``sslkit pretrain`` with ``--base-lr`` =
   ``--lr-mults`` x 1e-3 (the engine's built-in ``base_lr``), each run for the same
   ``--budget-min`` CPU minutes (steps = budget / CPU time of one calibrated step, as in
   ``quality.py``), everything else at the task's defaults. Score: weighted cosine kNN
   (k = 20, T = 0.07) top-1 on ``--eval-test`` held-out images with an ``--eval-train``
   bank. The best multiplier is the task's chosen ``base_lr``.
2. **Chest X-ray (1 channel, 64 px)**: pretraining with the chosen ``base_lr`` for
   ``--xray-budget-min`` CPU minutes on ``--xray-images`` images of the training folder
   (no labels), then the weighted kNN AUROC (k = 20) with **patient-grouped 5-fold**
   cross-validation (patients from the file names, as ``label_curve.py``).

Both beside a random-init encoder of the same architecture (computed once per
architecture and input). Standard errors: CIFAR-10 kNN: binomial SE of the accuracy, and
the *paired* SE of the gain over random init (same test images: SE of the per-image
difference of correctness); X-ray: SE over the 5 folds (std / sqrt 5), the gain's SE
from the per-fold differences. The CIFAR-10 number of the chosen LR is the best of the
sweep, so it is optimistic by selection; the X-ray numbers were not used to choose.

Backbones: each task's default, as ``sslkit pretrain`` builds it at the image size: CNN tasks
``timm:resnet18`` (standard stem: 32 px ends as a 1x1 map, cheap); ``mae``/``simmim``
``timm:vit_tiny_patch16_224`` with ``patch_size=8`` below 96 px (``mae`` also ``depth=6`` below
64 px; a work dir started before that default keeps its 12-block runs); ``jigsaw`` needs >= 57 px, so
its CIFAR-10 images are upsampled to 64 px (and scored beside a random ResNet-18 at 64 px).
Batch: ``sslkit pretrain``'s default (64) on CIFAR-10, 32 on the 1,500 X-rays (``--xray-batch-size``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/task_table.py --work runs/bench-tasks
        [--tasks simclr,...] [--budget-min 0.5] [--xray-budget-min 1] [--lr-mults 0.3,1,3]
        [--skip-xray] [--skip-sweep] [--lightly] [--variant 'NAME=TASK[@BUDGET] FLAGS' ...]
        [--xray-variant 'NAME=TASK[@BUDGET] FLAGS' ...]

``--lightly``: also lightly 1.6.0's recipe of each task lightly implements (simclr, moco,
byol, barlowtwins, vicreg, dino, mae, simmim; ``lightly_tasks.py``) around the backbone,
optimizer, LR, schedule, batch and input of the task's chosen sslkit run, for the same
number of steps, scored with the same kNN: columns ``lightly`` and ``sslkit - lightly (SE)``
(paired over the same test images) and a table of both sides' CPU seconds.

``--variant`` (repeatable) adds a CIFAR-10 run of one task with extra ``sslkit pretrain``
flags (``--task-opt``, ``--backbone-opt``, ``--base-lr``, ...) at ``BUDGET`` CPU minutes
(default ``--budget-min``; options that change a step's cost, ``--batch-size`` and ``--backbone``
are calibrated apart; another backbone starts without the table's backbone options), scored
beside a random encoder of its own architecture in a third table: how the defaults were
searched, e.g. ``--lr-mults 1 --variant 'mae-b2=mae@2' --variant 'mae-p4=mae --backbone-opt
patch_size=4'``.

``--xray-variant`` does the same on the chest X-rays (AUROC per fold, beside random init and the
task's default X-ray run), e.g. ``--xray-variant 'simclr-lr1e-3=simclr --base-lr 1e-3'``.

Resumable (``WORK/state.json``: a finished stage is skipped); prints markdown tables
(also ``WORK/results.md``). Data: ``--cifar`` / ``--xray``, by default ``../shared/data``'s archives
extracted into ``WORK`` once. A rerun with other settings, data (folder or file count) or another
spec under a variant's NAME is refused in one line, as is a variant flag ``sslkit pretrain`` refuses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Missing, ReadOnlyStages, SharedStages, Stages, bits, check_settings,  # noqa: E402
                     knn_correct_string, refuse, run_arch, sslkit_pretrain, task_step_cpu_seconds)
from _data import CIFAR_ARCHIVE, XRAY_ARCHIVE, data_folder, data_settings, link_split, stratified_subset  # noqa: E402
from cifar10 import split_files  # noqa: E402
import lightly_tasks  # noqa: E402
from task_table_report import REF_LR, chosen, report, variant_report, xray_variant_report  # noqa: E402
from task_table_variants import TASKS, check_variants, parse_variant, setup, variant_plan  # noqa: E402

PATIENT = r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"


def sslkit_default(field: str):
    """``sslkit pretrain``'s built-in default of a RunConfig field (the table runs each task as pretrain does)."""
    from sslkit.config import defaults

    return defaults()[field]


SETTINGS = "table-settings"


def check_table_settings(st: SharedStages, a, data: dict | None = None) -> dict:
    """A work dir's table runs share one set of settings their stage names do not carry (CIFAR-10 batch,
    budgets, seed, image counts and sizes, X-ray settings): recorded in ``table-settings`` on first use
    and a different set refused in one line (``check_settings``), so no run of one setting is reported
    as another's. A work dir from before the batch was recorded ran 128; one that recorded only the
    batch gets the rest recorded on its next run. The seed is in the split folders' names only in
    work dirs made since (``seed_in_split_names``): older ones keep theirs. ``data``: the data folders'
    record (``data_settings``), compared and kept the same way."""
    st._reload()
    had_runs = any(k.startswith("pretrain-") for k in st.state)
    stored = None if SETTINGS in st.state else {"batch_size": 128} if had_runs else {}
    settings = {"batch_size": a.batch_size, "budget_min": a.budget_min, "seed": a.seed,
                "pretrain_images": a.pretrain_images, "eval_train": a.eval_train, "eval_test": a.eval_test,
                "cifar_image_size": setup("simclr", "cifar")[2], "jigsaw_image_size": setup("jigsaw", "cifar")[2],
                "xray_image_size": setup("simclr", "xray")[2], "xray_budget_min": a.xray_budget_min,
                "xray_images": a.xray_images, "xray_batch_size": a.xray_batch_size, **(data or {})}
    if not st.state:  # a new work dir
        settings["seed_in_split_names"] = True
    return check_settings(st, SETTINGS, settings, stored=stored, record=not a.report_only)


def calibrate(task: str, backbone: str, bopts: dict, size: int, channels: int, batch: int, steps: int = 3,
              topts: dict | None = None) -> float:
    """CPU seconds of one training step (augment, forward, backward, the run's optimizer, on_step_end)."""
    return task_step_cpu_seconds(task, backbone, bopts, topts or {}, size, channels, batch, steps)


def pretrain(st: Stages, name: str, task: str, data: Path, dataset: str, a, budget: float, n_images: int,
             batch: int, base_lr: float | None, extra: list[str] = (), opts: tuple[dict, dict] | None = None,
             backbone: str | None = None) -> dict:
    """``sslkit pretrain`` for ``budget`` CPU min; ``extra`` flags, ``opts`` = (backbone, task) options they
    set; ``backbone``: another than the table's (its options then start empty)."""
    from sslkit.registry import get_task

    default, bopts, size, ch = setup(task, dataset)
    other = bool(backbone) and backbone != default
    bopts = {} if other else bopts
    changed = bool(opts and (opts[0] or opts[1]))  # options that change a step's cost: calibrated apart
    bopts, topts = ({**bopts, **opts[0]}, opts[1]) if changed else (bopts, {})
    key = f"calibrate-{dataset}-{task}" + (f" {json.dumps([bopts, topts], sort_keys=True)}" if changed else "")
    # the architecture too: a task's default for the size may change (simmim's ViT became a ResNet-18 below
    # 96 px) and its step costs another CPU time
    key += f" backbone={backbone}" if other else ("" if default == get_task(task).default_backbone
                                                  else f" default={default}")
    backbone = backbone if other else default
    key += f" batch={batch}" if batch != (a.batch_size if dataset == "cifar" else a.xray_batch_size) else ""
    cal = st.run(key, lambda: {"cpu_s_per_step": round(calibrate(task, backbone, bopts, size, ch, batch,
                                                                 topts=topts), 3)})
    steps = max(4, int(budget * 60 / cal["cpu_s_per_step"]))
    epochs = math.ceil(steps / max(1, n_images // batch)) + 1
    run = a.work / "runs" / name
    args = ["--task", task, "--data", f"folder:{data}", "--backbone", backbone, "--image-size", str(size),
            "--channels", str(ch), "--batch-size", str(batch), "--epochs", str(epochs), "--max-steps", str(steps),
            "--seed", str(a.seed), "--device", "cpu", "--cache", str(a.work / f"cache-{dataset}-{size}"), "--quiet",
            "--keep-checkpoints", "1"]  # the newest resumes a cut run; a table of ~40 runs kept 3 each (~25 GB)
    if base_lr is not None:
        args += ["--base-lr", f"{base_lr:g}"]
    for k, v in bopts.items():
        args += ["--backbone-opt", f"{k}={v}"]
    args += list(extra)
    def go() -> dict:
        info = run / "run.json"
        if info.exists() and json.loads(info.read_text()).get("status") == "finished":
            return {"note": "finished earlier", "cpu_s": None}
        return sslkit_pretrain(run, args)
    out = st.run(f"pretrain-{name}", go)
    cfg = json.loads((run / "run.json").read_text())
    c = cfg.get("config", cfg)
    return {**out, "run": str(run), "steps": c.get("max_steps") or steps, "base_lr": c.get("base_lr")}


def xray_auroc(run_dir: Path, data: Path, baseline: bool, seed: int, k: int = 20) -> dict[str, list[float]]:
    """``{encoder: per-fold kNN AUROC}`` (patient-grouped 5-fold); ``random`` too with ``baseline``."""
    import torch

    from sslkit.eval.probes import DataArgs, knn_results, prepare

    torch.manual_seed(seed)
    args = DataArgs(data=f"folder:{data}", split="group:5", group_pattern=PATIENT, positive="PNEUMONIA",
                    baseline=baseline, batch_size=128, progress=False, device="cpu", seed=seed)
    prep = prepare(str(run_dir), args)
    folds = [knn_results(prep.fold(i), [k]) for i in range(len(prep.folds))]
    return {enc: [float(f[enc][f"k={k}"]["auroc"]) for f in folds] for enc in folds[0]}


def cifar_splits(a) -> tuple[Path, Path, Path, int]:
    train_files, val_files = split_files(a.cifar, 5000, a.seed)
    pre = stratified_subset(train_files, a.pretrain_images, a.seed)
    split = a.work / "split"
    pretrain = link_split(pre, split / f"pretrain-{a.pretrain_images}{a.split_suffix}")
    bank = link_split(stratified_subset(train_files, a.eval_train, a.seed + 1),
                      split / f"bank-{a.eval_train}{a.split_suffix}")
    test = link_split(stratified_subset(val_files, a.eval_test, a.seed), split / f"test-{a.eval_test}{a.split_suffix}")
    return pretrain, bank, test, sum(len(v) for v in pre.values())


def xray_split(a) -> tuple[Path, int]:
    root = a.xray
    files = {c: sorted((root / c).glob("*.jpeg")) + sorted((root / c).glob("*.jpg")) for c in ("NORMAL", "PNEUMONIA")}
    sub = stratified_subset(files, a.xray_images, a.seed)
    split = link_split(sub, a.work / "split" / f"xray-{a.xray_images}{a.split_suffix}")
    return split, sum(len(v) for v in sub.values())


def cifar_run(st, a, task: str, m: float | None, pretrain_dir: Path, bank: Path, test: Path, n_pre: int) -> dict:
    name = f"cifar-{task}-" + ("default" if m is None else f"lr{m:g}")
    lr = None if m is None else m * REF_LR
    info = pretrain(st, name, task, pretrain_dir, "cifar", a, a.budget_min, n_pre, a.batch_size, lr)
    run = Path(info["run"])
    correct = st.run(f"knn-{name}", lambda: knn_correct_string(run, bank, test, True, a.seed))
    arch = run_arch(run)
    rand = st.run(f"knn-random-init-cifar-{arch}", lambda: knn_correct_string(run, bank, test, False, a.seed))
    return {**info, "correct": correct, "random": rand, "arch": arch}


def variant_pretrain(st, a, spec: str, dataset: str, data: Path, n_images: int) -> dict:
    """Pretraining of one ``--variant`` (``dataset`` "cifar") or ``--xray-variant`` ("xray"): the run's
    info with its task, budget and flags."""
    v = variant_plan(a, spec, dataset)
    info = pretrain(st, f"{dataset}-var-{v['name']}", v["task"], data, dataset, a, v["budget"], n_images, v["batch"],
                    None, v["flags"], (v["bopts"], v["topts"]), v["backbone"])
    return {**info, "task": v["task"], "budget": v["budget"], "flags": v["shown"]}


def variant_run(st, a, spec: str, pretrain_dir: Path, bank: Path, test: Path, n_pre: int) -> dict:
    """One ``--variant``: the task with extra flags at its budget, kNN beside random init of its architecture."""
    info = variant_pretrain(st, a, spec, "cifar", pretrain_dir, n_pre)
    run = Path(info["run"])
    correct = st.run(f"knn-{run.name}", lambda: knn_correct_string(run, bank, test, True, a.seed))
    arch = run_arch(run)
    rand = st.run(f"knn-random-init-cifar-{arch}", lambda: knn_correct_string(run, bank, test, False, a.seed))
    return {**info, "correct": correct, "random": rand, "arch": arch}


def xray_run(st, a, task: str, sweep: dict, xdata: Path, n_x: int) -> dict:
    """Pretrain on the X-rays with the sweep's best LR; per-fold AUROC beside random init."""
    best = max(sweep, key=lambda m: bits(sweep[m]["correct"]).mean())
    name = f"xray-{task}"
    info = pretrain(st, name, task, xdata, "xray", a, a.xray_budget_min, n_x, a.xray_batch_size,
                    None if best is None else best * REF_LR)
    folds, random = xray_scores(st, a, name, Path(info["run"]), xdata)
    return {**info, "folds": folds, "random": random}


def xray_scores(st, a, name: str, run: Path, xdata: Path):
    """(per-fold AUROC of ``run``, per-fold AUROC of random init of its architecture: computed once)."""
    key = "auroc-random-init-xray-" + run_arch(run)
    st._reload()
    res = st.run(f"auroc-{name}", lambda: xray_auroc(run, xdata, key not in st.state, a.seed))
    rand = st.run(key, lambda: res["random"] if "random" in res else xray_auroc(run, xdata, True, a.seed)["random"])
    return res["pretrained"], rand


def xray_variant_run(st, a, spec: str, xdata: Path, n_x: int) -> dict:
    """One ``--xray-variant``: the task with extra flags on the X-rays, AUROC beside random init."""
    info = variant_pretrain(st, a, spec, "xray", xdata, n_x)
    run = Path(info["run"])
    folds, random = xray_scores(st, a, run.name, run, xdata)
    return {**info, "folds": folds, "random": random}


def parse_args() -> argparse.Namespace:
    """The command line of ``task_table.py``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-tasks"))
    ap.add_argument("--cifar", type=Path, default=None, help="holds train/<class>/*.jpg (default: "
                    "../shared/data/cifar10-train.tar.gz, extracted into WORK/data-cifar)")
    ap.add_argument("--xray", type=Path, default=None, help="holds NORMAL/, PNEUMONIA/ (default: "
                    "../shared/data/pneumonia-train.tar.gz, extracted into WORK/data-xray)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--budget-min", type=float, default=0.5, help="CPU minutes per CIFAR-10 run")
    ap.add_argument("--xray-budget-min", type=float, default=0.6, help="CPU minutes per X-ray run")
    ap.add_argument("--lr-mults", default="1,3",
                    help="base_lr = mult x 1e-3 (multipliers already measured in WORK are shown too)")
    ap.add_argument("--batch-size", type=int, default=sslkit_default("batch_size"),
                    help="CIFAR-10 (default: sslkit pretrain's; the work dirs before 2026-12-05 ran 128)")
    ap.add_argument("--xray-batch-size", type=int, default=32)
    ap.add_argument("--pretrain-images", type=int, default=5000, help="CIFAR-10, of the 45k training split")
    ap.add_argument("--eval-train", type=int, default=5000, help="kNN bank (of the 45k split)")
    ap.add_argument("--eval-test", type=int, default=2000, help="scored images (of the 5k split)")
    ap.add_argument("--xray-images", type=int, default=1500, help="X-ray images (pretraining and 5-fold eval)")
    ap.add_argument("--skip-sweep", action="store_true", help="CIFAR-10: run only the task's default LR")
    ap.add_argument("--skip-xray", action="store_true")
    ap.add_argument("--lightly", action="store_true",
                    help="also lightly 1.6.0's recipe of each task it implements, same steps "
                         "(benchmarks/lightly_tasks.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="print the tables of what has finished; run nothing")
    ap.add_argument("--variant", action="append", default=[], metavar="'NAME=TASK[@BUDGET] FLAGS'",
                    help="also a CIFAR-10 run of TASK with extra pretrain FLAGS at BUDGET CPU min (default "
                         "--budget-min), scored beside random init of its architecture (repeatable), e.g. "
                         "'mae-b2=mae@2' or 'mae-p4=mae --backbone-opt patch_size=4'")
    ap.add_argument("--xray-variant", action="append", default=[], metavar="'NAME=TASK[@BUDGET] FLAGS'",
                    help="as --variant, on the chest X-rays (--xray-budget-min), scored by patient-grouped 5-fold "
                         "AUROC beside random init and the task's default X-ray run (repeatable)")
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the sslkit pretrain subprocesses
    import torch

    torch.set_num_threads(1)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if bad := [t for t in tasks if t not in TASKS]:
        refuse(f"error: unknown task {', '.join(bad)}; choose from {', '.join(TASKS)}")
    a.work = a.work.resolve()
    st = (ReadOnlyStages if a.report_only else SharedStages)(a.work)
    a.cifar = data_folder("--cifar", a.cifar, CIFAR_ARCHIVE, a.work / "data-cifar")
    data = data_settings("cifar", a.cifar)
    if not a.skip_xray or a.xray_variant:
        a.xray = data_folder("--xray", a.xray, XRAY_ARCHIVE, a.work / "data-xray", needs="NORMAL", within="train")
        data |= data_settings("xray", a.xray)
    a.split_suffix = f"-seed{a.seed}" if check_table_settings(st, a, data).get("seed_in_split_names") else ""
    check_variants(st, a)
    mults = [None] if a.skip_sweep else [float(m) for m in a.lr_mults.split(",")]
    pretrain_dir, bank, test, n_pre = cifar_splits(a)
    xdata, n_x = (None, 0) if a.skip_xray and not a.xray_variant else xray_split(a)
    cifar: dict[str, dict] = {}
    xray: dict[str, dict] = {}
    lightly: dict[str, dict] = {}
    for task in tasks:  # task by task, so that whatever has finished is a complete row
        st._reload()
        earlier = {float(k.rsplit("-lr", 1)[1]) for k in st.state if k.startswith(f"knn-cifar-{task}-lr")}
        try:
            todo = mults if mults == [None] else sorted(earlier if a.report_only else set(mults) | earlier)
            for m in todo:
                cifar.setdefault(task, {})[m] = cifar_run(st, a, task, m, pretrain_dir, bank, test, n_pre)
            if a.lightly and task in lightly_tasks.METHODS and task in cifar:
                lightly[task] = lightly_tasks.table_run(st, a.work, task, chosen(cifar[task]), pretrain_dir, bank, test,
                                                        a.seed)
            if not a.skip_xray and task in cifar:
                xray[task] = xray_run(st, a, task, cifar[task], xdata, n_x)
        except Missing as exc:
            print(f"not measured yet: {exc}", file=sys.stderr)
    variants = {}
    for spec in a.variant:
        try:
            variants[parse_variant(spec)[0]] = variant_run(st, a, spec, pretrain_dir, bank, test, n_pre)
        except Missing as exc:
            print(f"not measured yet: {exc}", file=sys.stderr)
    xvariants = {}
    for spec in a.xray_variant:
        try:
            xvariants[parse_variant(spec)[0]] = xray_variant_run(st, a, spec, xdata, n_x)
        except Missing as exc:
            print(f"not measured yet: {exc}", file=sys.stderr)
    best = {t: chosen(runs) for t, runs in cifar.items()}
    text = (report(a, cifar, xray, n_pre, lightly) + lightly_tasks.report(best, lightly)
            + variant_report(variants, best, a.budget_min) + xray_variant_report(xvariants, xray, a.xray_budget_min))
    (a.work / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
