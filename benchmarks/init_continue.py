"""Continued pretraining from ``--init`` must not fall below its init (issue #15).

1. ImageNet weights: timm's ``vit_tiny_patch16_224.augreg_in21k_ft_in1k`` from the local
   Hugging Face cache only (offline); without them this stage prints one ``skip:`` line.
2. The stand-in "public weights" (another domain, as ImageNet is for X-rays): an sslkit
   MAE, ViT-Tiny, 3 channels, 64 px, pretrained on a CIFAR-10 subset (500 images per class,
   upsampled from 32 px) for ``--init-steps`` steps.
3. Continued MAE pretraining on the chest X-rays (1 channel, 64 px, as label_curve.py) from
   those weights, old recipe (encoder only, full LR, no freeze) vs the new ``--init``
   defaults and one variant per default (to choose them): LR scale 1 / 0.1, freeze 0 /
   default, task parts restored or not, LR scale 0.3 / 0.03 / 0.01, layer decay 0.75.
4. In domain: an X-ray MAE run, then continued from it (old recipe vs new defaults, LR
   scale 0.03 / 0.01).

Every encoder is then scored on the 5216 labelled X-rays by a linear probe and kNN
(k=20) with patient-grouped 5-fold cross-validation at 1 %, 10 % and 100 % of each fold's
training labels (``sslkit eval curve``'s code: the same folds, label subsets and probes),
AUROC for PNEUMONIA; the continued runs are compared with their init fold by fold.

5. Longer continued runs (``--steps 150,600``: each continued run once per budget, named
   ``NAME@STEPS`` unless 150; the inits keep their own budgets) and, with ``--average
   ALPHA,...``, weight-space averages of each finished continued encoder with its init
   (WiSE-FT: ``alpha * continued + (1 - alpha) * init``, computed here, rows ``NAME~ALPHA``).
   ``NAME,seed1`` repeats a run with another training seed. ``--draws N``: each fold's score
   is the mean over N label subsets (and the linear probe's validation splits), the same for
   every encoder: one draw's linear AUROC at 10 % of the labels moves by ~0.002 between draws.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/init_continue.py --work /tmp/sslkit-runs/init-continue \\
        [--data-dir /tmp/sslkit-data] [--init-steps 300] [--xray-init-steps 150] [--steps 150[,600...]] \\
        [--only NAME ...] [--average ALPHA,...] [--draws N]

``--data-dir`` holds ``cifar/train/`` and ``train/`` (default: ``../shared/data``'s two archives,
extracted into ``WORK/data-cifar`` and ``WORK/data-xray`` once).

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
from _common import Stages, check_settings, cpu_seconds, sslkit_pretrain  # noqa: E402
from _data import CIFAR_ARCHIVE, XRAY_ARCHIVE, data_folder, data_settings, link_split  # noqa: E402
from label_curve import IMAGENET_TAGS, PATIENT, imagenet_file  # noqa: E402

BACKBONE = "timm:vit_tiny_patch16_224"
FRACTIONS = (0.01, 0.1, 1.0)
K = 20
STEPS = 150  # of a continued run unless --steps says otherwise
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
    "cifar>new,scale0.01": ("cifar", ["--init-lr-scale", "0.01"]),
    "cifar>new,ld0.75": ("cifar", ["--layer-decay", "0.75"]),
    "xray>old": ("xray-encoder", ["--init-lr-scale", "1", "--init-freeze-steps", "0"]),
    "xray>new": ("xray", []),
    "xray>new,scale0.03": ("xray", ["--init-lr-scale", "0.03"]),
    "xray>new,scale0.01": ("xray", ["--init-lr-scale", "0.01"]),
    "cifar>new,seed1": ("cifar", ["--seed", "1"]),  # replicates: another training seed
    "xray>new,seed1": ("xray", ["--seed", "1"]),
    "cifar>new,scale0.01,seed1": ("cifar", ["--init-lr-scale", "0.01", "--seed", "1"]),
    "xray>new,scale0.03,seed1": ("xray", ["--init-lr-scale", "0.03", "--seed", "1"]),
}


def cifar_subset(root: Path, work: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class of ``root/train`` (CIFAR-10), as links in ``work``."""
    files = {c.name: sorted(c.glob("*.jpg"))[:per_class] for c in sorted((root / "train").iterdir())
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


def averaged(m, alpha: float):
    """Run ``m``'s encoder averaged with its ``--init`` weights in weight space (WiSE-FT):
    ``alpha * continued + (1 - alpha) * init`` for every floating-point tensor."""
    from sslkit import embed as embed_mod

    init, enc = m.build_init_encoder(), m.run.build_encoder()
    assert init is not None, f"{m.path}: its init weights cannot be rebuilt"
    w0 = init.state_dict()
    enc.load_state_dict({k: alpha * v + (1 - alpha) * w0[k] if v.is_floating_point() else v
                         for k, v in enc.state_dict().items()})
    p = m.pretrained
    return embed_mod.Model(m.spec, p.source_options, embed_mod.torch_encode(enc, m.spec, m.device), "torch",
                           p.fixed_options, max_pixels=p.max_pixels)


def embed_runs(runs: dict[str, Path], data: Path, alphas: tuple[float, ...] = ()) -> tuple[dict, object]:
    """One pass over ``data``: every run's encoder, plus the first run's init and a random
    encoder (``sslkit.eval.features.embed_all`` for several runs of one input spec), and
    each continued run averaged with its init at every ``alphas`` (``NAME~ALPHA``)."""
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
        if ">" in name:
            for alpha in alphas:
                models[f"{name}~{alpha:g}"] = averaged(first if name == first_name else m, alpha)
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


def score(runs: dict[str, Path], data: Path, alphas: tuple[float, ...] = (), draws: int = 1) -> dict:
    """Patient-grouped 5-fold linear and kNN AUROC at FRACTIONS for every encoder (per fold too);
    with ``draws`` > 1 each fold's score is the mean over that many label subsets and
    validation splits (``curve_results`` seeds 0 .. draws - 1), the same draws for every encoder."""
    import numpy as np

    from sslkit.eval.curve import curve_results
    from sslkit.eval.labels import assign_labels, class_index, select_labelled
    from sslkit.eval.probes import ProbeData
    from sslkit.eval.split import group_folds, group_keys

    embs, model = embed_runs(runs, data, alphas)
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
    results = pooled([curve_results(prep, FRACTIONS, k=K, seed=seed) for seed in range(draws)])
    return {(first if n == "pretrained" else n): v for n, v in results.items()}


def pooled(per_seed: list[dict]) -> dict:
    """Per encoder and setting: each fold's AUROC averaged over the seeds, then mean ± std over folds."""
    import numpy as np

    from sslkit.eval.split import mean_std

    if len(per_seed) == 1:
        return per_seed[0]
    out: dict = {}
    for enc, settings in per_seed[0].items():
        for key, agg in settings.items():
            folds = [{"n": f["n"], "auroc": float(np.mean([r[enc][key]["folds"][i]["auroc"] for r in per_seed]))}
                     for i, f in enumerate(agg["folds"])]
            out.setdefault(enc, {})[key] = mean_std(folds)
    return out


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
    p.add_argument("--data-dir", type=Path, default=None,
                   help="holds cifar/train/<class>/ and train/NORMAL|PNEUMONIA/ (default: the archives in "
                        "../shared/data, extracted into --work)")
    p.add_argument("--init-steps", type=int, default=300, help="CIFAR-10 MAE steps (batch 64)")
    p.add_argument("--xray-init-steps", type=int, default=STEPS, help="steps of the in-domain X-ray MAE init")
    p.add_argument("--steps", default=str(STEPS),
                   help=f"comma-separated X-ray MAE steps of every continued run (batch 64); runs of other than "
                        f"{STEPS} are named NAME@STEPS")
    p.add_argument("--average", default="", help="comma-separated alphas: also score alpha * continued + "
                                                 "(1 - alpha) * init of every continued run (NAME~ALPHA)")
    p.add_argument("--per-class", type=int, default=500, help="CIFAR-10 images per class")
    p.add_argument("--draws", type=int, default=1, help="label subsets (and probe validation splits) per fold; "
                                                        "a fold's score is their mean")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help=f"continued runs to pretrain and score (default: all): {' '.join(CONTINUED)}")
    a = p.parse_args()
    if a.only and set(a.only) - set(CONTINUED):
        p.error(f"--only: unknown run {sorted(set(a.only) - set(CONTINUED))[0]!r}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0, c0 = time.time(), cpu_seconds() + cpu_seconds(children=True)
    stages = Stages(a.work)
    cifar_root = data_folder("--data-dir", a.data_dir and a.data_dir / "cifar", CIFAR_ARCHIVE, a.work / "data-cifar")
    xray = data_folder("--data-dir", a.data_dir, XRAY_ARCHIVE, a.work / "data-xray") / "train"
    # the init runs' stage names carry neither their steps nor the CIFAR-10 subset nor the data: one set per work dir
    check_settings(stages, "settings", {"init_steps": a.init_steps, "xray_init_steps": a.xray_init_steps,
                                        "per_class": a.per_class, **data_settings("cifar", cifar_root),
                                        **data_settings("xray", xray)})
    if imagenet_file(a.work, BACKBONE) is not None:
        print(f"note: {IMAGENET_TAGS[BACKBONE]} is cached; add it as an init with --init in label_curve.py",
              flush=True)
    info = {"cifar": pretrain(stages, "cifar", a.work / "cifar", cifar_subset(cifar_root, a.work, a.per_class),
                              a.init_steps, 3, [])}
    info["xray"] = pretrain(stages, "xray", a.work / "xray", xray, a.xray_init_steps, 1, [])
    alphas = tuple(float(x) for x in a.average.split(",") if x)
    chosen = [(n if steps == STEPS else f"{n}@{steps}", n, steps) for steps in (int(x) for x in a.steps.split(","))
              for n in CONTINUED if a.only is None or n in a.only]
    runs = {}
    for name, base, steps in chosen:
        src, extra = CONTINUED[base]
        init = a.work / src.split("-")[0]
        init_arg = init / "encoder.safetensors" if src.endswith("-encoder") else init
        runs[name] = a.work / name.replace(">", "-to-").replace(",", "_").replace("@", "-steps")
        info[name] = {**pretrain(stages, name, runs[name], xray, steps, 1, ["--init", str(init_arg), *extra]),
                      "init": init_settings(runs[name])}
    runs["xray"] = a.work / "xray"
    # the first run's "init" encoder is the CIFAR weights fitted to 1 channel (the curve's init row)
    first = next((n for n in runs if n.startswith("cifar")), None)
    order = ([first] if first else []) + [n for n in runs if n != first]
    key = ("score " + ",".join(order) + (f" average {','.join(f'{x:g}' for x in alphas)}" if alphas else "")
           + (f" draws {a.draws}" if a.draws > 1 else ""))
    results = stages.run(key, lambda: score({n: runs[n] for n in order}, xray, alphas, a.draws))
    results = {k: results[k] for k in ["init", "random", *order] if k in results} | {
        k: v for k, v in results.items() if "~" in k}
    text = tables(results, info)
    (a.work / "results.md").write_text(text + "\n")
    print(text)
    print(f"\ntotal: {time.time() - t0:.0f} s wall, {cpu_seconds() + cpu_seconds(children=True) - c0:.0f} s CPU "
          f"(this session)", flush=True)


if __name__ == "__main__":
    main()
