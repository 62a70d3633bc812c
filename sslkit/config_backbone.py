"""The backbone a run builds when the user names none: the task's default fitted to the images,
or the architecture an sslkit run given as ``--init`` recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslkit.output_file import read_json
from sslkit.run import RUN_JSON


def run_backbone(task_cls: type, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The backbone name and options the run builds, under the user's options: the user's
    backbone; with ``--init`` of an sslkit run directory, the one that run recorded (its
    weights' architecture); with another ``--init``, the task's ``default_backbone`` as named;
    else the default with its ``default_backbone_options`` for the image size."""
    options = dict(values.get("backbone_options") or {})
    if values.get("backbone"):
        return values["backbone"], options
    init = values.get("init")
    if init:
        recorded = recorded_backbone(Path(init) / RUN_JSON)
        return (recorded[0], {**recorded[1], **options}) if recorded else (task_cls.default_backbone, options)
    size = values.get("image_size")
    fitted = task_cls.default_backbone_options(size) if isinstance(size, int) else {}
    return task_cls.default_backbone, {**fitted, **options}


def recorded_backbone(run_json: Path) -> tuple[str, dict[str, Any]] | None:
    """(backbone, backbone options) from a run's ``run.json``; None when it is not a readable one
    (``--init`` reports what is wrong with it when it loads the weights)."""
    config = read_json(run_json).get("config")
    try:
        return str(config["backbone"]), dict(config.get("backbone_options") or {})
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
