"""``--init`` across ``--resume``: a checkpoint holds every weight, so its init is not read again.

A run resumed from a checkpoint keeps the ``init`` record its ``run.json`` holds (source,
sha256, adaptations, task parts, continue settings) and never resolves ``--init``: the weights
may have moved, changed or left the Hub cache since, and none of them is used. A run resumed
before its first checkpoint starts from the init again: it loads it, and refuses weights whose
sha256 is not the one the run recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sslkit.errors import UsageError

CHECKPOINT_LINE = "init: recorded in run.json; weights from the checkpoint"


@dataclass(frozen=True)
class ResumedInit:
    """What a ``--resume`` of an ``--init`` run knows before it builds the model."""

    record: dict[str, Any] | None  # run.json's "init" (None: the run.json has none)
    checkpointed: bool  # a checkpoint holds the weights: the init is not read


def resumed_init(cfg: Any) -> ResumedInit | None:
    """For ``--resume`` of a run started with ``--init``: its recorded init and whether a checkpoint
    will supply the weights; None otherwise."""
    if not (cfg.resume and cfg.init):
        return None
    from sslkit.output_file import read_json
    from sslkit.run import CHECKPOINTS, RUN_JSON

    out = Path(cfg.out)
    record = read_json(out / RUN_JSON).get("init")
    return ResumedInit(record if isinstance(record, dict) else None, has_checkpoint(out / CHECKPOINTS))


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint a resume starts from (or refuses, when all are damaged),
    counting one that an interrupted replacement left in an ``.old-*`` folder (moved back on resume)."""
    from sslkit.checkpoint import list_checkpoints

    if list_checkpoints(folder):
        return True
    return folder.is_dir() and any(list_checkpoints(p) for p in folder.glob(".old-*") if p.is_dir())


def backbone_init(cfg: Any, backbone: nn.Module, resumed: ResumedInit | None) -> tuple[dict[str, Any], str]:
    """The init record of the run and the line to print: run.json's when a checkpoint holds the weights
    (nothing is read), else the one :func:`sslkit.init.load_init` makes loading ``cfg.init`` into
    ``backbone``, checked against the recorded sha256 on a resume."""
    if resumed is not None and resumed.checkpointed:
        return dict(resumed.record or {}), CHECKPOINT_LINE
    from sslkit.init import load_init

    record = load_init(cfg.init, backbone, cfg.allow_download)
    was = (resumed.record or {}).get("sha256") if resumed is not None else None
    if was and record["sha256"] != was:
        raise UsageError(f"--resume: --init {record['source']} changed since the run started (sha256 "
                         f"{record['sha256'][:12]}, run.json records {str(was)[:12]}); restore those weights, "
                         f"or start a new run")
    return record, record["summary"]


def continue_settings(record: dict[str, Any], resumed: ResumedInit | None) -> dict[str, Any] | None:
    """The recorded continue settings a resume from a checkpoint keeps (its optimizer's groups were made
    by them); None when they are to be planned."""
    if resumed is None or not resumed.checkpointed:
        return None
    settings = record.get("continue")
    if not isinstance(settings, dict) or not {"encoder_lr_scale", "freeze_steps"} <= settings.keys():
        return None
    if settings.get("layer_decay") is not None and "depth" not in settings:
        return None
    return settings
