"""From ``--data`` to a prepared pixel array: the one way every command reads data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslkit.data.prepare import Prepared, majority_channels, prepare
from sslkit.data.source import Source
from sslkit.errors import UsageError
from sslkit.registry import create_source


@dataclass
class LoadedData:
    source: Source
    prepared: Prepared
    channels: int


def load_data(data: str, image_size: int, channels: int | None = None,
              source_options: dict[str, Any] | None = None, cache_dir: str | Path | None = None,
              progress: bool = True) -> LoadedData:
    """Index and decode ``data`` once; skipped files (index + decode) are in ``prepared.skipped``."""
    source = create_source(data, **(source_options or {}))
    refs = source.index()
    if not refs:
        extra = f" ({len(source.skipped)} files skipped as unreadable)" if source.skipped else ""
        raise UsageError(f"no images found in {data!r}{extra}")
    channels = channels or majority_channels(source, refs)
    prepared = prepare(source, refs, channels, image_size, cache_dir, progress)
    prepared.skipped = list(source.skipped) + list(prepared.skipped)
    if not len(prepared):
        raise UsageError(
            f"no decodable image in {data!r}: all {len(refs)} samples failed to decode "
            f"(first: {prepared.skipped[0][1] if prepared.skipped else 'unknown'})"
        )
    return LoadedData(source, prepared, channels)
