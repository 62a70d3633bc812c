"""Grouped k-fold evaluation on one labelled folder: no patient on both sides of a fold.

``--split group:K`` cuts the labelled samples into ``K`` folds with scikit-learn's
``StratifiedGroupKFold`` (class proportions kept as far as whole groups allow; plain
``GroupKFold`` when a class has fewer groups than folds; both shuffled by ``--seed``). A
sample's group is, in order:

* ``--group-pattern REGEX``: searched in the file name (first capture group, else the
  whole match; no match: the file is its own group, noted; a pattern that matches no file
  is refused), e.g. ``'^(person\\d+|IM-\\d+)'``;
* ``--group-by folder``: the folder the file is in;
* ``--group-by source`` (default): the group the source gives (DICOM: a salted hash of
  the PatientID, else the study; folders: ``--data-opt group=REGEX`` on the relative
  path, else the file).

Group keys say where they come from: ``p:`` a pattern's match, ``d:`` a folder, ``f:`` the file
itself (no pattern match, or a source that groups nothing, as a plain image folder); when every
group is a file's own
(``f:``), :func:`file_groups_note` says so on stderr and in the report, naming the remedies: a
patient's images can lie on both sides of a fold. Where a key came from decides, not how many
files its group holds: a source's patients of one file each (a DICOM export) are real groups.
(NIfTI's per-file groups are a hash of the path below the data root without ``f:``, as its
``--val-fraction`` splits use: its split gets no note.)

Each fold's metrics are computed as for ``--train/--test``; the report gives their mean
and standard deviation (``ddof=1``) and every fold's numbers.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import PurePath
from typing import Any, Sequence

import numpy as np

from sslkit.errors import UsageError, printable

GROUP_BY = ("source", "folder")
METRICS = ("top1", "balanced_accuracy", "auroc")


def parse_split(text: str) -> int:
    """``"group:K"`` -> ``K`` (>= 2)."""
    kind, _, k = text.partition(":")
    if kind != "group" or not k.isdigit() or int(k) < 2:
        raise UsageError(f"--split expects group:K with K >= 2 folds, e.g. group:5; got {text!r}")
    return int(k)


def compile_pattern(pattern: str | None) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--group-pattern {pattern!r} is not a valid regular expression: {exc}") from None


def group_keys(ids: Sequence[str], source_groups: dict[str, str], group_by: str = "source",
               pattern: str | None = None) -> list[str]:
    """The split group of every sample id (see the module docstring for the order). A pattern
    that matches no file name is refused (every image would be its own group: a patient's
    images on both sides of a fold); one that matches only some is noted on stderr."""
    rx = compile_pattern(pattern)
    if group_by not in GROUP_BY:
        raise UsageError(f"--group-by must be one of {', '.join(GROUP_BY)}; got {group_by!r}")
    if rx is not None and group_by == "folder":
        raise UsageError("--group-pattern and --group-by folder both choose the split groups; give one")
    out = []
    unmatched: list[str] = []
    for sid in ids:
        path = sid.partition("#")[0]
        if rx is not None:
            m = rx.search(PurePath(path).name)
            if m is None:
                unmatched.append(PurePath(path).name)
            out.append("p:" + (m.group(1) if m.groups() and m.group(1) is not None else m.group(0))
                       if m else "f:" + path)
        elif group_by == "folder":
            out.append("d:" + str(PurePath(path).parent))
        else:
            out.append(source_groups.get(sid) or "f:" + path)
    if unmatched and ids:
        _unmatched_pattern(pattern, unmatched, len(ids))
    if rx is not None or group_by == "folder":
        out = _joined(out, [source_groups.get(sid) for sid in ids], "--group-pattern" if rx else "--group-by folder")
    return out


def _joined(keys: list[str], patients: list[str | None], flag: str) -> list[str]:
    """``keys`` with every two that share a source group (the DICOM patient key) made one, so a patient's
    images never lie on both sides of a fold whatever the pattern says; noted on stderr when any do."""
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for key, patient in zip(keys, patients):
        if patient:
            parent[find(key)] = find("s:" + patient)
    joined = [find(k) for k in keys]
    before, after = len(set(keys)), len(set(joined))
    if after < before:
        print(f"sslkit: note: {flag}: {before} groups joined into {after}, where the source's own groups "
              "(patients) span several, so no patient is on both sides of a fold", file=sys.stderr)
    return joined


def _unmatched_pattern(pattern: str | None, unmatched: list[str], n: int) -> None:
    """Refuse a ``--group-pattern`` that matches no file name; note one that misses some."""
    example = printable(unmatched[0])
    if len(unmatched) == n:
        raise UsageError(f"--group-pattern {pattern!r} matches none of the {n} file names (e.g. {example!r}), "
                         "so every image would be its own group; fix the pattern (it is searched in the file "
                         "name, not the folders)")
    print(f"sslkit: note: --group-pattern {pattern!r} matches {n - len(unmatched)} of {n} file names; the "
          f"{len(unmatched)} others (e.g. {example!r}) are each their own group", file=sys.stderr)


def file_groups_note(groups: Sequence[str], k: int) -> str | None:
    """A note (printed on stderr, returned for the report) when every one of ``groups`` (the labelled
    samples' keys) is a file's own (``f:``, from :func:`group_keys`):
    nothing grouped the files, so a patient's images can be on both sides of a fold. None when any
    group came from a pattern, a folder or the source's patients."""
    if not groups or not all(g.startswith("f:") for g in groups):
        return None
    note = (f"--split group:{k}: each of the {len(set(groups))} groups is a single file (nothing grouped them), so a "
            "patient's images can lie on both sides of a fold; group them with --group-pattern REGEX (file name), "
            "--group-by folder, or, in an image folder, --data-opt group=REGEX (relative path)")
    print(f"sslkit: note: {note}", file=sys.stderr)
    return note


STRATIFIED, UNSTRATIFIED = "StratifiedGroupKFold (shuffled)", "GroupKFold (shuffled; a class has fewer groups than folds)"


def fold_method(y: np.ndarray, groups: Sequence[str], k: int) -> str:
    """How :func:`group_folds` splits: stratified by class when every class has at least ``k``
    groups, else by groups alone."""
    per_class = min(len({g for g, c in zip(groups, y) if c == cls}) for cls in np.unique(y))
    return STRATIFIED if per_class >= k else UNSTRATIFIED


def group_folds(y: np.ndarray, groups: Sequence[str], k: int, seed: int = 0,
                classes: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``K`` pairs ``(train_idx, test_idx)``; every group is in exactly one test fold, and every
    class of ``y`` (named by ``classes``) is in every fold's training part, else a one-line
    :class:`UsageError` (a probe cannot be fitted without a class it is scored on)."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_groups = len(set(groups))
    if n_groups < k:
        raise UsageError(f"--split group:{k} needs at least {k} groups (patients); the labelled data has "
                         f"{n_groups}: lower K or check --group-pattern / --group-by")
    x = np.zeros((len(y), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        if fold_method(y, groups, k) == STRATIFIED:
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            folds = list(splitter.split(x, y, groups))
        else:
            folds = list(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y, groups))
    folds = [(np.sort(tr), np.sort(te)) for tr, te in folds]
    _check_classes_in_training(y, groups, k, folds, classes)
    return folds


def _check_classes_in_training(y: np.ndarray, groups: Sequence[str], k: int,
                               folds: list[tuple[np.ndarray, np.ndarray]], classes: Sequence[str] | None) -> None:
    """Every class of ``y`` in every fold's training indices, else one line naming the first gap."""
    for i, (tr, _) in enumerate(folds):
        missing = sorted(set(np.unique(y).tolist()) - set(np.unique(y[tr]).tolist()))
        if missing:
            c = missing[0]
            name = classes[c] if classes is not None else c
            n_groups = len({g for g, label in zip(groups, y) if label == c})
            if n_groups < 2:
                raise UsageError(f"--split group:{k}: class {name!r} has images of one group (patient) only, so "
                                 "no grouped split has it on both sides; label images of more patients of it, or "
                                 "give --train and --test")
            raise UsageError(f"--split group:{k}: the training part of fold {i + 1} has no image of class "
                             f"{name!r} ({n_groups} groups in all); a probe needs every class in every fold: "
                             "lower K, or label images of more patients of that class")


def mean_std(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold metrics -> ``{"n", METRIC: mean, ..., "std": {METRIC: std}, "folds": per_fold}``.

    ``n`` is the number of test samples over all folds (each sample is tested once).
    Other numeric keys (``C``, ``k_used``...) are kept as the list of fold values;
    ``folds_scored`` counts the folds a metric had a value in, where some had none.
    """
    out: dict[str, Any] = {"n": int(sum(m["n"] for m in per_fold))}
    std: dict[str, float | None] = {}
    scored: dict[str, int] = {}
    for key in METRICS:
        vals = [m[key] for m in per_fold if m.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
        std[key] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        if 0 < len(vals) < len(per_fold):
            scored[key] = len(vals)  # e.g. AUROC: a test fold without the positive class has none
    out["std"] = std
    if scored:
        out["folds_scored"] = scored
    out["folds"] = [{k: v for k, v in m.items() if not isinstance(v, dict)} for m in per_fold]
    return out
