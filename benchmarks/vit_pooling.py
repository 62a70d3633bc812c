"""Class token vs mean-pooled patch tokens as a ViT's embedding, for trained and random encoders.

For each ViT run of a ``task_table.py`` work dir (``mae``, ``simmim``), CIFAR-10 weighted
kNN (k = 20) top-1 on the table's test images with its bank, pooled two ways whatever its
``run.json`` records: ``token`` (the class token after the final norm) and ``avg`` (the mean
of the normed patch tokens, as the MAE/I-JEPA papers probe: the options the backbone gives
for ``Task.embedding = "patch_mean"``, what mae runs now embed with), each for the trained
encoder and the random-init baseline of the same architecture. Gains over random with the
paired SE (same test images). Each pooling scores a copy of the run (weights linked) whose
``run.json`` asks for it.

With ``--blocks 4,8,12`` each encoder (trained and random) is also cut after those blocks
(then its final norm and the pooling): which block embeds best, as BEiT probes a middle one.

With ``--xray DIR`` the runs are the work dir's chest X-ray runs, scored as ``task_table.py``
scores them (kNN AUROC, patient-grouped 5-fold on ``DIR``); SEs over the folds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_pooling.py --work runs/bench-tasks-v2 --test test-5000 \\
        cifar-mae-default cifar-simmim-default
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_pooling.py --work runs/bench-s7 \\
        --xray runs/bench-s7/split/xray-1500 xray-mae
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_pooling.py --work runs/bench-s8 --pool avg \\
        --blocks 4,6,8,10,12 cifar-var-mae-s05 cifar-var-simmim-lr1e-4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import paired_se, refuse  # noqa: E402
from batchnorm_recompute import knn_correct, open_run, table_splits  # noqa: E402


POOLS = ("token", "avg")


def copy_with_options(run_dir: Path, options: dict, tmp: Path) -> Path:
    """A copy of ``run_dir`` in a new folder under ``tmp`` (its weights linked) with ``options``
    over its backbone options."""
    dest = Path(tempfile.mkdtemp(prefix=f"{run_dir.name}-", dir=tmp))
    info = json.loads((run_dir / "run.json").read_text())
    for holder in (info, info["config"]):  # the top-level copy is what builds the encoder
        holder["backbone_options"] = {**holder.get("backbone_options", {}), **options}
    (dest / "run.json").write_text(json.dumps(info))
    os.symlink((run_dir / "encoder.safetensors").resolve(), dest / "encoder.safetensors")
    return dest


def check_vit(run_dir: Path) -> None:
    """Refuse, in one line, a run that cannot be opened or whose encoder is not a timm ViT (the
    poolings are a ViT's options)."""
    from timm.models.vision_transformer import VisionTransformer

    run = open_run(run_dir)
    if not isinstance(getattr(run.build_encoder(False), "model", None), VisionTransformer):
        refuse(f"error: {run_dir.name}: a {run.backbone_name} run; vit_pooling.py compares a timm "
               f"ViT's class token with its mean patch token (mae, simmim runs)")


def pooled_run(run_dir: Path, pool: str, tmp: Path) -> Path:
    """A copy of ``run_dir`` whose encoder embeds its class token (``pool="token"``, the norm
    before pooling), or the mean of its normed patch tokens (``"avg"``: the options the backbone
    itself gives for ``Task.embedding = "patch_mean"``, as ``pretrain`` records them for mae)."""
    from sslkit.run import load_run

    token = copy_with_options(run_dir, {"global_pool": "token", "fc_norm": False}, tmp)
    if pool == "token":
        return token
    options = load_run(token).build_encoder(False).embedding_options("patch_mean")
    return copy_with_options(run_dir, options, tmp)


def xray_rows(work: Path, data: Path, names: list[str]) -> None:
    from task_table import xray_auroc

    print("| run | pooling | trained AUROC | random AUROC | gain (fold SE) | vs token (fold SE) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folds = {pool: xray_auroc(pooled_run(work / "runs" / name, pool, Path(tmp)), data, baseline=True, seed=0)
                     for pool in POOLS}
            token = np.array(folds["token"]["pretrained"])
            for pool, f in folds.items():
                trained, random = np.array(f["pretrained"]), np.array(f["random"])
                g, se = paired_se(trained, random)
                vs = "-" if pool == "token" else "%+.3f (%.3f)" % paired_se(trained, token)
                print(f"| {name} | {pool} | {trained.mean():.3f} | {random.mean():.3f} | {g:+.3f} ({se:.3f}) | {vs} |",
                      flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-tasks-v2"))
    ap.add_argument("--test", help="the test split's folder under WORK/split (default: the table's own)")
    ap.add_argument("--xray", type=Path, help="score X-ray runs by patient-grouped 5-fold AUROC on this folder")
    ap.add_argument("--pool", choices=POOLS, help="only this pooling (default: both)")
    ap.add_argument("--blocks", default="", help="comma-separated block counts to cut each encoder after")
    ap.add_argument("runs", nargs="+", help="run names under WORK/runs")
    a = ap.parse_args()
    for name in a.runs:
        check_vit(a.work / "runs" / name)
    if a.xray:
        return xray_rows(a.work, a.xray, a.runs)
    from sslkit.run import load_run

    splits = table_splits(a.work, a.test)
    bank, test = splits["bank"], splits["test"]
    print("| run | pooling | blocks | trained % | random % | gain (SE) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in a.runs:
        for pool in [a.pool] if a.pool else POOLS:
            with tempfile.TemporaryDirectory() as tmp:
                run = load_run(pooled_run(a.work / "runs" / name, pool, Path(tmp)))
                for k in [int(b) for b in a.blocks.split(",") if b] or [None]:
                    cells = []
                    for weights in (True, False):
                        torch.manual_seed(0)  # the same random init as task_table.py's baseline
                        encoder = run.build_encoder(weights)
                        if k is not None:
                            encoder.model.blocks = encoder.model.blocks[:k]
                        cells.append(knn_correct(encoder, run.spec, bank, test))
                    g, se = paired_se(*cells)
                    print(f"| {name} | {pool} | {k or 'all'} | {100 * cells[0].mean():.1f} | "
                          f"{100 * cells[1].mean():.1f} | {100 * g:+.1f} ({100 * se:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
