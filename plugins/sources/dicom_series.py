"""DICOM series to volumes: grouping, spatial order, geometry checks, mosaics, enhanced files.

Pure functions over header dicts (:func:`geometry`, stored by the ``dicom`` source next
to its other header facts) and over arrays, so each step is testable on its own:

* :func:`assemble` groups single-frame files by series (:func:`series_key`: a keyed
  hash of SeriesInstanceUID under this user's secret), splits a series whose files
  disagree on orientation, size or pixel spacing (and says so), splits a multi-echo or
  dynamic series whose positions repeat into one volume per echo / time point
  (:func:`split_repeats`: EchoNumbers, TemporalPositionIdentifier, TriggerTime,
  AcquisitionNumber), and orders the slices by the projection of ImagePositionPatient on
  the slice normal (the cross product of the two ImageOrientationPatient rows), never by
  file name or InstanceNumber;
* :func:`check_spacing` reports duplicate positions, missing slices (a gap that is a
  multiple of the series' step), non-uniform spacing and :func:`gantry_tilt`;
* a Siemens mosaic (ImageType holds ``MOSAIC``) is one volume whose slices are tiles of
  the stored image, each at its own position (:mod:`.dicom_mosaic`), ordered by them;
* an enhanced multi-frame file is one volume ordered by its per-frame Plane Position
  functional groups.

Axis convention of every volume: ``(D, H, W)`` = (ascending along the slice normal,
image rows, image columns), as the series is displayed; spacing is ``(dz, dy, dx)`` mm.
No identifier is kept: series and volume keys are keyed hashes (HMAC-SHA256, :func:`sslkit.api.keyed_hash`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sslkit.api import file_key, keyed_hash
from sslkit_plugins.sources.dicom_repeats import REPEATS, frame_facts, label, split_repeats
from sslkit_plugins.sources.dicom_mosaic import (acquisition_tile, csa_image_header, csa_slice_normal,  # noqa: F401
                                                 cut_mosaic, mosaic_count, mosaic_grid, mosaic_layout,
                                                 mosaic_positions)
from sslkit_plugins.sources.dicom_values import has, value

#: positions closer than this (mm) along the normal are duplicates
DUPLICATE_MM = 1e-3
#: relative deviation of a step from the series' step that counts as non-uniform
UNIFORM_TOLERANCE = 0.01


def series_key(value: str) -> str:
    """A non-linkable key for a series (16 hex digits): HMAC-SHA256 of its SeriesInstanceUID
    (or file) under this user's secret (:func:`sslkit.api.keyed_hash`), so nobody holding
    the UID can recompute it; stable for as long as the secret is."""
    return keyed_hash(value, "dicom-series")


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def geometry(ds: Any, path: Path) -> dict[str, Any]:
    """Geometry facts of a header (no pixels needed, no identifiers kept).

    ``series_key`` (keyed hash), ``position`` [x, y, z], ``orientation`` (6 direction
    cosines), ``pixel_spacing`` [row, column] mm, ``slice_step`` (SpacingBetweenSlices,
    else SliceThickness), ``echo`` / ``temporal`` / ``trigger`` / ``acquisition``
    (EchoNumbers, TemporalPositionIdentifier, TriggerTime, AcquisitionNumber: what tells
    the volumes of a multi-echo or dynamic series apart), ``mosaic`` (slices in a Siemens
    mosaic, 0 if not one; with ``csa_normal``, the CSA SliceNormalVector), and for
    enhanced multi-frame files ``frame_positions`` (one [x, y, z] per frame).
    """
    uid = str(value(ds, "SeriesInstanceUID", "") or "")
    out: dict[str, Any] = {
        "series_key": series_key(uid or str(path.resolve())),  # no UID: the file is its own series
        "position": _floats(value(ds, "ImagePositionPatient"), 3),
        "orientation": _floats(value(ds, "ImageOrientationPatient"), 6),
        "pixel_spacing": _floats(value(ds, "PixelSpacing"), 2),
        "slice_step": _float(value(ds, "SpacingBetweenSlices")) or _float(value(ds, "SliceThickness")),
        "mosaic": 0,
        "frame_positions": None,
        **{name: label(value(ds, keyword)) for name, keyword, _ in REPEATS},
    }
    image_type = [str(v).upper() for v in (value(ds, "ImageType") or [])]
    if "MOSAIC" in image_type:
        csa = csa_image_header(ds)
        out["csa_normal"] = csa_slice_normal(csa)
        out["acquisition_tile"] = acquisition_tile(ds)
        try:  # a count that contradicts the image: the acquisition matrix's grid, or unusable
            out["mosaic"], issue = mosaic_layout(int(ds.Rows), int(ds.Columns), mosaic_count(ds, csa),
                                                 out["acquisition_tile"])  # negative: the whole grid
            if issue:
                out["mosaic_issue"] = issue
        except ValueError as exc:
            out["mosaic_error"] = str(exc)  # one image in slice mode; skipped where it would be cut
    shared = ds.get("SharedFunctionalGroupsSequence") if has(ds, "SharedFunctionalGroupsSequence") else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") if has(ds, "PerFrameFunctionalGroupsSequence") else None
    if per_frame:
        positions = [_floats(_group_value(f, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
                     for f in per_frame]
        if positions and all(p is not None for p in positions):
            out["frame_positions"] = positions
            out["frame_facts"] = frame_facts(per_frame)
        first = per_frame[0]
        out["orientation"] = out["orientation"] or _floats(
            _group_value(first, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        out["pixel_spacing"] = out["pixel_spacing"] or _floats(
            _group_value(first, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        out["slice_step"] = out["slice_step"] or _float(
            _group_value(first, shared, "PixelMeasuresSequence", "SpacingBetweenSlices")) or _float(
            _group_value(first, shared, "PixelMeasuresSequence", "SliceThickness"))
    return out


def _group_value(frame_group: Any, shared: Any, sequence: str, keyword: str) -> Any:
    """``keyword`` from ``sequence`` of a per-frame functional group, else the shared one."""
    for group in (frame_group, shared[0] if shared else None):
        if group is not None and group.get(sequence):
            item = group.get(sequence)[0]
            if keyword in item:
                return item.get(keyword)
    return None


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of a slice: cross product of the row and column direction cosines."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    n = np.cross(row, col)
    return n / (np.linalg.norm(n) or 1.0)


def order_slices(positions: np.ndarray, orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``positions (N, 3)`` -> (order, sorted distances along the normal) (stable)."""
    d = np.asarray(positions, float) @ slice_normal(orientation)
    order = np.argsort(d, kind="stable")
    return order, d[order]


def gantry_tilt(positions: np.ndarray, orientation: Sequence[float]) -> float:
    """Angle (degrees) between the stacking direction of ordered ``positions`` and the normal."""
    if len(positions) < 2:
        return 0.0
    v = np.asarray(positions[-1], float) - np.asarray(positions[0], float)
    norm = np.linalg.norm(v)
    if norm == 0:
        return 0.0
    cos = abs(float(v @ slice_normal(orientation))) / norm
    return math.degrees(math.acos(min(1.0, cos)))


@dataclass
class SpacingReport:
    """What :func:`check_spacing` found in sorted distances along the normal."""

    step: float | None  # the series' slice step (mm), None for fewer than two distinct slices
    duplicates: list[int] = field(default_factory=list)  # sorted indices repeating the previous position
    missing: int = 0  # slices missing in gaps that are multiples of the step
    non_uniform: bool = False

    def issues(self) -> list[str]:
        out = []
        if self.duplicates:
            out.append(f"{len(self.duplicates)} duplicate slice positions (kept the first)")
        if self.missing:
            out.append(f"{self.missing} missing slices (gaps of a multiple of the {self.step:g} mm step)")
        if self.non_uniform:
            out.append("non-uniform slice spacing")
        return out


def check_spacing(distances: np.ndarray) -> SpacingReport:
    """Duplicates, missing slices and non-uniform steps of sorted distances (mm)."""
    d = np.asarray(distances, float)
    diffs = np.diff(d)
    duplicates = [i + 1 for i, g in enumerate(diffs) if g < DUPLICATE_MM]
    steps = diffs[diffs >= DUPLICATE_MM]
    if not len(steps):
        return SpacingReport(None, duplicates)
    step = float(np.median(steps))
    ratios = steps / step
    multiples = np.rint(ratios)
    missing = int(np.sum(np.maximum(multiples - 1, 0)[multiples >= 2]))
    off = np.abs(ratios - np.maximum(multiples, 1)) > UNIFORM_TOLERANCE
    non_uniform = bool(np.any(off | (multiples < 1)))
    return SpacingReport(round(step, 6), duplicates, missing, non_uniform)


@dataclass
class Volume:
    """One volume: its slices in spatial order and what was found about them.

    ``slices`` are ``(path, frame, tile)``: the file, the frame of a multi-frame file (None
    for single-frame) and the tile of a mosaic (None otherwise). ``spacing`` is
    ``(dz, dy, dx)`` in mm (1.0 where the header does not say). ``positions``: the
    ImagePositionPatient of each slice, in the same order (None without slice geometry);
    ``distances``: each slice's position along the slice normal in mm, ascending (None
    without slice geometry): volume mode resamples along them, so a missing slice is
    interpolated across (:func:`sslkit.api.volume_fit`), not stacked as if the step were even.
    """

    key: str
    group: str
    slices: list[tuple[str, int | None, int | None]]
    spacing: tuple[float, float, float]
    rows: int
    columns: int
    issues: list[str] = field(default_factory=list)
    mosaic: int = 0  # slices per mosaic (negative: -tiles of the grid, count unknown), 0 if not a mosaic
    positions: list[list[float]] | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of slices left out: repeats
    distances: list[float] | None = None

    @property
    def depth(self) -> int:
        return len(self.slices)


def _in_plane(h: dict[str, Any]) -> tuple[float, float]:
    ps = h.get("pixel_spacing") or [1.0, 1.0]
    return float(ps[0]), float(ps[1])


def _layout(h: dict[str, Any]) -> tuple:
    """What every slice of one volume must share: orientation, size, pixel spacing (rounded)."""
    o = h.get("orientation")
    return (tuple(round(v, 3) for v in o) if o else None, h["rows"], h["columns"],
            tuple(round(v, 3) for v in _in_plane(h)))


def assemble(headers: dict[str, dict[str, Any]], root: str | Path | None = None) -> list[Volume]:
    """Volumes from ``{path: header}`` (headers as the ``dicom`` source reads them).

    A mosaic file or an enhanced multi-frame file with per-frame positions is a volume of
    its own (an enhanced file with several echoes / time points: one per echo / time point);
    single-frame files of one series with positions and orientation form one
    volume per consistent layout, and one per echo / time point where positions repeat
    (:func:`split_repeats`); anything else (a radiograph, a cine loop) is a volume of its
    frames in stored order, flagged ``"no slice geometry"``. A slice dropped as a repeat is named
    in its reason by the keyed hash of its path below ``root`` (as reports name files), else not.
    """
    volumes: list[Volume] = []
    series: dict[str, list[str]] = {}
    for path, h in headers.items():
        if h.get("mosaic") and h["frames"] == 1:
            volumes.append(_mosaic_volume(path, h))
        elif h.get("frame_positions") and h.get("orientation") and h["frames"] > 1:
            volumes += _enhanced_volumes(path, h)
        elif h["frames"] == 1 and h.get("position") and h.get("orientation"):
            series.setdefault(h["series_key"], []).append(path)
        else:
            frames = [None] if h["frames"] == 1 else list(range(h["frames"]))
            volumes.append(Volume(series_key(path), h["group"], [(path, f, None) for f in frames],
                                  (1.0, *_in_plane(h)), h["rows"], h["columns"], ["no slice geometry"]))
    for key, paths in series.items():
        layouts: dict[tuple, list[str]] = {}
        for p in paths:
            layouts.setdefault(_layout(headers[p]), []).append(p)
        for i, part in enumerate(sorted(layouts.values(), key=len, reverse=True)):
            layout_key = key if len(layouts) == 1 else f"{key}.{i}"
            positions = np.array([headers[p]["position"] for p in part], float)
            repeats, names = split_repeats(positions, [headers[p] for p in part], headers[part[0]]["orientation"])
            for suffix, text, indices in repeats:
                vol = _series_volume(layout_key + suffix, [part[j] for j in indices], headers, root)
                if len(layouts) > 1:
                    vol.issues.append(f"series split into {len(layouts)} volumes (orientation, size or pixel "
                                      f"spacing differ)")
                if len(repeats) > 1:
                    vol.issues.append(f"{text}: one of {len(repeats)} volumes of a series split by "
                                      f"{' and '.join(names)} (positions repeat)")
                volumes.append(vol)
    return volumes


@dataclass
class Ordered:
    """What :func:`_ordered` found: kept indices in spatial order, their distances along the
    normal (mm), the slice step, the issues, and ``{dropped index: the kept index it repeats}``."""

    keep: list[int]
    distances: list[float]
    step: float
    issues: list[str]
    repeats: dict[int, int]


def _ordered(positions: np.ndarray, orientation: Sequence[float], fallback_step: float | None) -> Ordered:
    """Indices of ``positions`` in spatial order (repeats dropped), with what was found (:class:`Ordered`)."""
    order, dist = order_slices(positions, orientation)
    report = check_spacing(dist)
    dup = set(report.duplicates)
    keep, kept_dist, repeats = [], [], {}
    for i in range(len(order)):
        if i in dup:
            repeats[int(order[i])] = keep[-1]
        else:
            keep.append(int(order[i]))
            kept_dist.append(float(dist[i]))
    issues = report.issues()
    tilt = gantry_tilt(positions[order], orientation)
    if tilt > 0.1:
        issues.append(f"gantry tilt {tilt:.1f} degrees (not corrected)")
    return Ordered(keep, kept_dist, float(report.step or fallback_step or 1.0), issues, repeats)


def _series_volume(key: str, paths: list[str], headers: dict[str, dict[str, Any]],
                   root: str | Path | None = None) -> Volume:
    first = headers[paths[0]]
    positions = np.array([headers[p]["position"] for p in paths], float)
    found = _ordered(positions, first["orientation"], first.get("slice_step"))
    dropped = [(paths[i], "slice position repeated in its series: " + (
        f"{_file_key(paths[k], root)}'s is used" if root is not None else "another slice's is used"))
        for i, k in found.repeats.items()]
    return Volume(key, first["group"], [(paths[i], None, None) for i in found.keep], (found.step, *_in_plane(first)),
                  first["rows"], first["columns"], found.issues, positions=positions[found.keep].tolist(),
                  dropped=dropped, distances=found.distances)


def _file_key(path: str, root: str | Path) -> str:
    """``path`` as data_report.json names a file (file and folder names can carry patient names)."""
    return file_key(os.path.relpath(path, Path(root).expanduser()))


def _enhanced_volumes(path: str, h: dict[str, Any]) -> list[Volume]:
    """An enhanced file's frames in spatial order: one volume, or one per echo / time point
    when its positions repeat (:func:`split_repeats` on the per-frame functional groups)."""
    positions = np.array(h["frame_positions"], float)
    facts = h.get("frame_facts") or [{}] * len(positions)
    parts, names = split_repeats(positions, facts, h["orientation"])
    out = []
    for suffix, text, frames in parts:
        found = _ordered(positions[frames], h["orientation"], h.get("slice_step"))
        if len(parts) > 1:
            found.issues.append(f"{text}: one of {len(parts)} volumes of a file split by {' and '.join(names)} "
                                f"(positions repeat)")
        out.append(Volume(series_key(path) + suffix, h["group"], [(path, frames[i], None) for i in found.keep],
                          (found.step, *_in_plane(h)), h["rows"], h["columns"], found.issues,
                          positions=positions[[frames[i] for i in found.keep]].tolist(), distances=found.distances))
    return out


def _mosaic_volume(path: str, h: dict[str, Any]) -> Volume:
    """The tiles of a mosaic, ordered by their own positions (:func:`mosaic_positions`) where
    the header gives position and orientation, else in stored order."""
    n = h["mosaic"]
    tile = tuple(h["acquisition_tile"]) if h.get("acquisition_tile") else None
    _, th, tw = mosaic_grid(h["rows"], h["columns"], n, tile)
    issues = [h["mosaic_issue"]] if h.get("mosaic_issue") else []
    step = float(h.get("slice_step") or 1.0)
    keep, positions, distances = list(range(abs(n))), None, None
    if h.get("position") and h.get("orientation"):
        pos = mosaic_positions(h["position"], h["orientation"], _in_plane(h), (h["rows"], h["columns"]), (th, tw),
                               abs(n), step, h.get("csa_normal"))
        found = _ordered(pos, h["orientation"], step)
        keep, step, distances = found.keep, found.step, found.distances
        issues += found.issues
        positions = pos[keep].tolist()
    return Volume(series_key(path), h["group"], [(path, None, t) for t in keep], (step, *_in_plane(h)), th, tw,
                  issues, mosaic=n, positions=positions, distances=distances)
