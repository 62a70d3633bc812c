"""Classification metrics shared by every probe: top-1, balanced accuracy, AUROC."""

from __future__ import annotations

import warnings

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
    balanced = auroc = None
    with warnings.catch_warnings():
        # a test fold without a class (a grouped split of few patients) makes scikit-learn warn, over
        # several lines with its file paths ("A single label was found in 'y_true' and 'y_pred'"); the
        # value is as documented above, and over folds ``mean_std``'s ``folds_scored`` reports the gap
        warnings.simplefilter("ignore", UserWarning)
        if len(y_true):
            balanced = float(balanced_accuracy_score(y_true, y_pred))
        if n_classes == 2 and positive is not None and scores is not None and len(np.unique(y_true)) == 2:
            auroc = float(roc_auc_score(y_true == positive, scores[:, positive]))
    return {"n": int(len(y_true)), "top1": float(np.mean(y_true == y_pred)) if len(y_true) else None,
            "balanced_accuracy": balanced, "auroc": auroc}
