"""The markdown tables of ``task_table.py``: the sweep, the chosen defaults (CIFAR-10 kNN and
X-ray AUROC beside random init, and lightly), and the CIFAR-10 and X-ray variants."""

from __future__ import annotations

import math

import numpy as np

from _common import acc_se, bits, paired_se
import lightly_tasks

REF_LR = 1e-3  # the engine's built-in base_lr; the sweep multiplies it


def fmt_pm(x: float, se: float, scale: float = 100, digits: int = 1) -> str:
    return f"{scale * x:.{digits}f} ± {scale * se:.{digits}f}"


def knn_cells(correct: str, random: str) -> str:
    """``kNN % ± SE | random % | gain (paired SE) | > SE`` of a run's and random init's correctness strings."""
    g, gse = paired_se(bits(correct), bits(random))
    return (f"{fmt_pm(*acc_se(correct))} | {100 * acc_se(random)[0]:.1f} | {100 * g:+.1f} ({100 * gse:.1f}) | "
            f"{verdict(g, gse)}")


def auroc_cells(folds, random) -> str:
    """``AUROC ± SE | random | gain (per-fold paired SE) | > SE`` of per-fold AUROCs."""
    f, rf = np.array(folds), np.array(random)
    g, gse = paired_se(f, rf)
    return (f"{fmt_pm(f.mean(), f.std(ddof=1) / math.sqrt(len(f)), 1, 3)} | {rf.mean():.3f} | {g:+.3f} ({gse:.3f}) | "
            f"{verdict(g, gse)}")


def variant_report(variants: dict, defaults: dict, budget: float) -> str:
    """The variants beside random init of their architecture and, at the table's budget, beside the
    task's default run (``defaults``: task -> chosen run), both paired over the same test images."""
    if not variants:
        return ""
    lines = ["", "", "Variants: CIFAR-10 kNN (k=20) top-1 % beside random init of the same architecture and beside the "
             f"task's default run at {budget:g} CPU min (when measured), paired SEs", "",
             "| variant | task | flags | base_lr | CPU min | steps | kNN % | random | gain (SE) | > SE | vs default (SE) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |"]
    for name, r in variants.items():
        base = defaults.get(r["task"]) if r["budget"] == budget else None
        vs = "-"
        if base is not None:
            d, dse = paired_se(bits(r["correct"]), bits(base["correct"]))
            vs = f"{100 * d:+.1f} ({100 * dse:.1f})"
        lines.append(f"{variant_head(name, r)} {knn_cells(r['correct'], r['random'])} | {vs} |")
    return "\n".join(lines)


def variant_head(name: str, r: dict) -> str:
    """A variant row's first cells: name, task, flags, the run's own base_lr (run.json), budget, steps."""
    lr = "-" if r.get("base_lr") is None else f"{r['base_lr']:g}"
    return f"| {name} | {r['task']} | `{r['flags'] or '-'}` | {lr} | {r['budget']:g} | {r['steps']} |"


def xray_variant_report(variants: dict, defaults: dict, budget: float) -> str:
    """The X-ray variants beside random init and the task's default X-ray run (``defaults``: task ->
    ``xray_run``), with SEs of the per-fold differences."""
    if not variants:
        return ""
    lines = ["", "", "X-ray variants: kNN AUROC (k=20), patient-grouped 5-fold, mean ± SE, beside random init of the "
             f"same architecture and the task's default run at {budget:g} CPU min (when measured), per-fold paired SEs",
             "", "| variant | task | flags | base_lr | CPU min | steps | AUROC | random | gain (SE) | > SE | vs default (SE) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |"]
    for name, r in variants.items():
        base = defaults.get(r["task"]) if r["budget"] == budget else None
        vs = "-" if base is None else "{:+.3f} ({:.3f})".format(*paired_se(np.array(r["folds"]), np.array(base["folds"])))
        lines.append(f"{variant_head(name, r)} {auroc_cells(r['folds'], r['random'])} | {vs} |")
    return "\n".join(lines)


def chosen(runs: dict) -> dict:
    """The sweep's best run of a task (its chosen default)."""
    return runs[max(runs, key=lambda m: bits(runs[m]["correct"]).mean())]


def verdict(gain: float, se: float) -> str:
    return "yes" if gain > se else "**no**"


def report(a, cifar: dict, xray: dict, n_pre: int, lightly: dict | None = None) -> str:
    lines = [f"LR sweep: CIFAR-10 32 px (jigsaw 64 px), {a.budget_min} CPU min per run, batch {a.batch_size}, "
             f"{n_pre} pretraining images; weighted cosine kNN (k=20) top-1 % ± SE on {a.eval_test} held-out images, "
             f"{a.eval_train}-image bank", ""]
    mults = sorted({m for r in cifar.values() for m in r if m is not None})
    heads = [f"base_lr {m * REF_LR:g}" for m in mults] or ["default base_lr"]
    mults = mults or [None]
    lines += ["| task | backbone | steps | " + " | ".join(heads)
              + " | random init | chosen base_lr |", "| --- | --- | ---: |" + " ---: |" * (len(heads) + 2)]
    for task, runs in cifar.items():
        r0 = next(iter(runs.values()))
        cells = [fmt_pm(*acc_se(runs[m]["correct"])) if m in runs else "-" for m in mults]
        lines.append(f"| {task} | {r0['arch']} | {r0['steps']} | " + " | ".join(cells)
                     + f" | {fmt_pm(*acc_se(r0['random']))} | {chosen(runs)['base_lr']:g} |")
    lines += ["", f"Chosen defaults: CIFAR-10 kNN top-1 % (best of the sweep) and chest X-ray (1 channel, 64 px, "
              f"{a.xray_images} images, {a.xray_budget_min} CPU min, batch {a.xray_batch_size}) kNN AUROC, "
              "patient-grouped 5-fold, mean ± SE; gains with paired SEs", "",
              "| task | base_lr | CIFAR-10 kNN % | random | gain (SE) | > SE |"
              + (" lightly | sslkit - lightly (SE) |" if lightly else "") + " X-ray AUROC | random | gain (SE) | > SE |",
              "| --- | ---: | ---: | ---: | ---: | :---: |" + (" ---: | ---: |" if lightly else "")
              + " ---: | ---: | ---: | :---: |"]
    for task, runs in cifar.items():
        r = chosen(runs)
        row = f"| {task} | {r['base_lr']:g} | {knn_cells(r['correct'], r['random'])} |"
        if lightly:
            row += lightly_tasks.diff_cells(r, lightly.get(task))
        x = xray.get(task)
        row += f" {auroc_cells(x['folds'], x['random'])} |" if x else " - | - | - | - |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    from _common import not_a_script

    not_a_script("task_table_report.py", "task_table.py (--report-only: the tables of what has finished)")
