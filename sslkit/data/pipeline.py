"""From ``--data`` to a prepared pixel array: the one way every command reads data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslkit.data.prepare import Prepared, majority_channels, prepare, resolve_cache_dir
from sslkit.data.source import Source
from sslkit.data.splits import groups_fingerprint, split_refs
from sslkit.errors import UsageError
from sslkit.registry import create_source


@dataclass
class LoadedData:
    source: Source
    prepared: Prepared  # the training samples (the validation part, if any, is left out)
    channels: int
    split: dict[str, Any] = field(default_factory=dict)  # for run.json: counts and fingerprints only


def load_data(data: str, image_size: int, channels: int | None = None,
              source_options: dict[str, Any] | None = None, cache_dir: str | Path | bool | None = None,
              progress: bool = True, val_fraction: float = 0.0, seed: int = 0, workers: int = 0) -> LoadedData:
    """Index and decode ``data`` once; skipped files (index + decode) are in ``prepared.skipped``.

    ``cache_dir``: ``None`` = the default cache (``$SSLKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/sslkit``, else ``~/.cache/sslkit``), ``False`` or ``""`` = in memory.
    ``val_fraction`` holds out whole groups (patients) with :func:`split_refs`; they are
    neither decoded nor trained on, and ``split`` records their count and fingerprint.
    """
    source = create_source(data, **(source_options or {}))
    root = resolve_cache_dir(cache_dir)
    source.header_cache = root / "headers" if root is not None else None
    refs = source.index()
    if not refs:
        extra = f" ({len(source.skipped)} files skipped as unreadable)" if source.skipped else ""
        raise UsageError(f"no images found in {data!r}{extra}")
    train, val = split_refs(refs, val_fraction, seed)
    split = {}
    if val:
        split = {"val_fraction": val_fraction, "val_samples": len(val), "val_groups": len({r.group for r in val}),
                 "val_fingerprint": groups_fingerprint(val), "train_groups": len({r.group for r in train})}
    channels = channels or majority_channels(source, train)
    prepared = prepare(source, train, channels, image_size, cache_dir, progress, workers)
    prepared.skipped = list(source.skipped) + list(prepared.skipped)
    if not len(prepared):
        raise UsageError(
            f"no decodable image in {data!r}: all {len(train)} samples failed to decode "
            f"(first: {prepared.skipped[0][1] if prepared.skipped else 'unknown'})"
        )
    return LoadedData(source, prepared, channels, split)


def summary_line(samples: int, skipped: list[tuple[str, str]]) -> str:
    """``"1234 images; 3 files skipped (reasons in data_report.json): 2 x ValueError, ..."``."""
    line = f"{samples} images"
    if skipped:
        reasons: dict[str, int] = {}
        for _, reason in skipped:
            key = reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        top = ", ".join(f"{n} x {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        line += f"; {len(skipped)} files skipped (reasons in data_report.json): {top}"
    return line


def report_summary(run_dir: str | Path) -> str | None:
    """The summary line of ``RUN_DIR/data_report.json`` when files were skipped, else None."""
    try:
        report = json.loads((Path(run_dir) / "data_report.json").read_text())
    except (OSError, ValueError):
        return None
    skipped = [(f["path"], f["reason"]) for f in report.get("skipped_files", [])]
    return summary_line(report.get("samples", 0), skipped) if skipped else None
