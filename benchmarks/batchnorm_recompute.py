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
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_knn_correctness, paired_se, refuse  # noqa: E402


def table_splits(work: Path, test: str | None = None) -> dict[str, Path]:
    """The CIFAR-10 split folders (``pretrain``, ``bank``, ``test``) of a ``task_table.py`` work dir,
    named as it names them from the settings it recorded in ``WORK/state.json`` (``table-settings``:
    the image counts, and ``-seed<N>`` at the end where ``seed_in_split_names``). A kind the record
    does not give (a dir from before it) is the dir's one folder of that kind. ``test``: the test
    folder's name under ``WORK/split``, over the record. A folder not found: refused in one line."""
    from task_table import SETTINGS

    split = work / "split"
    state = work / "state.json"
    if not state.is_file() or not split.is_dir():
        refuse(f"error: {work} is not a task_table.py work dir (no state.json and split/ in it)")
    record = json.loads(state.read_text()).get(SETTINGS) or {}
    suffix = f"-seed{record.get('seed', 0)}" if record.get("seed_in_split_names") else ""
    counts = {"pretrain": "pretrain_images", "bank": "eval_train", "test": "eval_test"}
    found = {}
    for kind, key in counts.items():
        if kind == "test" and test:
            name = test
        elif key in record:
            name = f"{kind}-{record[key]}{suffix}"
        else:
            names = sorted(p.name for p in split.glob(f"{kind}-*") if p.is_dir())
            if len(names) != 1:
                hint = ": name one with --test" if kind == "test" else ""
                refuse(f"error: {split} holds {len(names)} {kind}-* folders ({', '.join(names) or 'none'}) and "
                       f"{state.name} records no {key} to choose by{hint}")
            name = names[0]
        found[kind] = split / name
        if not found[kind].is_dir():
            refuse(f"error: {found[kind]} does not exist (the {kind} images of {work}'s table)")
    return found


def open_run(run_dir: Path):
    """``sslkit.run.load_run``, a run that cannot be opened refused in one line."""
    from sslkit.errors import UsageError
    from sslkit.run import load_run

    try:
        return load_run(run_dir)
    except UsageError as exc:
        refuse(f"error: {exc}")


def knn_correct(encoder, spec, bank: Path, test: Path) -> np.ndarray:
    from sslkit.embed import Model, torch_encode

    model = Model(spec, {}, torch_encode(encoder, spec, torch.device("cpu")), "torch", {})
    return model_knn_correctness(model, bank, test).astype(float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-tasks"))
    ap.add_argument("--test", help="the test split's folder under WORK/split (default: the table's own)")
    ap.add_argument("runs", nargs="+", help="run names under WORK/runs")
    a = ap.parse_args()
    from sslkit.data.loader import BatchLoader
    from sslkit.data.pipeline import load_data
    from sslkit.engine.batchnorm import recompute_batchnorm

    splits = table_splits(a.work, a.test)
    bank, test = splits["bank"], splits["test"]
    runs = {name: open_run(a.work / "runs" / name) for name in a.runs}
    print("| run | trained % | trained + recomputed BN % | random % | random + recomputed BN % |")
    print("| --- | ---: | ---: | ---: | ---: |")
    loaders = {}  # (size, channels) -> the pretraining images decoded once for every run at that input
    for name, run in runs.items():
        shape = (run.spec.image_size, run.spec.channels)
        if shape not in loaders:
            pre = load_data(f"folder:{splits['pretrain']}", *shape, {}, progress=False)
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
