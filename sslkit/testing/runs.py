"""Run folders as a crash leaves them, for resume tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def crashed_copy(run: str | Path, copy: str | Path, keep: int) -> Path:
    """Copy run folder ``run`` to ``copy`` as a crash right after its ``keep``-th checkpoint
    leaves it: the later checkpoints and the encoder file gone, ``run.json`` saying
    ``"running"`` (no summary). ``sslkit pretrain --resume COPY`` must then repeat the
    original run's remaining steps exactly. Returns ``copy``.
    """
    run, copy = Path(run), Path(copy)
    shutil.copytree(run, copy)
    saved = checkpoints(copy)
    assert 0 < keep <= len(saved), f"{run} has {len(saved)} checkpoints; cannot keep {keep}"
    for later in saved[keep:]:
        shutil.rmtree(later)
    (copy / "encoder.safetensors").unlink(missing_ok=True)
    info = json.loads((copy / "run.json").read_text())
    info["status"] = "running"
    info.pop("summary", None)
    (copy / "run.json").write_text(json.dumps(info))
    return copy


def checkpoints(run: str | Path) -> list[Path]:
    """The checkpoint folders of ``run``, oldest first."""
    return sorted(p for p in (Path(run) / "checkpoints").iterdir() if p.name.startswith("step-"))
