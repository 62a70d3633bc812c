"""Evaluation reports: one JSON schema for every probe, saved beside the model, never overwritten.

Reports and pictures get the first free name ``KIND-<stamp>[-n]``: each is published only if that
name is still free (:func:`sslkit.output_file.write_atomic` without overwriting), so no empty
placeholder is ever left, whatever stops the command. The report folder is checked before any work
(:func:`check_report_dir`).

Schema ``sslkit.eval/1`` (documented in README, "sslkit eval --json")::

    {"schema": "sslkit.eval/1", "kind": "knn" | "linear" | "tsne" | "attention",
     "created": ISO-8601 UTC, "sslkit_version": str,
     "model": {"path", "format", "run_id", "config_sha256", "step", "checkpoint", "encoder_sha256",
               "checkpoint_step", "checkpoint_sha256" (a checkpoint), "task", "backbone",
               "backbone_options", "embedding_dim", "image_size", "channels"},
     "data": {"train"/"test"/"data": {"source", "samples", "unlabelled",
                                      "skipped": {"files": int, "reasons": {str: int}}}},
     "classes": [str], "positive_class": str | null,
     "settings": {...},                      # what the probe was run with
     "results": {"pretrained": {SETTING: METRICS}, "random": {SETTING: METRICS}},
     "files": [str],                         # pictures written (tsne, attention)
     "report_file": str}

``METRICS`` is ``{"n", "top1", "balanced_accuracy", "auroc"}`` plus probe-specific keys
(``C`` and ``val_balanced_accuracy`` for the linear probe, ``epochs`` for fine-tuning).
With ``--split group:K`` the metrics are means over the folds, ``std`` holds their
standard deviations and ``folds`` each fold's metrics. Encoders are ``pretrained``,
``random`` and, for a run started with ``--init``, ``init`` (those weights before pretraining).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from sslkit.errors import UsageError
from sslkit.output_file import OutputExists, check_output, check_writable, write_text_atomic

T = TypeVar("T")

SCHEMA = "sslkit.eval/1"


def new_report(kind: str, model: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    from sslkit import __version__

    return {"schema": SCHEMA, "kind": kind,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sslkit_version": __version__, "model": model, "data": {}, "classes": [],
            "positive_class": None, "settings": settings, "results": {}, "files": []}


def skipped_summary(skipped: list[tuple[str, str]] | dict[str, int]) -> dict[str, Any]:
    """``data.<side>.skipped`` of every report: files of a data set that were not decoded (so not
    used), and how many for each reason. Takes the loader's ``(path, reason)`` rows, or their
    :func:`sslkit.embed.skip_reasons` count (``Embeddings.skip_reasons``): reasons hold no file names."""
    from sslkit.embed import skip_reasons

    reasons = dict(skipped) if isinstance(skipped, dict) else skip_reasons(skipped)
    return {"files": sum(reasons.values()), "reasons": reasons}


#: the names :func:`report_names` gives (``knn-20261205T221500Z.json``, ``tsne-...-2.png``)
REPORT_NAME = re.compile(r"[a-z][a-z0-9_]*-\d{8}T\d{6}Z(-\d+)?\.(json|png)")


def remove_reports(folder: Path) -> None:
    """Delete the reports sslkit wrote in ``folder`` (a replaced run's ``eval/``); other files stay,
    and the folder goes only if nothing else is in it. A symlinked folder is not entered: its reports are
    another folder's."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and REPORT_NAME.fullmatch(path.name):
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # the user's own files are in it
        pass


def check_report_dir(folder: Path) -> None:
    """Refuse, before any work, a report folder (``RUN/eval``) that cannot be created or written in."""
    folder = Path(folder)
    where = folder if folder.exists() else folder.parent
    if not where.is_dir():
        raise UsageError(f"the reports go to {str(folder)!r}, but {str(where)!r} is not a folder; "
                         "nothing was evaluated")
    try:
        check_writable(where)
    except UsageError as exc:
        raise UsageError(f"the reports go to {str(folder)!r}: {exc}; nothing was evaluated") from None


def report_names(folder: Path, stem: str, suffix: str) -> Iterator[Path]:
    """``folder/stem-YYYYmmddTHHMMSSZ[-n]suffix``, n = 2, 3, ...: the names a new report may take."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 10_000):
        yield folder / f"{stem}-{stamp}{'' if n == 1 else f'-{n}'}{suffix}"


def save_new(names: Iterable[Path], save: Callable[[Path], T]) -> tuple[Path, T]:
    """``save(path)`` (a :func:`write_atomic` of ``path``) under the first of ``names`` that is free when it is
    published: a name taken meanwhile (:class:`OutputExists`) moves on to the next. Nothing is reserved
    beforehand, so nothing is left behind when the command stops. Returns the name and what ``save`` gave."""
    for path in names:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the report folder {str(path.parent)!r}: {exc.strerror or exc}") from None
        try:
            check_output(path, overwrite=False)  # write_atomic then refuses to replace it
            return path, save(path)
        except OutputExists:
            continue
    raise UsageError(f"cannot find a free file name in {str(path.parent)!r}")


def save_picture(out: Path | None, folder: Path, stem: str, draw: Callable[[Path], T]) -> tuple[Path, T]:
    """``draw(path)`` to ``out`` (``--out``, checked before any work), else to a new ``folder/stem-<stamp>.png``."""
    if out is not None:
        return Path(out), draw(Path(out))
    return save_new(report_names(folder, stem, ".png"), draw)


def save_report(report: dict[str, Any], folder: Path, picture: Path | None = None, overwrite: bool = False) -> Path:
    """Write ``report`` as ``folder/<kind>-<stamp>.json``; ``report["report_file"]`` names it.

    The report of a ``picture`` saved in ``folder`` shares its name (``tsne-<stamp>.json``) when that is free.
    With ``overwrite`` (the picture was ``--out`` with ``--overwrite``), the report there of the picture it
    replaced is replaced too: it belonged to the old picture.
    """
    def write(path: Path, replace: bool = False) -> Path:
        report["report_file"] = str(path)
        write_text_atomic(path, json.dumps(report, indent=2, default=str), overwrite=replace)
        return path

    names: Iterable[Path] = report_names(folder, report["kind"], ".json")
    if picture is not None and picture.parent.resolve() == folder.resolve():
        same = folder / f"{picture.stem}.json"
        if overwrite and _report_of(same, picture):
            return write(same, replace=True)
        names = chain([same], names)
    return save_new(names, write)[0]


def _report_of(path: Path, picture: Path) -> bool:
    """Whether ``path`` is an sslkit report (a regular file) that lists a picture named as ``picture``."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = old.get("files") if isinstance(old, dict) and old.get("schema") == SCHEMA else None
    return isinstance(files, list) and any(isinstance(f, str) and Path(f).name == picture.name for f in files)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(report: dict[str, Any]) -> str:
    """The results as an aligned text table, one row per (setting, encoder)."""
    cols = ["top1", "balanced_accuracy", "auroc"]
    extra = sorted({k for enc in report["results"].values() for m in enc.values() for k, v in m.items()
                    if not isinstance(v, (dict, list))} - set(cols) - {"n"})
    header = ["setting", "encoder", *cols, *extra]
    rows = []
    settings = list(dict.fromkeys(s for enc in report["results"].values() for s in enc))
    for setting in settings:
        for enc, res in report["results"].items():
            if setting in res:
                m = res[setting]
                std, scored = m.get("std") or {}, m.get("folds_scored") or {}
                rows.append([setting, enc, *(_fmt(m.get(c)) + (f" ± {std[c]:.4f}" if std.get(c) is not None else "")
                                             + (f" ({scored[c]}/{len(m['folds'])} folds)" if c in scored else "")
                                             for c in header[2:])])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)
