"""Pretrained minus baseline, with its standard error: does pretraining help, and by how much?

Every encoder of a report is scored on the same test images, so the comparison is paired.
On one ``--train``/``--test`` split the top-1 gain is the mean over test images of
``correct(pretrained) - correct(baseline)`` and its SE is that difference's standard
deviation over sqrt(n): far below either accuracy's own SE when the two encoders agree on
most images. The other metrics (balanced accuracy, AUROC) get their difference without an
SE there. Over ``--split group:K`` folds every metric's gain is the mean of its per-fold
differences, with SE = their standard deviation over sqrt(K).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sslkit.eval.split import METRICS


def paired_gain(a: np.ndarray, b: np.ndarray) -> tuple[float, float | None]:
    """Mean of the per-item difference ``a - b`` (the same items) and its SE (None for one item)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
    return float(d.mean()), se


def _setting_gain(mine: dict[str, Any], base: dict[str, Any],
                  correct: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if correct is None and "folds" in mine and "folds" in base:  # --split: per-fold differences
        for key in METRICS:
            diffs = [a[key] - b[key] for a, b in zip(mine["folds"], base["folds"])
                     if a.get(key) is not None and b.get(key) is not None]
            if diffs:
                out[key], out[f"{key}_se"] = paired_gain(np.array(diffs), np.zeros(len(diffs)))
        out["se"] = "over folds"
        return out
    for key in METRICS:
        if mine.get(key) is not None and base.get(key) is not None:
            out[key] = float(mine[key] - base[key])
    if correct is not None:
        out["top1"], out["top1_se"] = paired_gain(*correct)
        out["se"] = "paired, per test image"
    return out


def gains(results: Mapping[str, Mapping[str, dict[str, Any]]],
          correct: Mapping[tuple[str, str], np.ndarray]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"pretrained - BASELINE": {setting: {metric: gain, metric_se: SE}}}`` for every baseline encoder.

    ``results``: a report's ``{encoder: {setting: metrics}}``; ``correct``: ``{(encoder, setting):
    per-test-image correctness}`` of a single split (empty over folds).
    """
    mine = results.get("pretrained", {})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for enc, res in results.items():
        if enc == "pretrained":
            continue
        rows = {}
        for setting, base in res.items():
            if setting in mine:
                a, b = correct.get(("pretrained", setting)), correct.get((enc, setting))
                rows[setting] = _setting_gain(mine[setting], base, (a, b) if a is not None and b is not None else None)
        out[f"pretrained - {enc}"] = rows
    return out


def format_gains(report: dict[str, Any]) -> str:
    """One line per (baseline, setting): the top-1 (and AUROC) gain with its SE."""
    lines = []
    for pair, rows in (report.get("gain") or {}).items():
        for setting, g in rows.items():
            parts = [f"{key} {g[key]:+.4f}" + (f" ± {g[key + '_se']:.4f}" if g.get(key + "_se") is not None
                                                 else "")
                     for key in ("top1", "auroc") if g.get(key) is not None]
            if parts:
                se = f"  [± SE: {g['se']}]" if any(g.get(k + "_se") is not None for k in ("top1", "auroc")) else ""
                lines.append(f"gain {pair}, {setting}: " + ", ".join(parts) + se)
    return "\n".join(lines)
