"""Frozen-feature linear probe: multinomial logistic regression (scikit-learn).

Features are standardised with the training set's mean and std. The inverse
regularisation strength ``C`` is chosen on a stratified validation split of the
training set (highest balanced accuracy, ties to the stronger regularisation: scores within
:data:`TIE` are equal, 5/7 summed two ways is one score, not two; where the
samples' groups are known and some group, a patient, holds several images, whole groups go to
one side: a patient's near-identical images on both sides made every weak ``C`` look perfect), then the
probe is refit on the whole training set with that ``C``. A validation split that lacks a
class of the training set (a few labels: at 2 + 3 images the split held one image of one
class, on which every ``C`` scored 0 or 1) chooses nothing: ``C`` is the grid's middle value
and no validation score is reported. When the best ``C`` is at an
end of the grid and beats its neighbour, the grid is extended a decade beyond that end
(twice at most), so a grid that stops too early does not silently cap the probe.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

import numpy as np

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_EXTENSIONS = 2
#: validation scores (in [0, 1]) closer than this are a tie: float rounding (0.7142857142857142 and
#: 0.7142857142857143, both 5/7), not a better ``C``; real differences of balanced accuracy are far larger
TIE = 1e-12


@dataclass
class LinearProbe:
    C: float
    val_scores: dict[float, float] = field(default_factory=dict)  # C -> validation balanced accuracy
    model: object = None  # the fitted sklearn Pipeline

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(M, D) -> (M, K)`` class probabilities (columns in class-index order)."""
        return self.model.predict_proba(x)


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int):
    """StandardScaler + LogisticRegression(C) fitted on ``x: (N, D)``, ``y: (N,)``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def validation_split(y: np.ndarray, fraction: float, seed: int,
                     groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of indices ``(train_idx, val_idx)``; every class keeps >= 1 training sample
    (per image; by group, a class found only in groups of another class's majority may not).

    With ``groups`` (the split group, e.g. the patient, of each sample) that put two or more
    samples together, whole groups go to one side (:func:`grouped_validation_split`)."""
    if groups is not None and len(set(groups)) < len(groups):
        return grouped_validation_split(y, fraction, seed, groups)
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(int(round(len(idx) * fraction)), len(idx) - 1)
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def grouped_validation_split(y: np.ndarray, fraction: float, seed: int,
                             groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)`` with every group on one side: the groups of each class (a group's
    commonest class) are shuffled and ``round(fraction * n)`` of them, at most ``n - 1``, go to
    validation, so no patient's images are on both sides of the split that chooses ``C``."""
    rng = np.random.default_rng(seed)
    names, of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    counts = np.zeros((len(names), int(y.max()) + 1), dtype=np.int64)
    np.add.at(counts, (of, y), 1)
    label = counts.argmax(1)  # ties: the lower class index
    val = np.zeros(len(names), dtype=bool)
    for c in np.unique(label):
        g = rng.permutation(np.flatnonzero(label == c))
        val[g[:min(int(round(len(g) * fraction)), len(g) - 1)]] = True
    return np.flatnonzero(~val[of]), np.flatnonzero(val[of])


def fit_linear_probe(x: np.ndarray, y: np.ndarray, n_classes: int, C_grid: Sequence[float] = C_GRID,
                     val_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0,
                     groups: Sequence[str] | None = None) -> LinearProbe:
    """Choose ``C`` on a validation split, refit on all of ``x: (N, D)``, ``y: (N,)``.

    ``y`` holds class indices in ``[0, n_classes)``; the returned probe's
    ``predict_proba`` has ``n_classes`` columns even if a class is missing from ``y``.
    ``groups`` (each sample's patient or other split group) keeps a group's samples on one
    side of the validation split.
    """
    grid = sorted(set(float(c) for c in C_grid))
    scores: dict[float, float] = {}
    tr, va = validation_split(y, val_fraction, seed, groups)
    every_class = len(np.unique(y)) > 1 and len(np.unique(y[va])) == len(np.unique(y[tr])) == len(np.unique(y))
    if len(grid) > 1 and every_class:
        for C in grid:
            scores[C] = _val_score(x, y, tr, va, C, max_iter, seed)
        for _ in range(MAX_EXTENSIONS):
            cs, best = sorted(scores), _best_c(scores)
            if best == cs[-1] and scores[best] > scores[cs[-2]] + TIE:
                beyond = best * 10
            elif best == cs[0] and scores[best] > scores[cs[1]] + TIE:
                beyond = best / 10
            else:
                break
            scores[beyond] = _val_score(x, y, tr, va, beyond, max_iter, seed)
        best = _best_c(scores)
    else:
        best = grid[len(grid) // 2]
    return LinearProbe(best, scores, _Padded(_fit(x, y, best, max_iter, seed), n_classes))


def _best_c(scores: dict[float, float]) -> float:
    """The ``C`` of the highest score; among scores within :data:`TIE` of it, the smallest ``C``
    (the stronger regularisation)."""
    top = max(scores.values())
    return min(C for C, score in scores.items() if score >= top - TIE)


def _val_score(x: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, C: float, max_iter: int,
               seed: int) -> float:
    """Balanced accuracy on ``va`` of a probe fitted on ``tr`` with this ``C``: the mean recall of the
    classes in ``y[va]`` (scikit-learn's ``balanced_accuracy_score``), summed as fractions, so equal
    scores are equal floats (recalls 4/7, 6/7 and 5/7, 5/7 both give 5/7, not ...42 and ...43)."""
    pred, true = _fit(x[tr], y[tr], C, max_iter, seed).predict(x[va]), y[va]
    recalls = [Fraction(int(np.sum(pred[true == c] == c)), int(np.sum(true == c))) for c in np.unique(true)]
    return float(sum(recalls, Fraction(0)) / len(recalls))


class _Padded:
    """A fitted classifier whose probabilities are padded to all ``n_classes`` columns."""

    def __init__(self, model, n_classes: int) -> None:
        self.model, self.n_classes = model, n_classes

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = self.model.predict_proba(x)
        out = np.zeros((len(x), self.n_classes), dtype=np.float64)
        out[:, self.model.classes_.astype(int)] = p
        return out
