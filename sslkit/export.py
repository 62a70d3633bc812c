"""Export a run's encoder through an exporter plugin (``register_exporters``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sslkit.errors import UsageError
from sslkit.registry import get_exporter
from sslkit.run import load_run


def export_metadata(run) -> dict[str, Any]:
    """What an exported artefact carries about its run. No paths, no identifiers."""
    from sslkit import __version__

    return {
        "input": run.spec.to_dict(),
        "task": run.info["task"],
        "backbone": run.backbone_name,
        "embedding_dim": run.info["embedding_dim"],
        "dataset_fingerprint": run.info.get("dataset", {}).get("fingerprint"),
        "sslkit_version": __version__,
    }


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "onnx", overwrite: bool = False,
               **options: Any) -> dict[str, Any]:
    exporter = get_exporter(fmt)
    run = load_run(run_dir)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{str(out)!r} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"output folder {str(out.parent)!r} is not writable")
    encoder = run.build_encoder()
    report = exporter(encoder, run.spec, export_metadata(run), out, **options)
    return {"format": fmt, "out": str(out), **(report or {})}
