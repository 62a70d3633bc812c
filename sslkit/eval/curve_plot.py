"""The label-efficiency picture: metric against label fraction, one panel per probe, error bars.

Each encoder (pretrained, random init, ``--init`` weights) is one line; points are the
mean over folds and bars one standard deviation. The x axis is logarithmic and labelled
with the fraction and the mean number of labelled training images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslkit.figure import save_png

PANEL_INCHES = (5.0, 4.0)
DPI = 100
STYLE = {"pretrained": ("tab:blue", "o"), "random": ("tab:gray", "s"), "init": ("tab:green", "^")}
METRIC_LABELS = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy", "top1": "top-1 accuracy"}
GROUPED_BY = {"pattern": "--group-pattern", "source": "the source's groups", "folder": "folder"}


def plot_curve(report: dict[str, Any], out: Path) -> tuple[int, int]:
    """Draw ``report["results"]`` of ``eval curve`` into the PNG ``out``; returns its ``(W, H)`` in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = report["settings"]["metric"]
    probes = list(dict.fromkeys(s.split(" f=")[0] for enc in report["results"].values() for s in enc))
    w, h = PANEL_INCHES
    fig = Figure(figsize=(w * len(probes), h), dpi=DPI)
    FigureCanvasAgg(fig)
    for p, probe in enumerate(probes):
        ax = fig.add_subplot(1, len(probes), p + 1)
        ticks: dict[float, float] = {}
        for enc, res in report["results"].items():
            rows = sorted((m["fraction"], m) for s, m in res.items() if s.split(" f=")[0] == probe)
            xs = [f for f, _ in rows]
            ys = [m[metric] if m[metric] is not None else float("nan") for _, m in rows]
            es = [(m.get("std") or {}).get(metric) or 0.0 for _, m in rows]
            color, marker = STYLE.get(enc, (None, "d"))
            ax.errorbar(xs, ys, yerr=es, label=enc, color=color, marker=marker, capsize=3, linewidth=1.5)
            ticks.update({f: m.get("train_labels", 0) for f, m in rows})
        ax.set_xscale("log")
        ax.set_xticks(list(ticks))
        ax.set_xticklabels([f"{f:g}\n({n:.0f})" for f, n in ticks.items()])
        ax.minorticks_off()
        ax.set_xlabel("label fraction (labelled training images)")
        positive = f" ({report['positive_class']})" if metric == "auroc" else ""
        ax.set_ylabel(METRIC_LABELS.get(metric, metric) + positive)
        ax.set_title("linear probe" if probe == "linear" else f"kNN ({probe})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    split = report["settings"].get("split")
    how = (f"{split['folds']}-fold grouped by {GROUPED_BY.get(split['group_by'], split['group_by'])}, mean ± std"
           if split else "train/test")
    model = report["model"]
    fig.suptitle(f"{model['task']} {model['backbone']} {model['image_size']} px: label efficiency ({how})",
                 fontsize="medium")
    save_png(fig, out, DPI, tight_rect=(0, 0, 1, 0.93))
    return int(w * len(probes) * DPI), int(h * DPI)
