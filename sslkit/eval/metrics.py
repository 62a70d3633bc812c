"""Classification metrics shared by every probe: top-1, balanced accuracy, AUROC."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None,
                           n_classes: int, positive: int | None) -> dict[str, float | int | None]:
    """Metrics of one prediction.

    ``y_true, y_pred: (N,)`` class indices; ``scores: (N, K)`` class scores (probabilities
    or kNN votes). ``balanced_accuracy`` is the mean recall over the classes present in
    ``y_true``. ``auroc`` is the ROC AUC of ``scores[:, positive]`` for the positive
    class against the rest; only reported for two classes (None otherwise, or when the
    test set holds a single class).
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out: dict[str, float | int | None] = {
        "n": int(len(y_true)),
        "top1": float(np.mean(y_true == y_pred)) if len(y_true) else None,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else None,
        "auroc": None,
    }
    if n_classes == 2 and positive is not None and scores is not None and len(np.unique(y_true)) == 2:
        out["auroc"] = float(roc_auc_score(y_true == positive, scores[:, positive]))
    return out
