"""``sslkit eval curve``: the label-efficiency curve. At my label budget, does pretraining help?

For every label fraction ``f`` and every fold of ``--split group:K`` (or the one
``--train``/``--test`` pair), a stratified random ``f`` of the fold's training images
keeps its labels (at least :data:`MIN_PER_CLASS` per class); the linear probe and the
weighted kNN are fitted on them and scored on the whole test fold. The same subset is
used for every encoder (pretrained, random init, and the ``--init`` weights before
pretraining when the run used them), so the comparison is paired. The report gives, for
every ``(probe, fraction)``, the mean and standard deviation over folds; the PNG plots
AUROC (two classes; balanced accuracy otherwise) against the fraction, with error bars.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from sslkit.errors import UsageError
from sslkit.eval.gain import gains
from sslkit.eval.knn import TEMPERATURE
from sslkit.eval.labels import Labelled
from sslkit.eval.linear import C_GRID
from sslkit.eval.probes import (DataArgs, ProbeData, base_report, knn_results, linear_results, prepare, take_samples,
    val_split_kind)
from sslkit.eval.report import save_picture, save_report
from sslkit.eval.split import mean_std

MIN_PER_CLASS = 2


def label_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of ``y: (N,)`` (>= MIN_PER_CLASS per class, if present)."""
    if fraction >= 1:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = min(len(idx), max(MIN_PER_CLASS, int(round(fraction * len(idx)))))
        keep.append(rng.choice(idx, n, replace=False))
    return np.sort(np.concatenate(keep))


def _with_fraction(prep: ProbeData, fraction: float, seed: int) -> ProbeData:
    """The same fold, its training side cut to a stratified ``fraction`` (same subset for every encoder)."""
    tr0 = prep.sets["pretrained"][0]
    idx = label_subset(prep.indices(tr0.labels), fraction, seed)
    sets: dict[str, tuple[Labelled, Labelled]] = {e: (take_samples(tr, idx), te) for e, (tr, te) in prep.sets.items()}
    return ProbeData(prep.model, sets, prep.classes, prep.positive)


def curve_results(prep: ProbeData, fractions: Sequence[float], k: int = 20, C_grid: Sequence[float] = C_GRID,
                  val_fraction: float = 0.2, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{encoder: {"linear f=F" | "k=K f=F": mean ± std metrics + train_labels}}``; on one
    ``--train``/``--test`` split, ``prep.correct`` receives each setting's per-test-image correctness
    (for the paired gain), as from :func:`knn_results` and :func:`linear_results`.

    Fold by fold, every fraction within a fold: only one fold's copy of the embeddings
    (:meth:`ProbeData.fold`) is in memory at a time."""
    fractions = distinct_fractions([float(f) for f in fractions])  # API callers too: no name shared
    n_folds = len(prep.folds) if prep.folds is not None else 1
    runs: dict[float, list[dict[str, Any]]] = {f: [] for f in fractions}  # fraction -> one result per fold
    short: dict[float, set[tuple[str, int]]] = {f: set() for f in fractions}  # {(class, fold)} under MIN_PER_CLASS
    for i in range(n_folds):
        fold = prep.fold(i) if prep.folds is not None else prep
        for f in fractions:
            runs[f].append(_fraction_run(prep, fold, f, i, k, C_grid, val_fraction, seed, short[f]))
        del fold  # before the next fold is cut
    out: dict[str, dict[str, Any]] = {}
    for f in fractions:
        for enc in runs[f][0]:
            for setting in runs[f][0][enc]:
                agg = mean_std([r[enc][setting] for r in runs[f]])
                ns = [r[enc][setting]["train_labels"] for r in runs[f]]  # a count: an int when the folds agree
                agg["train_labels"] = ns[0] if len(set(ns)) == 1 else float(np.mean(ns))
                agg["fewest_per_class"] = min(r[enc][setting]["fewest_per_class"] for r in runs[f])
                agg["fraction"] = f
                out.setdefault(enc, {})[setting] = agg
    note_short(short, n_folds)
    return out


def _fraction_run(prep: ProbeData, fold: ProbeData, f: float, i: int, k: int, C_grid: Sequence[float],
                  val_fraction: float, seed: int, short: set[tuple[str, int]]) -> dict[str, dict[str, Any]]:
    """``{encoder: {"linear f=F": metrics, "k=K f=F": metrics}}`` of fold ``i`` with its training side
    cut to the fraction ``f`` (the subset's seed: ``seed + 1000 * i``)."""
    sub = _with_fraction(fold, f, seed + 1000 * i)
    n = len(sub.sets["pretrained"][0].labels)
    fewest = fewest_per_class(sub, short, i)
    lin = linear_results(sub, C_grid, val_fraction, seed)
    knn = knn_results(sub, [k], TEMPERATURE)
    name = fraction_name(f)
    counts = {"train_labels": n, "fewest_per_class": fewest}
    if prep.folds is None:
        prep.correct.update({(e, f"{setting} f={name}"): c for (e, setting), c in sub.correct.items()})
    return {e: {f"linear f={name}": {**lin[e]["linear"], **counts},
                f"k={k} f={name}": {**knn[e][f"k={k}"], **counts}} for e in lin}


def fewest_per_class(sub: ProbeData, short: set[tuple[str, int]], fold: int) -> int:
    """The fewest training labels any class has in ``sub``; a class under MIN_PER_CLASS (it had no
    more in the fold) is added to ``short`` as ``(class, fold)``."""
    labels = sub.sets["pretrained"][0].labels
    counts = {c: labels.count(c) for c in sub.classes}
    short.update((c, fold) for c, n in counts.items() if n < MIN_PER_CLASS)
    return min(counts.values())


def note_short(short: dict[float, set[tuple[str, int]]], n_folds: int) -> None:
    """One stderr line per fraction at which some class kept fewer than MIN_PER_CLASS training labels."""
    for f, pairs in short.items():
        if pairs:
            classes = sorted({c for c, _ in pairs})
            folds = len({i for _, i in pairs})
            print(f"sslkit: note: at f={fraction_name(f)}, class {', '.join(map(repr, classes))} had fewer than "
                  f"{MIN_PER_CLASS} training labels (all the fold had) in {folds} of {n_folds} fold(s); "
                  "its scores there rest on so few images", file=sys.stderr)


def fraction_name(f: float) -> str:
    """How a fraction is named in the report's settings (``linear f=0.1``): 6 significant digits."""
    return f"{f:g}"


def parse_fractions(text: str) -> list[float]:
    """Distinct fractions in (0, 1], sorted; two that would share a setting name (equal to 6
    significant digits, :func:`fraction_name`) are refused, so no result can replace another."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= 1 for v in values):
        raise UsageError(f"--fractions expects comma-separated fractions in (0, 1], e.g. 0.01,0.1,1; got {text!r}")
    return distinct_fractions(values)


def distinct_fractions(values: Sequence[float]) -> list[float]:
    """``values`` sorted without repeats; two that would share a setting name are one line."""
    values = sorted(set(values))
    names: dict[str, float] = {}
    for v in values:
        if (other := names.setdefault(fraction_name(v), v)) != v:
            raise UsageError(f"--fractions {other!r} and {v!r} are the same to 6 significant digits "
                             f"(both named f={fraction_name(v)} in the report): give fractions that differ there")
    return values


def evaluate_curve(model_path: str, args: DataArgs, fractions: Sequence[float], out: str | None = None,
                   overwrite: bool = False, k: int = 20, C_grid: Sequence[float] = C_GRID,
                   val_fraction: float = 0.2) -> dict[str, Any]:
    """Probe at every label fraction, plot the curve, save PNG and report (schema ``sslkit.eval/1``)."""
    from sslkit.eval.curve_plot import plot_curve
    from sslkit.eval.tsne import _check_out

    out_path = _check_out(out, overwrite)
    prep = prepare(model_path, args)
    settings = {"fractions": list(fractions), "k": k, "temperature": TEMPERATURE, "C_grid": sorted(C_grid),
                "val_fraction": val_fraction, "val_split": val_split_kind(prep), "seed": args.seed,
                "baseline": args.baseline,
                "min_labels_per_class": MIN_PER_CLASS,
                "score": "auroc" if len(prep.classes) == 2 else "balanced_accuracy"}
    report = base_report("curve", prep, args, settings)
    report["results"] = curve_results(prep, fractions, k, C_grid, val_fraction, args.seed)
    report["gain"] = gains(report["results"], prep.correct)  # per fraction: SE over folds, or paired per image
    out_path, size = save_picture(out_path, prep.model.report_dir, "curve", lambda path: plot_curve(report, path))
    report["image_size"] = list(size)
    report["files"] = [str(out_path)]
    save_report(report, prep.model.report_dir, picture=out_path, overwrite=overwrite and out is not None)
    return report
