"""Shared pieces of the evaluation benchmarks: resumable stages, CPU budgets, probes (data: ``_data.py``).

Every benchmark keeps its state in ``WORK/state.json``; a finished stage is skipped when
the command is run again, and an interrupted ``sslkit pretrain`` continues with
``--resume``. CPU time is process CPU time (user + system, all threads), so a budget
means the same work on a quiet or a shared machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np


class Refused(SystemExit):
    """A user error of a benchmark script (:func:`refuse`): exit status 2; ``str()`` is its message."""

    def __str__(self) -> str:
        return self.message


def refuse(message: str) -> NoReturn:
    """A user error (a changed setting, missing data, a bad flag): ``message``, one line, on stderr and
    exit status 2, no traceback."""
    print(message, file=sys.stderr, flush=True)
    exc = Refused(2)
    exc.message = message
    raise exc


def not_a_script(module: str, instead: str) -> NoReturn:
    """``python MODULE.py`` of a helper module: one line naming the script(s) to run ``instead``, exit 2."""
    refuse(f"error: {module} is a helper module, not a script: run {instead} instead")


class Stages:
    """Named stages with their results in ``work/state.json``; done stages are skipped."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.file = work / "state.json"
        self.state: dict[str, Any] = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.lock = threading.Lock()  # stages may run in threads (cifar10.py --parallel)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self.state:
            print(f"[skip] {name}: done earlier", flush=True)
            return self.state[name]
        print(f"[run ] {name}", flush=True)
        t0 = time.time()
        result = fn()
        self.put(name, result)
        print(f"[done] {name} in {time.time() - t0:.0f}s wall", flush=True)
        return result

    def put(self, name: str, value: Any) -> None:
        """Set ``name``'s entry and write the state file (atomically: a per-process temporary file, renamed)."""
        with self.lock:
            self.state[name] = value
            tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.state, indent=2, default=str))
            os.replace(tmp, self.file)


class SharedStages(Stages):
    """:class:`Stages` whose state file several processes (``--tasks`` split between them) share:
    the file is re-read before every stage and merged before every write."""

    def _reload(self) -> None:
        if self.file.exists():
            self.state = {**self.state, **json.loads(self.file.read_text())}

    def run(self, name, fn):
        self._reload()
        if name in self.state:
            return super().run(name, fn)
        print(f"[run ] {name}", flush=True)
        result = fn()
        self.put(name, result)
        print(f"[done] {name}", flush=True)
        return result

    def put(self, name, value):
        self._reload()  # the other processes' stages too
        super().put(name, value)


class Missing(Exception):
    """``--report-only``: a stage has not run yet."""


class ReadOnlyStages(SharedStages):
    """``--report-only``: finished stages only; a missing one raises :class:`Missing`."""

    def run(self, name, fn):
        self._reload()
        if name not in self.state:
            raise Missing(name)
        return self.state[name]


def check_settings(st: Stages, key: str, settings: dict[str, Any], stored: dict[str, Any] | None = None,
                   record: bool = True, hint: str = "pass the same settings, or use a new --work") -> dict[str, Any]:
    """Refuse a run whose ``settings`` differ from those its work dir was made with.

    A work dir's stage names do not carry every setting (budget, seed, image counts, ...), so a rerun
    with other settings would reuse stages of the first ones and report them under the new heading.
    ``st.state[key]`` (or ``stored``, an older dir's implied record) holds the settings; one that
    differs is refused in one line naming them, ending in ``hint`` (exit status 2: :func:`refuse`).
    Settings the record lacks (a dir from before they were recorded) are accepted and added; a new
    dir records them all (``record=False``: only compare). A key that is a Python name is shown as
    its flag (``budget_min`` -> ``budget-min``), any other as it is. Returns the record."""
    now = json.loads(json.dumps(settings, default=str))  # as the state file will read it back
    old = (stored if stored is not None else st.state.get(key)) or {}
    differ = [k for k in now if k in old and old[k] != now[k]]
    if differ:
        def shown(rec: dict, k: str) -> str:
            return f"{k.replace('_', '-') if k.isidentifier() else k} {'(none)' if rec[k] is None else rec[k]}"
        refuse(f"error: {st.work} holds runs made with {', '.join(shown(old, k) for k in differ)}; this run asks "
               f"{', '.join(shown(now, k) for k in differ)}: {hint}")
    merged = {**old, **now}
    if record and merged != st.state.get(key):
        st.put(key, merged)
    return merged


def cpu_seconds(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def cpu_seconds_per_call(fn: Callable[[], Any], calls: int, warmup: int = 1) -> float:
    """CPU seconds (this process) of one ``fn()``: the mean of ``calls`` calls after ``warmup``."""
    for _ in range(warmup):  # allocations, kernel selection
        fn()
    c0 = cpu_seconds()
    for _ in range(calls):
        fn()
    return (cpu_seconds() - c0) / calls


def run_optimizer(task_module, task: str, backbone: str, backbone_opts: dict, task_opts: dict, size: int,
                  channels: int, batch: int):
    """The optimizer ``sslkit pretrain --task TASK`` steps with at these settings (the task's
    engine_defaults: e.g. simclr's LARS, mae's AdamW), over ``task_module``'s parameters, built as the
    engine builds it (:func:`sslkit.config.resolve`, :func:`sslkit.optim.build_optimizer`: fused AdamW)."""
    from sslkit.config import resolve
    from sslkit.optim import build_optimizer, scaled_lr

    c = resolve(dict(task=task, data="folder:.", out="-", backbone=backbone, backbone_options=backbone_opts,
                     task_options=task_opts, image_size=size, channels=channels, batch_size=batch))
    lr = c.lr if c.lr is not None else scaled_lr(c.base_lr, batch, c.lr_scaling)
    return build_optimizer(task_module, c.optimizer, lr, c.weight_decay, c.momentum, c.betas)


def task_step_cpu_seconds(task: str, backbone: str, backbone_opts: dict, task_opts: dict, size: int,
                          channels: int, batch: int, steps: int, warmup: int = 3) -> float:
    """CPU seconds of one training step of ``task`` (augment, forward, backward, the run's optimizer
    step (:func:`run_optimizer`), on_step_end) on random ``batch x channels x size x size`` tensors,
    after ``warmup`` steps.

    Three warm-up steps, not one: the first calibration in a fresh process measured mae's step
    (ViT-Tiny, 32 px, batch 128) 30 % and simclr's (ResNet-18) 13 % above the steps of its own
    run and of a second calibration in the same process after one warm-up step; after three,
    the first and the second agree within 1-3 % (BENCHMARKS.md, "MAE's decoder as wide as the encoder").
    """
    import torch

    from sslkit.registry import create_backbone, create_task
    from sslkit.spec import InputSpec

    torch.manual_seed(0)
    spec = InputSpec(channels, size, (0.5,) * channels, (0.25,) * channels)
    t = create_task(task, create_backbone(backbone, channels, size, **backbone_opts), spec, **task_opts)
    augment = t.views(spec)
    opt = run_optimizer(t, task, backbone, backbone_opts, task_opts, size, channels, batch)
    x = torch.rand(batch, channels, size, size)

    done = [0]

    def step() -> None:
        loss = t(augment(x))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        done[0] += 1
        t.on_step_end(max(1, done[0] - warmup + 1), 1000)  # the warm-up steps as step 1, then 2, 3, ...

    return cpu_seconds_per_call(step, steps, warmup)


def run_arch(run: Path) -> str:
    """The encoder a run is scored beside at random init, as a state key: its backbone with the options
    the run *was built with* (``run.json``: the table's, a variant's, and those of the task's embedding,
    e.g. mae's ``global_pool=avg``) and its input size, so two tasks that embed one architecture
    differently (mae's patch-token mean, simmim's class token) each get their own random baseline."""
    info = json.loads((run / "run.json").read_text())
    opts = "".join(f" {k}={v}" for k, v in (info.get("backbone_options") or {}).items())
    return f"{info['backbone']}{opts} {info['input_spec']['image_size']}px"


def knn_correctness(run_dir: Path, bank: Path, test: Path, weights: bool, seed: int = 0, k: int = 20) -> np.ndarray:
    """Whether the weighted cosine kNN (bank = labelled folder ``bank``) classifies each image of
    ``test`` right, in sorted sample-id order; ``weights=False``: the run's architecture at random init."""
    import torch

    from sslkit.embed import open_run

    torch.manual_seed(seed)
    return model_knn_correctness(open_run(str(run_dir), weights=weights), bank, test, k)


def model_knn_correctness(model, bank: Path, test: Path, k: int = 20) -> np.ndarray:
    """:func:`knn_correctness` of an opened ``sslkit.embed.Model`` (one encoder embeds bank and test)."""
    from sslkit.embed import embed

    tr = embed(model, f"folder:{bank}", batch_size=256, progress=False)
    te = embed(model, f"folder:{test}", batch_size=256, progress=False)
    return embedded_knn_correctness(tr.embeddings, tr.labels, te.embeddings, te.labels, te.ids, k)


def embedded_knn_correctness(xtr, labels_tr, xte, labels_te, ids_te, k: int = 20) -> np.ndarray:
    """Per test image, whether the weighted cosine kNN over the bank ``(xtr, labels_tr)`` gets it right,
    in sorted sample-id order (the order every correctness string of a state file is in)."""
    from sslkit.eval.knn import knn_votes

    classes = sorted(set(labels_tr))
    ytr = np.array([classes.index(c) for c in labels_tr])
    yte = np.array([classes.index(c) for c in labels_te])
    votes = knn_votes(xtr, ytr, xte, len(classes), [k])[k]
    order = np.argsort(np.array([str(i) for i in ids_te]))
    return (votes.argmax(1) == yte)[order]


def knn_correct_string(run_dir: Path, bank: Path, test: Path, weights: bool, seed: int = 0, k: int = 20) -> str:
    """:func:`knn_correctness` as a '0'/'1' string, the form a state file stores (:func:`bits` reads it back)."""
    return correct_string(knn_correctness(run_dir, bank, test, weights, seed, k))


def correct_string(correct) -> str:
    """Per-image booleans -> the '0'/'1' string a state file stores (:func:`bits` reads it back)."""
    return "".join("1" if c else "0" for c in correct)


def bits(s: str) -> np.ndarray:
    """A '0'/'1' correctness string (``knn_correctness`` stored in a state file) -> floats."""
    return np.array([ch == "1" for ch in s], dtype=float)


def acc_se(correct: str) -> tuple[float, float]:
    """Accuracy of a '0'/'1' string and its binomial SE."""
    c = bits(correct)
    return c.mean(), c.std(ddof=1) / np.sqrt(len(c))


def paired_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float | None]:
    """Mean of the per-item difference ``a - b`` (same items) and its SE: ``sslkit eval``'s own gain."""
    from sslkit.eval.gain import paired_gain

    return paired_gain(a, b)


def sslkit_pretrain(run_dir: Path, args: list[str]) -> dict[str, Any]:
    """``sslkit pretrain ... --out run_dir`` in a subprocess (``--resume`` when interrupted before)."""
    info = run_dir / "run.json"
    resume = info.exists() and json.loads(info.read_text()).get("status") != "finished"
    cmd = [sys.executable, "-m", "sslkit", "pretrain", *args, "--out", str(run_dir)]
    if resume:
        cmd.append("--resume")
    print("  $ " + " ".join(cmd[2:]), flush=True)
    c0, t0 = cpu_seconds(children=True), time.time()
    subprocess.run(cmd, check=True)
    return {"cpu_s": round(cpu_seconds(children=True) - c0, 1), "wall_s": round(time.time() - t0, 1),
            "resumed": resume}


def probe(run_dir: Path, train: Path, test: Path, baseline: bool, ks=(20, 200),
          positive: str | None = None) -> dict[str, Any]:
    """kNN and linear-probe metrics of ``run_dir`` (and of a random-init encoder with ``baseline``)."""
    from sslkit.eval.probes import DataArgs, knn_results, linear_results, prepare

    args = DataArgs(train=str(train), test=str(test), positive=positive, baseline=baseline, batch_size=128,
                    progress=False, device="cpu")
    prep = prepare(str(run_dir), args)
    knn, lin = knn_results(prep, ks), linear_results(prep)
    # and each test image's kNN verdict at ks[0], so pairing two runs needs no second embedding pass
    return {enc: {**knn[enc], **lin[enc], f"correct_k{ks[0]}": correct_string(
                embedded_knn_correctness(tr.x, tr.labels, te.x, te.labels, te.ids, ks[0]))}
            for enc, (tr, te) in prep.sets.items()}


def table(rows: list[tuple[str, dict[str, Any]]], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table: one row per ``(name, results)``; ``columns`` = ``(header, setting, metric)``."""
    head = "| encoder | " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "| --- |" + " ---: |" * len(columns)
    lines = [head, sep]
    for name, res in rows:
        cells = []
        for _, setting, metric in columns:
            v = res.get(setting, {}).get(metric)
            cells.append("-" if v is None else f"{100 * v:.1f}" if metric != "auroc" else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    not_a_script("_common.py", "a benchmark that imports it (quality.py, task_table.py, label_curve.py, ...)")
