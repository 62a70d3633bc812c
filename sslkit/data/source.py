"""The source protocol and the helpers every source shares."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sslkit.raw_input import GraphPreprocessing


DEFAULT_MAX_PIXELS = 178_956_970
"""The most pixels (width x height) one image may have before it is decoded, unless ``--max-pixels``
says otherwise: PIL's own decompression-bomb limit, applied to every decoder (a source's
``max_pixels``; bounds computed where the option is not at hand start from it)."""


class NotAnImage(ValueError):
    """Raised by ``Source.load`` for an object that holds no image: skipped silently."""


class Undecodable(ValueError):
    """Raised by ``Source.load`` with a reason ready for ``data_report.json`` (no identifiers)."""


@dataclass(frozen=True)
class SampleRef:
    """One image a source can load.

    ``path`` is the file (it must exist: fingerprints and caches read its size and mtime;
    a source of generated data names a real file, e.g. its own module); ``frame`` the frame of a multi-frame file; ``group`` the key that
    keeps related samples on one side of a split (for DICOM a hash of the relative path of
    the patient's first file, never derived from the identifier); ``label`` a class name where the layout gives one.
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

    Built as ``SourceClass(location, options)``: ``location`` is what follows
    ``scheme:`` in ``--data``; ``options`` an instance of ``Options`` (a dataclass whose
    fields are the ``--data-opt`` options) or None; call ``super().__init__(location,
    options or Options())``. ``index()`` must be cheap (headers only) and records files it
    had to skip in ``self.skipped`` as ``(path, reason)``. ``load(ref)`` returns float32
    ``(C, H, W)`` in ``[0, 1]`` and raises on an undecodable file (the caller records and
    skips it).

    Rules (``sslkit.testing.check_source`` checks them):

    * ``scheme`` equals the name the plugin registers (enforced at registration).
    * Every ``SampleRef.path`` from ``index()`` is an existing file.
    * The source pickles: the first decoding pass calls ``load`` in worker processes.
    * ``load`` of a damaged file raises (``Undecodable`` with a one-line reason, no patient
      identifiers), never returns made-up pixels.
    * ``sniff(path)``: 0 = not mine, about 0.5 = plausible, 1 = certain.
    """

    scheme: ClassVar[str] = ""
    Options: ClassVar[type | None] = None
    #: decode the first pass in worker processes (False where loading is a cheap array read)
    parallel_decode: ClassVar[bool] = True
    #: ``load`` of any sample reads its whole file (a compressed volume): the first decoding pass keeps
    #: each file's samples on one process, which reads the file once
    loads_whole_file: ClassVar[bool] = False
    #: ``Options`` fields that never change a decoded pixel (a count of header-reading processes, a
    #: memory bound): left out of the decoded-pixel cache key, so changing one reuses the entry. Every
    #: other field is in the key, whatever :meth:`describe` says (``check_source`` checks both)
    options_not_in_cache_key: ClassVar[frozenset[str]] = frozenset()
    #: ``Options`` fields added after runs with the source were recorded, each with the value those runs
    #: used: ``--resume`` of a ``run.json`` whose ``source_options_resolved`` lacks the field continues with
    #: this value, not today's default (as ``Task.legacy_option_values``). A value may instead be a
    #: function of the :meth:`describe` record the run holds (``dict -> value``; ``{}`` where it holds
    #: none), where runs recorded before the field existed decoded in more than one way
    legacy_option_values: ClassVar[dict[str, Any]] = {}

    def __init__(self, location: str, options: Any = None) -> None:
        self.location = location
        self.options = options
        self.skipped: list[tuple[str, str]] = []
        #: a folder where ``index()`` may keep what it read from headers, keyed by each
        #: file's size and mtime (set by the pipeline when the cache is on; None: off)
        self.header_cache: Path | None = None
        #: images with more pixels than this are skipped from their header, before decoding
        self.max_pixels: int = DEFAULT_MAX_PIXELS
        #: the side (px) the run stores 2D samples at, set before decoding: a decoder may reduce a
        #: much larger image while decoding, to no less than twice this (None: not known)
        self.sample_side: int | None = None

    @classmethod
    def sniff(cls, path: Path) -> float:
        """How sure this source is that a bare ``--data`` path is its kind, in [0, 1]:
        0 = not mine, about 0.5 = plausible (file extensions match), 0.9-1 = certain (magic
        numbers or headers checked). The highest score wins; ties go to the first name."""
        return 0.0

    def index(self) -> list[SampleRef]:
        """Every sample under ``location`` (headers only); skipped files go to ``self.skipped``.

        A location that does not exist or holds nothing usable raises ``UsageError``.
        """
        raise NotImplementedError

    def load(self, ref: SampleRef) -> np.ndarray:
        """The pixels of ``ref``: float32 ``(C, H, W)`` in [0, 1] (``C`` as the file has it).

        Raises ``NotAnImage`` (skipped silently) or ``Undecodable``/any error (skipped,
        reason reported) for a file it cannot decode.
        """
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

    def patient_folders(self, ref: SampleRef) -> tuple[int, ...]:
        """The levels of ``ref``'s folders (1: its own folder, 2: the one above, ...) whose names carry
        the patient's name or ID, as far as the file tells (a DICOM export's ``DOE_JOHN/``): ``eval``
        shows such a folder name nowhere, neither as a class nor in ``--color-by folder``. Default:
        ``()``, nothing known."""
        return ()

    def content_key(self, ref: SampleRef) -> str | None:
        """What identifies ``ref``'s content for ``eval``'s leakage check between ``--train`` and
        ``--test``, where a file's bytes and the frame do not (one file holding several arrays):
        a string equal for samples of equal content. Default: None, and the check compares the
        SHA-256 of the file's bytes and the frame. Read at index time; nothing is decoded."""
        return None

    def describe(self) -> dict[str, Any]:
        """How pixels were brought to [0, 1] (no identifiers): stored in the InputSpec and in the
        cache key. ``Options`` values need not be repeated here: the cache key holds them already;
        describe what they do not show (a reduction chosen from ``sample_side``)."""
        return {}

    def graph_preprocessing(self) -> GraphPreprocessing:
        """The part of ``load``'s mapping to [0, 1] that an exported graph can apply
        (``sslkit export --with-preprocessing``), stored in the run's InputSpec.

        Default: image pixels (the graph scales uint8 / uint16). A source that maps its own
        values (CT Hounsfield units through a fixed window) returns ``kind="window"`` with
        the windows; one whose mapping differs per file returns ``kind="unit"``. The core
        never guesses this from the source's name or from :meth:`describe`.
        """
        return GraphPreprocessing()

    def notes(self) -> list[tuple[str, str]]:
        """``(sample id, note)`` about data kept but changed on the way (e.g. a series with a missing
        slice, interpolated across), for the run's ``data_report.json``; no identifiers."""
        return []

    @functools.cached_property
    def _root_is_dir(self) -> bool:
        """Whether the data argument is a folder, looked up once (``relative`` runs once per sample)."""
        return Path(self.location).expanduser().is_dir()

    def relative(self, path: str) -> str:
        """``path`` as reports show it: relative to the data root (a file source: its name).

        Folder names below the root can carry patient names; only the data argument
        itself, which the user typed, is stored in full (run.json, the cache index).
        """
        root = Path(self.location).expanduser()
        if not self._root_is_dir:
            return Path(path).name if Path(path) == root else path
        try:
            return os.path.relpath(path, root)
        except ValueError:  # another drive (Windows)
            return Path(path).name


def check_pixel_count(width: int, height: int, limit: int | None) -> None:
    """Raise :class:`Undecodable` when a ``width x height`` image exceeds ``limit`` pixels.

    Called from header sizes before any pixel is decoded, so a small compressed file that
    expands to gigabytes is refused without allocating them. ``limit`` None or 0: no limit.
    """
    if limit and width * height > limit:
        raise Undecodable(f"too many pixels: {width}x{height} = {width * height:,} exceeds the limit of "
                          f"{limit:,} (--max-pixels raises it)")


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


def described(source: Any) -> dict[str, Any]:
    """``source.describe()``, refused in one line naming the source's plugin (exit 1) where it is no dict of
    JSON values: run.json and the decoded-pixel cache key store it (the key is taken first, before any
    decoding) (an object would be stored as its
    ``repr``, an address that differs in every process)."""
    import json

    from sslkit.errors import PluginError, first_line
    from sslkit.registry import plugin_of

    record, problem = source.describe(), None
    try:
        json.dumps(record)
    except (TypeError, ValueError, RecursionError) as exc:
        problem = f"returned a value JSON cannot hold ({first_line(exc)})"
    if not isinstance(record, dict):
        problem = f"returned {type(record).__name__}"
    if problem:
        raise PluginError(f"source {source.scheme!r} (plugin {plugin_of('sources', source.scheme)!r}): describe() "
                          f"{problem}; it must return a dict of JSON values (str, int, float, bool, None, list, "
                          f"dict), stored in run.json and the cache key")
    return record
