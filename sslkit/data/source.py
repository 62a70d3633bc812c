"""The source protocol and the helpers every source shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class NotAnImage(ValueError):
    """Raised by ``Source.load`` for an object that holds no image: skipped silently."""


class Undecodable(ValueError):
    """Raised by ``Source.load`` with a reason ready for ``data_report.json`` (no identifiers)."""


@dataclass(frozen=True)
class SampleRef:
    """One image a source can load.

    ``path`` is the file; ``frame`` the frame of a multi-frame file; ``group`` the key that
    keeps related samples on one side of a split (a salted patient hash for DICOM, never
    the identifier itself); ``label`` a class name where the layout gives one.
    """

    path: str
    frame: int | None = None
    group: str = ""
    label: str | None = None

    @property
    def id(self) -> str:
        return self.path if self.frame is None else f"{self.path}#{self.frame}"


class Source:
    """Base class of dataset sources (registered with ``register_sources``).

    ``index()`` must be cheap (headers only) and records files it had to skip in
    ``self.skipped`` as ``(path, reason)``. ``load(ref)`` returns float32 ``(C, H, W)`` in
    ``[0, 1]`` and raises on an undecodable file (the caller records and skips it).
    """

    scheme: ClassVar[str] = ""
    Options: ClassVar[type | None] = None
    #: decode the first pass in worker processes (False where loading is a cheap array read)
    parallel_decode: ClassVar[bool] = True

    def __init__(self, location: str, options: Any = None) -> None:
        self.location = location
        self.options = options
        self.skipped: list[tuple[str, str]] = []
        #: a folder where ``index()`` may keep what it read from headers, keyed by each
        #: file's size and mtime (set by the pipeline when the cache is on; None: off)
        self.header_cache: Path | None = None

    @classmethod
    def sniff(cls, path: Path) -> float:
        """How sure this source is that a bare ``--data`` path is its kind (0 = not mine)."""
        return 0.0

    def index(self) -> list[SampleRef]:
        raise NotImplementedError

    def load(self, ref: SampleRef) -> np.ndarray:
        raise NotImplementedError

    def channels_of(self, ref: SampleRef) -> int | None:
        """The channel count of ``ref`` if known from its header (for the majority vote)."""
        return None

    def properties(self, ref: SampleRef) -> dict[str, Any]:
        """Header facts of ``ref``'s file for ``sslkit data inspect`` (no identifiers).

        Values are counted per file; a ``size`` of ``"WxH"`` and ``frames``, where
        known, feed the decoded-size estimate.
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """How pixels were brought to [0, 1] (no identifiers): stored in the InputSpec."""
        return {}


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(C, H, W)`` to ``channels`` channels: RGB -> luma, gray -> repeated."""
    c = x.shape[0]
    if c == 4 or c == 2:  # drop alpha
        x, c = x[: c - 1], c - 1
    if c == channels:
        return x
    if channels == 1 and c == 3:
        return (0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].astype(np.float32)
    if c == 1:
        return np.repeat(x, channels, axis=0)
    raise ValueError(f"cannot convert {c} channels to {channels}")
