"""``sslkit data dump``: the decoded arrays of a source, one per sample, to check against any tool.

The ``.npz`` holds one float32 array per sample, keyed by its id: ``file:`` and the keyed hash of
its path relative to the data root (:func:`sslkit.embed.keyed_id`, as ``data_report.json`` names
files; ``ids="path"``: that path, which can carry patient names), ``#frame`` for a frame or slice;
``series:<keyed hash>`` for a DICOM volume. Each array is as the source decodes it: ``(C, H, W)``
images, ``(C*K, H, W)`` slabs or ``(C, D, H, W)`` volumes, in [0, 1] after the window, or with ``raw``
the values before windowing (modality values such as Hounsfield units; the sources that have them:
``dicom``, ``nifti``). No resizing to ``--image-size``. ``__meta__`` is a JSON string saying the axis
order, the value kind, the source's preprocessing, each sample's spacing in mm, how samples are
named (``samples_named_by``) and, for volumes, what the padding holds: 0 in [0, 1], and with ``raw``
the value the source's window maps to 0 (so the raw volume through an exported
``--with-preprocessing`` graph gives what training gives).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sslkit.data.pipeline import summary_line
from sslkit.data.skips import skip_reason
from sslkit.data.volume import ORIENTATION, sample_mode
from sslkit.errors import UsageError
from sslkit.output_file import check_output, write_atomic
from sslkit.registry import create_source, get_source, list_sources


#: what the padding of a ``--raw`` volume holds (sslkit.data.volume: the value the windows map to 0)
PADDING_RAW = ("the value the source's mapping to [0, 1] takes to 0: a fixed window's lower bound (several "
               "windows: the lowest; inverted images: the highest upper bound), a min-max over the volume: its "
               "minimum; 0 where the mapping is chosen per slice")


#: what ``__meta__["samples_named_by"]`` says for each ``ids``
NAMED_BY = {"key": "file: and a keyed hash of the path below the data root, as data_report.json names files "
                   "('sslkit data inspect DATA' prints unusable files' paths with their keys); #frame for a frame "
                   "or slice; a volume of a series: series: and a keyed hash",
            "path": "the path below the data root (folder and file names can carry patient names); #frame for a "
                    "frame or slice; a volume of a series: series: and a keyed hash"}


def sample_key(source: Any, ref: Any, ids: str = "key") -> str:
    """A sample's id as outputs name it: by default (``ids="key"``) :func:`sslkit.embed.keyed_id`; ``ids="path"``:
    relative to the data root, or the source's own id, the bytes of a file name that is not UTF-8 written as
    ``\\xNN`` (an archive entry's name must be text)."""
    from sslkit.embed import keyed_id, sample_id

    if ids == "key":
        return keyed_id(source, ref)
    if (key := sample_id(source, ref)) != ref.id:
        return key
    rel = source.relative(ref.path)
    key = rel if ref.frame is None else f"{rel}#{ref.frame}"
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def dump(src: str, out: str | Path, options: dict[str, Any] | None = None, raw: bool = False,
         limit: int | None = None, overwrite: bool = False, ids: str = "key") -> dict[str, Any]:
    """Decode up to ``limit`` samples of ``src`` and save them to ``out`` (see the module docstring)."""
    from sslkit.embed import check_ids

    check_ids(ids)
    out = Path(out)
    check_output(out, overwrite, ".npz")
    source = create_source(src, **(options or {}))
    if raw and not hasattr(source, "load_raw"):
        able = [s for s in list_sources() if hasattr(get_source(s), "load_raw")]
        raise UsageError(f"--raw: the {source.scheme!r} source has no values before windowing "
                         f"(sources that do: {', '.join(able) or 'none loaded'}); leave --raw out")
    refs = source.index()
    if not refs:
        raise UsageError(f"no images found in {src!r}")
    refs = refs[:limit] if limit else refs
    arrays: dict[str, np.ndarray] = {}
    spacing: dict[str, Any] = {}
    reasons: list[tuple[str, str]] = []
    for ref in refs:
        key = sample_key(source, ref, ids)
        try:
            arrays[key] = np.asarray(source.load_raw(ref) if raw else source.load(ref), dtype=np.float32)
        except Exception as exc:
            reasons.append((key, skip_reason(exc)))
            continue
        spacing[key] = getattr(source, "spacing_of", lambda r: None)(ref)
    skipped = len(reasons)
    if not arrays:
        raise UsageError(f"no decodable sample in {src!r}: {summary_line(0, reasons, where='').split('; ', 1)[-1]}")
    volumetric = sample_mode(source).volumetric
    own = getattr(source, "orientation", None)  # a source that reorients its arrays says how
    meta = {
        "axes": "C,D,H,W" if volumetric else "C,H,W",
        "orientation": own() if callable(own) else (
            ORIENTATION if sample_mode(source).mode != "slice" else "as stored (rows, columns)"),
        "values": ("float32 values before windowing (modality values, e.g. HU for CT)" if raw
                   else "float32 in [0, 1] after the window, as training decodes them (before resizing)"),
        "spacing_mm": spacing,
        "spacing_order": "[dz, dy, dx] for volumes, [dy, dx] for images; null where the source does not know",
        "preprocessing": source.describe(),
        "skipped": skipped,
        "samples_named_by": NAMED_BY[ids],
    }
    if volumetric:
        meta["padding"] = PADDING_RAW if raw else "0 (in [0, 1], after the window)"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, __meta__=np.array(json.dumps(meta, default=str)), **arrays)

    write_atomic(out, write, suffix=".npz")
    return {"samples": len(arrays), "skipped": skipped, "out": str(out), "raw": raw}
