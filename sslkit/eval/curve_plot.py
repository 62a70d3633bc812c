"""The label-efficiency picture: metric against label fraction, one panel per probe, error bars.

Each encoder (pretrained, random init, ``--init`` weights) is one line; points are the
mean over folds and bars one standard deviation; each encoder's points are moved by a few
percent along x (:func:`dodge`) so that bars at one fraction do not hide each other. The x axis
is logarithmic and labelled with the fraction and the mean number of labelled training images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslkit.figure import save_png

PANEL_INCHES = (5.0, 4.0)
DPI = 100
STYLE = {"pretrained": ("tab:blue", "o"), "random": ("tab:gray", "s"), "init": ("tab:green", "^")}
METRIC_LABELS = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy", "top1": "top-1 accuracy"}
DODGE = 1.04  # x factor between neighbouring encoders' points (log axis)
GROUPED_BY = {"pattern": "--group-pattern", "source": "the source's groups", "folder": "folder"}


def score_of(report: dict[str, Any]) -> str:
    """The plotted score's key: ``settings.score`` (``settings.metric`` in reports before it was renamed)."""
    settings = report["settings"]
    return settings.get("score") or settings["metric"]


def dodge(enc_index: int, n_encoders: int) -> float:
    """The factor an encoder's x values are multiplied by (log axis) so bars at one fraction stay apart."""
    return DODGE ** (enc_index - (n_encoders - 1) / 2)


def probe_title(probe: str, report: dict[str, Any]) -> str:
    """``linear probe``, or ``kNN (k=20)``; it says so when a fraction had fewer labels than k (fewer were used)."""
    if probe == "linear":
        return "linear probe"
    k = report["settings"].get("k")
    used = [fold.get("k_used") for res in report["results"].values() for s, m in res.items()
            if s.split(" f=")[0] == probe for fold in m.get("folds") or []]
    fewer = any(u is not None and k is not None and u < k for u in used)
    return f"kNN ({probe}{', fewer where a fraction has fewer labels' if fewer else ''})"


def draw_curve(report: dict[str, Any]) -> Any:
    """The figure of :func:`plot_curve`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = score_of(report)
    probes = list(dict.fromkeys(s.split(" f=")[0] for enc in report["results"].values() for s in enc))
    w, h = PANEL_INCHES
    fig = Figure(figsize=(w * len(probes), h), dpi=DPI)
    FigureCanvasAgg(fig)
    for p, probe in enumerate(probes):
        ax = fig.add_subplot(1, len(probes), p + 1)
        ticks: dict[float, float] = {}
        for e, (enc, res) in enumerate(report["results"].items()):
            rows = sorted((m["fraction"], m) for s, m in res.items() if s.split(" f=")[0] == probe)
            xs = [f * dodge(e, len(report["results"])) for f, _ in rows]
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
        ax.set_title(probe_title(probe, report))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(curve_title(report), fontsize="medium")
    return fig


def curve_title(report: dict[str, Any]) -> str:
    """What was measured: model, split (folds, grouped by what, error bars) and how many images (groups)."""
    split = report["settings"].get("split")
    data = report["data"]
    if split:
        d = data.get("data") or {}
        how = (f"{split['folds']}-fold grouped by {GROUPED_BY.get(split['group_by'], split['group_by'])}, "
               f"{d.get('samples')} images in {d.get('groups')} groups, mean ± std")
    else:
        train, test = data.get("train") or {}, data.get("test") or {}
        how = f"train/test, {train.get('samples')} / {test.get('samples')} images"
    model = report["model"]
    return f"{model['task']} {model['backbone']} {model['image_size']} px: label efficiency ({how})"


def plot_curve(report: dict[str, Any], out: Path) -> tuple[int, int]:
    """Draw ``report["results"]`` of ``eval curve`` into the PNG ``out``; returns its ``(W, H)`` in pixels."""
    fig = draw_curve(report)
    return save_png(fig, out, DPI, tight_rect=(0, 0, 1, 0.93))
