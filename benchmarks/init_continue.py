"""Continued pretraining from ``--init`` must not fall below its init (issue #15).

1. ImageNet weights: timm's ``vit_tiny_patch16_224.augreg_in21k_ft_in1k`` from the local
   Hugging Face cache only (offline); without them this stage prints one ``skip:`` line.
2. The stand-in "public weights" (another domain, as ImageNet is for X-rays): an sslkit
   MAE, ViT-Tiny, 3 channels, 64 px, pretrained on a CIFAR-10 subset (500 images per class,
   upsampled from 32 px) for ``--init-steps`` steps.
3. Continued MAE pretraining on the chest X-rays (1 channel, 64 px, as label_curve.py) from
   those weights, old recipe (encoder only, full LR, no freeze) vs the new ``--init``
   defaults and one variant per default (to choose them): LR scale 1 / 0.1, freeze 0 /
   default, task parts restored or not, LR scale 0.3 / 0.03, layer decay 0.75.
4. In domain: an X-ray MAE run, then continued from it (old recipe vs new defaults).

Every encoder is then scored on the 5216 labelled X-rays by a linear probe and kNN
(k=20) with patient-grouped 5-fold cross-validation at 1 %, 10 % and 100 % of each fold's
training labels (``sslkit eval curve``'s code: the same folds, label subsets and probes),
AUROC for PNEUMONIA; the continued runs are compared with their init fold by fold.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/init_continue.py --work /tmp/sslkit-runs/init-continue \\
        [--data-dir /tmp/sslkit-data] [--init-steps 300] [--steps 150] [--only NAME,...]

Resumable: finished stages are skipped (``WORK/state.json``); an interrupted pretraining
continues with ``--resume``. Prints markdown tables (also ``WORK/results.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stages, cpu_seconds, link_split, sslkit_pretrain  # noqa: E402
from label_curve import IMAGENET_TAG, PATIENT, imagenet_file  # noqa: E402

BACKBONE = "timm:vit_tiny_patch16_224"
FRACTIONS = (0.01, 0.1, 1.0)
K = 20
# name -> (init: "cifar" | "cifar-encoder" | "xray" | "xray-encoder", extra pretrain flags)
# "*-encoder" passes encoder.safetensors alone (no task parts); the others the run directory.
CONTINUED = {
    "cifar>old": ("cifar-encoder", ["--init-lr-scale", "1", "--init-freeze-steps", "0"]),
    "cifar>new": ("cifar", []),
    "cifar>new,scale1": ("cifar", ["--init-lr-scale", "1"]),
    "cifar>new,freeze0": ("cifar", ["--init-freeze-steps", "0"]),
    "cifar>new,no-parts": ("cifar-encoder", []),
    "cifar>new,no-parts,freeze0": ("cifar-encoder", ["--init-freeze-steps", "0"]),
    "cifar>new,scale0.3": ("cifar", ["--init-lr-scale", "0.3"]),
    "cifar>new,scale0.03": ("cifar", ["--init-lr-scale", "0.03"]),
    "cifar>new,ld0.75": ("cifar", ["--layer-decay", "0.75"]),
    "xray>old": ("xray-encoder", ["--init-lr-scale", "1", "--init-freeze-steps", "0"]),
    "xray>new": ("xray", []),
}


def cifar_subset(root: Path, work: Path, per_class: int) -> Path:
    files = {c.name: sorted(c.glob("*.jpg"))[:per_class] for c in sorted((root / "cifar" / "train").iterdir())
             if c.is_dir()}
    return link_split(files, work / f"cifar-{per_class}")


def pretrain(stages: Stages, name: str, run: Path, data: Path, steps: int, channels: int, extra: list[str]) -> dict:
    def go():
        if (run / "run.json").exists() and json.loads((run / "run.json").read_text()).get("status") == "finished":
            return {"note": "finished earlier"}
        return sslkit_pretrain(run, ["--task", "mae", "--data", f"folder:{data}", "--backbone", BACKBONE,
                                     "--image-size", "64", "--batch-size", "64", "--channels", str(channels),
                                     "--max-steps", str(steps), "--epochs", "1000", "--quiet", *extra])
    return stages.run(f"pretrain {name}", go)


def embed_runs(runs: dict[str, Path], data: Path) -> tuple[dict, object]:
    """One pass over ``data``: every run's encoder, plus the first run's init and a random
    encoder (``sslkit.eval.features.embed_all`` for several runs of one input spec)."""
    import numpy as np

    from sslkit import embed as embed_mod
    from sslkit.eval.features import Embeddings, _encoders, open_model

    first_name = next(iter(runs))
    first = open_model(runs[first_name], "cpu")
    named = _encoders(first, baseline=True)
    models = {"random": named["random"], "init": named["init"], first_name: named["pretrained"]}
    for name, run in runs.items():
        if name != first_name:
            m = open_model(run, "cpu")
            assert m.spec == first.spec, f"{name}: another input spec than {first_name}"
            models[name] = m.pretrained
    dims: list[int] = []

    def encode(unit):
        parts = [m.encode(unit) for m in models.values()]
        dims[:] = [p.shape[1] for p in parts]
        return np.concatenate(parts, 1)

    base = named["pretrained"]
    both = embed_mod.Model(base.spec, base.source_options, encode, base.engine, base.fixed_options, base.inexact)
    emb = embed_mod.embed(both, f"folder:{data}", 128, None, False)
    out, start = {}, 0
    for name, d in zip(models, dims):
        out[name] = Embeddings(np.ascontiguousarray(emb.embeddings[:, start:start + d]), emb.ids, emb.labels,
                               emb.skipped)
        start += d
    return out, first


def score(runs: dict[str, Path], data: Path) -> dict:
    """Patient-grouped 5-fold linear and kNN AUROC at FRACTIONS for every encoder (per fold too)."""
    import numpy as np

    from sslkit.eval.curve import curve_results
    from sslkit.eval.labels import assign_labels, class_index, select_labelled
    from sslkit.eval.probes import ProbeData
    from sslkit.eval.split import group_folds, group_keys

    embs, model = embed_runs(runs, data)
    sets = {}
    for name, e in embs.items():
        lab = select_labelled(e.embeddings, assign_labels(e.ids, e.labels, None), "--data", str(data), False, e.ids)
        sets[name] = (lab, lab)
    lab = next(iter(sets.values()))[0]
    classes, positive = class_index(lab.labels, lab.labels, None)
    groups = group_keys(lab.ids, {}, "source", PATIENT)
    folds = group_folds(np.array([classes.index(c) for c in lab.labels]), groups, 5, 0)
    first = next(n for n in runs)  # curve_results cuts label subsets by the "pretrained" set
    sets = {("pretrained" if n == first else n): v for n, v in sets.items()}
    prep = ProbeData(model, sets, classes, positive, folds, len(set(groups)))
    results = curve_results(prep, FRACTIONS, k=K)
    return {(first if n == "pretrained" else n): v for n, v in results.items()}


def cell(res: dict, key: str) -> str:
    return f"{res[key]['auroc']:.3f} ± {res[key]['std']['auroc']:.3f}"


def delta(res: dict, base: dict, key: str) -> str:
    import numpy as np

    d = np.array([a["auroc"] - b["auroc"] for a, b in zip(res[key]["folds"], base[key]["folds"])])
    return f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} ({int((d > 0).sum())}/{len(d)})"


def tables(results: dict, runs_info: dict) -> str:
    keys = [(f"linear f={f:g}", f"lin {f:g}") for f in FRACTIONS] + [(f"k={K} f={f:g}", f"kNN {f:g}") for f in FRACTIONS]
    lines = ["| encoder | " + " | ".join(h for _, h in keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(res, k) for k, _ in keys) + " |")
    lines += ["", "Paired per-fold difference continued − its init (folds better):", "",
              "| run | " + " | ".join(h for _, h in keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for name, res in results.items():
        base = {"cifar": "init", "xray": "xray"}.get(name.split(">")[0]) if ">" in name else None
        if base and base in results:
            lines.append(f"| {name} − {base} | " + " | ".join(delta(res, results[base], k) for k, _ in keys) + " |")
    lines += ["", "| run | pretrain CPU s | wall s | --init settings (run.json) |", "| --- | ---: | ---: | --- |"]
    for name, info in runs_info.items():
        lines.append(f"| {name} | {info.get('cpu_s', '')} | {info.get('wall_s', '')} | {info.get('init', '')} |")
    return "\n".join(lines)


def init_settings(run: Path) -> str:
    rec = json.loads((run / "run.json").read_text()).get("init") or {}
    c, parts = rec.get("continue") or {}, rec.get("task_parts") or {}
    restored = f"{parts.get('tensors', 0)} task tensors" if parts.get("restored") else "no task parts"
    return (f"{restored}; encoder LR x{c.get('encoder_lr_scale')}, freeze {c.get('freeze_steps')} steps"
            + (f", layer decay {c['layer_decay']}" if c.get("layer_decay") else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/sslkit-data"))
    p.add_argument("--init-steps", type=int, default=300, help="CIFAR-10 MAE steps (batch 64)")
    p.add_argument("--steps", type=int, default=150, help="X-ray MAE steps of every other run (batch 64)")
    p.add_argument("--per-class", type=int, default=500, help="CIFAR-10 images per class")
    p.add_argument("--only", default=None, help="Comma-separated continued runs (default: all)")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0, c0 = time.time(), cpu_seconds() + cpu_seconds(children=True)
    stages = Stages(a.work)
    xray = a.data_dir / "train"
    if imagenet_file(a.work) is not None:
        print(f"note: {IMAGENET_TAG} is cached; add it as an init with --init in label_curve.py", flush=True)
    info = {"cifar": pretrain(stages, "cifar", a.work / "cifar", cifar_subset(a.data_dir, a.work, a.per_class),
                              a.init_steps, 3, [])}
    info["xray"] = pretrain(stages, "xray", a.work / "xray", xray, a.steps, 1, [])
    chosen = [n for n in CONTINUED if a.only is None or n in a.only.split(",")]
    for name in chosen:
        src, extra = CONTINUED[name]
        init = a.work / src.split("-")[0]
        init_arg = init / "encoder.safetensors" if src.endswith("-encoder") else init
        run = a.work / name.replace(">", "-to-").replace(",", "_")
        info[name] = {**pretrain(stages, name, run, xray, a.steps, 1, ["--init", str(init_arg), *extra]),
                      "init": init_settings(run)}
    runs = {n: a.work / n.replace(">", "-to-").replace(",", "_") for n in chosen}
    runs["xray"] = a.work / "xray"
    # the first run's "init" encoder is the CIFAR weights fitted to 1 channel (the curve's init row)
    first = next((n for n in chosen if n.startswith("cifar")), None)
    order = ([first] if first else []) + [n for n in runs if n != first]
    results = stages.run("score " + ",".join(order), lambda: score({n: runs[n] for n in order}, xray))
    results = {k: results[k] for k in ["init", "random", *order] if k in results}
    text = tables(results, info)
    (a.work / "results.md").write_text(text + "\n")
    print(text)
    print(f"\ntotal: {time.time() - t0:.0f} s wall, {cpu_seconds() + cpu_seconds(children=True) - c0:.0f} s CPU "
          f"(this session)", flush=True)


if __name__ == "__main__":
    main()
