"""Chest X-ray label-efficiency curve: does pretraining help at 1 %, 10 % and 100 % of the labels?

A task's defaults (``--task``, default ``vicreg``: the highest X-ray AUROC of the README's
task table; its default backbone, ResNet-18, or ``--backbone``; 1 channel, 64 x 64, batch
128) are pretrained on the 5216 unlabelled training X-rays, then ``sslkit eval curve``
scores a linear probe and weighted kNN at each label fraction with **patient-grouped
5-fold** cross-validation (patients from the file names: ``personN_...``, ``IM-N-...``,
``NORMAL2-IM-N-...``), beside a random-init encoder of the same architecture.
Note: the encoder saw every image (test folds included) without labels, as in-domain
self-supervised pretraining does; no label is used before the probes.

With ``--init-imagenet`` a second run continues from timm's ImageNet weights of the same
backbone (ResNet-18 or ViT-Tiny; made into a local file from the Hugging Face cache,
offline) and its curve adds the ``init`` row (those weights before the X-ray pretraining);
without cached weights this stage is skipped with a message. ``--init SRC`` does the same from any ``--init`` source
(a weights file, a Hub id, or a run directory such as the first run: continued pretraining).

    .venv/bin/python benchmarks/label_curve.py --work runs/bench-curve [--data-dir /tmp/sslkit-data]
        [--task vicreg] [--backbone NAME] [--steps 150] [--seed 0] [--image-size 64] [--fractions 0.01,0.1,1]
        [--init-imagenet | --init SRC]

Resumable: finished stages are skipped (``WORK/state.json``); a rerun with other settings or
other data is refused in one line (the init run's source is recorded once it has run). Torch runs with one OpenMP
thread (``OMP_NUM_THREADS=1``): on the shared 2-core machine two spinning OpenMP threads
per process made MAE steps 6-10x slower. Prints a markdown table (also ``WORK/results.md``);
the runs are ``WORK/TASK`` and ``WORK/TASK-init``, the plots ``WORK/TASK-curve.png`` (and
``-init``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stages, check_settings, sslkit_pretrain  # noqa: E402
from _data import XRAY_ARCHIVE, data_folder, data_settings  # noqa: E402

PATIENT = r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"
IMAGENET_TAGS = {"timm:vit_tiny_patch16_224": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                 "timm:resnet18": "resnet18.a1_in1k"}  # timm's pretrained weights of each backbone


def pretrain(stages: Stages, name: str, run: Path, data: Path, a: argparse.Namespace, extra: list[str]) -> None:
    def go():
        if (run / "run.json").exists() and json.loads((run / "run.json").read_text()).get("status") == "finished":
            return {"note": "finished earlier"}
        backbone = ["--backbone", a.backbone] if a.backbone else []
        return sslkit_pretrain(run, ["--task", a.task, "--data", f"folder:{data}", *backbone,
                                     "--image-size", str(a.image_size), "--batch-size", "128", "--channels", "1",
                                     "--max-steps", str(a.steps), "--epochs", "100", "--seed", str(a.seed),
                                     "--quiet", *extra])
    stages.run(name, go)


def curve(stages: Stages, name: str, run: Path, data: Path, out: Path, fractions: str) -> dict:
    def go():
        cmd = [sys.executable, "-m", "sslkit", "eval", "curve", str(run), "--data", f"folder:{data}",
               "--split", "group:5", "--group-pattern", PATIENT, "--fractions", fractions, "--out", str(out),
               "--overwrite", "--json", "--quiet"]
        print("  $ " + " ".join(cmd[2:]), flush=True)
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return stages.run(name, go)


def imagenet_file(work: Path, backbone: str) -> Path | None:
    """timm's ImageNet weights of ``backbone`` as a local file, from the Hugging Face cache only."""
    tag = IMAGENET_TAGS.get(backbone)
    if tag is None:
        print(f"skip: no ImageNet tag known for {backbone} (known: {', '.join(IMAGENET_TAGS)})", flush=True)
        return None
    out = work / f"imagenet-{tag}.safetensors"
    if out.exists():
        return out
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import timm
        from safetensors.torch import save_file

        model = timm.create_model(tag, pretrained=True, num_classes=0)
    except Exception as exc:  # not cached, offline
        print(f"skip: no ImageNet weights for {tag} in the local Hugging Face cache "
              f"({type(exc).__name__}); the --init comparison needs them", flush=True)
        return None
    save_file(model.state_dict(), str(out))
    return out


def rows(report: dict, tag: str) -> list[str]:
    out = []
    fr = report["settings"]["fractions"]
    for enc, res in report["results"].items():
        cells = []
        for f in fr:
            for probe in ("linear", f"k={report['settings']['k']}"):
                m = res[f"{probe} f={f:g}"]
                cells.append(f"{m['auroc']:.3f} ± {m['std']['auroc']:.3f}")
        n = [res[f"linear f={f:g}"]["train_labels"] for f in fr]
        out.append(f"| {tag}{enc} | " + " | ".join(cells) + " | " + ", ".join(f"{x:.0f}" for x in n) + " |")
    return out


def deltas(report: dict, tag: str, base: str = "random") -> list[str]:
    """Per-fold paired ``ENC - base`` AUROC at each fraction: mean ± std over folds (folds better);
    against ``init``, the pretrained encoder only."""
    import numpy as np

    out, fr, res = [], report["settings"]["fractions"], report["results"]
    if base not in res:
        return out
    for enc in [e for e in res if e != base] if base == "random" else ["pretrained"]:
        cells = []
        for f in fr:
            for probe in ("linear", f"k={report['settings']['k']}"):
                a, b = (np.array([m["auroc"] for m in res[e][f"{probe} f={f:g}"]["folds"]]) for e in (enc, base))
                d = a - b
                cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} ({(d > 0).sum()}/{len(d)})")
        out.append(f"| {tag}{enc} − {base} | " + " | ".join(cells) + " |")
    return out


def init_record(init: str | None) -> str:
    """What the init run continues from, as recorded: ``imagenet`` (timm's weights of the backbone), or
    the ``--init`` source (a path resolved)."""
    if init is None:
        return "imagenet"
    return str(Path(init).resolve()) if Path(init).exists() else init


def check_curve_settings(stages: Stages, a: argparse.Namespace, data: Path) -> dict:
    """The stage names carry only the task: the rest of a task's settings (steps, seed, size, backbone,
    fractions, the data: the train/ folder read and its file count), one set per work dir, recorded on the first run
    and another set refused in one line (``check_settings``). The init run's source is added when it
    runs; a record of one that never ran (an ``--init-imagenet`` stage skipped for want of cached
    weights, recorded so before) is dropped."""
    key = f"settings-{a.task}"
    stored = stages.state.get(key)
    if stored and "init" in stored and f"pretrain-{a.task}-init" not in stages.state:
        stored = {k: v for k, v in stored.items() if k != "init"}
    return check_settings(stages, key, {"steps": a.steps, "seed": a.seed, "image_size": a.image_size,
                                        "backbone": a.backbone, "fractions": a.fractions,
                                        **data_settings("data_dir", data)}, stored=stored)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None, help="Already extracted data (holds train/).")
    p.add_argument("--task", default="vicreg", help="pretext task (its defaults); the README's curve: vicreg")
    p.add_argument("--backbone", default=None, help="default: the task's default backbone")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0, help="pretraining seed (the folds stay those of seed 0)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--fractions", default="0.01,0.1,1")
    p.add_argument("--init-imagenet", action="store_true")
    p.add_argument("--init", default=None, help="Also continue pretraining from these weights (any --init source).")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    stages = Stages(a.work)
    root = data_folder("--data-dir", a.data_dir, XRAY_ARCHIVE, a.work / "data")
    data = root / "train"
    t = a.task
    check_curve_settings(stages, a, data)
    pretrain(stages, f"pretrain-{t}", a.work / t, data, a, [])
    reports = [("", curve(stages, f"curve-{t}", a.work / t, data, a.work / f"{t}-curve.png", a.fractions))]
    if a.init_imagenet or a.init:
        weights = a.init or imagenet_file(a.work, a.backbone or json.loads((a.work / t / "run.json").read_text())
                                          ["backbone"])
        if weights is not None:  # recorded once it runs (a later run may add it; a skipped one is not recorded)
            check_settings(stages, f"settings-{t}", {"init": init_record(a.init)})
            pretrain(stages, f"pretrain-{t}-init", a.work / f"{t}-init", data, a, ["--init", str(weights)])
            reports.append(("init run: ", curve(stages, f"curve-{t}-init", a.work / f"{t}-init", data,
                                                a.work / f"{t}-init-curve.png", a.fractions)))
    fr = reports[0][1]["settings"]["fractions"]
    head = "| encoder | " + " | ".join(f"{pr} AUROC @ {f:g}" for f in fr for pr in ("linear", "kNN")) + \
        " | labels per fold |"
    lines = [head, "| --- |" + " ---: |" * (2 * len(fr)) + " --- |"]
    for tag, rep in reports:
        lines += rows(rep, tag)
    lines += ["", "Paired per fold (mean ± std over folds, folds better):", "",
              "| difference | " + " | ".join(f"{pr} Δ AUROC @ {f:g}" for f in fr for pr in ("linear", "kNN")) + " |",
              "| --- |" + " ---: |" * (2 * len(fr))]
    for tag, rep in reports:
        lines += deltas(rep, tag) + (deltas(rep, tag, "init") if "init" in rep["results"] else [])
    text = "\n".join(lines)
    (a.work / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
