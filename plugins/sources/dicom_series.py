"""DICOM series to volumes: grouping, spatial order, geometry checks, mosaics, enhanced files.

Pure functions over header dicts (:func:`geometry`, stored by the ``dicom`` source next
to its other header facts) and over arrays, so each step is testable on its own:

* :func:`assemble` groups single-frame files by series (salted hash of SeriesInstanceUID),
  splits a series whose files disagree on orientation, size or pixel spacing (and says
  so), and orders the slices by the projection of ImagePositionPatient on the slice
  normal (the cross product of the two ImageOrientationPatient rows), never by file name
  or InstanceNumber;
* :func:`check_spacing` reports duplicate positions, missing slices (a gap that is a
  multiple of the series' step), non-uniform spacing and :func:`gantry_tilt`;
* a Siemens mosaic (ImageType holds ``MOSAIC``) is one volume whose slices are tiles of
  the stored image (:func:`mosaic_count`, :func:`cut_mosaic`);
* an enhanced multi-frame file is one volume ordered by its per-frame Plane Position
  functional groups.

Axis convention of every volume: ``(D, H, W)`` = (ascending along the slice normal,
image rows, image columns), as the series is displayed; spacing is ``(dz, dy, dx)`` mm.
No identifier is kept: series and volume keys are salted hashes.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

SERIES_SALT = b"sslkit-series-v1"
#: positions closer than this (mm) along the normal are duplicates
DUPLICATE_MM = 1e-3
#: relative deviation of a step from the series' step that counts as non-uniform
UNIFORM_TOLERANCE = 0.01


def series_key(value: str) -> str:
    """A non-identifying key for a series (salted hash, 16 hex digits)."""
    return hashlib.sha256(SERIES_SALT + value.encode()).hexdigest()[:16]


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


def geometry(ds: Any, fallback_key: str) -> dict[str, Any]:
    """Geometry facts of a header (no pixels needed, no identifiers kept).

    ``series_key`` (salted), ``position`` [x, y, z], ``orientation`` (6 direction
    cosines), ``pixel_spacing`` [row, column] mm, ``slice_step`` (SpacingBetweenSlices,
    else SliceThickness), ``mosaic`` (slices in a Siemens mosaic, 0 if not one), and for
    enhanced multi-frame files ``frame_positions`` (one [x, y, z] per frame).
    """
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    out: dict[str, Any] = {
        "series_key": series_key(uid or fallback_key),
        "position": _floats(ds.get("ImagePositionPatient"), 3),
        "orientation": _floats(ds.get("ImageOrientationPatient"), 6),
        "pixel_spacing": _floats(ds.get("PixelSpacing"), 2),
        "slice_step": _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness")),
        "mosaic": 0,
        "frame_positions": None,
    }
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" in image_type:
        out["mosaic"] = mosaic_count(ds) or 0
        out["acquisition_tile"] = acquisition_tile(ds)
        if not out["mosaic"] and out["acquisition_tile"]:
            side = int(ds.Rows) // out["acquisition_tile"][0]
            out["mosaic"] = -side * side  # negative: the count is the whole grid, not read from the file
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        positions = [_floats(_group_value(f, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
                     for f in per_frame]
        if positions and all(p is not None for p in positions):
            out["frame_positions"] = positions
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


def mosaic_count(ds: Any) -> int | None:
    """Slices in a Siemens mosaic: ``NumberOfImagesInMosaic`` from (0019,xx0A), else the
    CSA image header (read with :mod:`nibabel.nicom.csareader` when nibabel is installed).
    None when neither is there (then the non-empty tiles are counted)."""
    creator_el = _private_start(ds, 0x0019, "SIEMENS MR HEADER")
    if creator_el is not None:
        el = ds.get((0x0019, creator_el + 0x0A))
        if el is not None:
            try:
                value = el.value
                n = int.from_bytes(value[:2], "little") if isinstance(value, bytes) else int(value)
                if n > 0:
                    return n
            except (TypeError, ValueError):
                pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader
        n = csareader.get_n_mosaic(csareader.get_csa_header(ds, "image"))
        return int(n) if n else None
    except Exception:  # nibabel missing, no CSA header, or an unreadable one
        return None


def _private_start(ds: Any, group: int, creator: str) -> int | None:
    for elem in range(0x10, 0x100):
        el = ds.get((group, elem))
        if el is not None and str(el.value).strip() == creator:
            return elem << 8
    return None


def mosaic_grid(rows: int, columns: int, n: int, tile: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """``(tiles per side, tile height, tile width)`` of a mosaic of ``n`` slices.

    Siemens lays the slices out row-major on a square grid of ``ceil(sqrt(n))`` tiles per
    side; ``tile`` (from the acquisition matrix) is used when ``n`` is unknown.
    """
    if n > 0:
        side = math.ceil(math.sqrt(n))
        return side, rows // side, columns // side
    if tile:
        return rows // tile[0], tile[0], tile[1]
    raise ValueError("mosaic without NumberOfImagesInMosaic or acquisition matrix")


def cut_mosaic(image: np.ndarray, n: int, tile: tuple[int, int] | None = None) -> np.ndarray:
    """A mosaic ``(..., R, C)`` -> its first ``n`` tiles ``(..., n, R/s, C/s)``, row-major.

    ``n <= 0``: the slice count is unknown; the grid comes from ``tile`` and every tile is kept.
    """
    rows, cols = image.shape[-2:]
    side, h, w = mosaic_grid(rows, cols, n, tile)
    lead = image.shape[:-2]
    grid = image[..., : side * h, : side * w].reshape(*lead, side, h, side, w)
    tiles = np.moveaxis(grid, -3, -2).reshape(*lead, side * side, h, w)
    return tiles[..., : (n if n > 0 else side * side), :, :]


def acquisition_tile(ds: Any) -> tuple[int, int] | None:
    """In-plane size of one mosaic slice from AcquisitionMatrix (frequency/phase rows, cols)."""
    m = ds.get("AcquisitionMatrix")
    try:
        fr, fc, pr, pc = (int(v) for v in m)
    except (TypeError, ValueError):
        return None
    rows, cols = (fr or pr), (fc or pc)
    return (rows, cols) if rows and cols else None


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
    ``(dz, dy, dx)`` in mm (1.0 where the header does not say).
    """

    key: str
    group: str
    slices: list[tuple[str, int | None, int | None]]
    spacing: tuple[float, float, float]
    rows: int
    columns: int
    issues: list[str] = field(default_factory=list)
    mosaic: int = 0  # slices per mosaic (negative: -tiles of the grid, count unknown), 0 if not a mosaic

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


def assemble(headers: dict[str, dict[str, Any]]) -> list[Volume]:
    """Volumes from ``{path: header}`` (headers as the ``dicom`` source reads them).

    A mosaic file or an enhanced multi-frame file with per-frame positions is a volume of
    its own; single-frame files of one series with positions and orientation form one
    volume per consistent layout; anything else (a radiograph, a cine loop) is a volume
    of its frames in stored order, flagged ``"no slice geometry"``.
    """
    volumes: list[Volume] = []
    series: dict[str, list[str]] = {}
    for path, h in headers.items():
        if h.get("mosaic") and h["frames"] == 1:
            volumes.append(_mosaic_volume(path, h))
        elif h.get("frame_positions") and h.get("orientation") and h["frames"] > 1:
            volumes.append(_enhanced_volume(path, h))
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
            vol = _series_volume(key if len(layouts) == 1 else f"{key}.{i}", part, headers)
            if len(layouts) > 1:
                vol.issues.append(f"series split into {len(layouts)} volumes (orientation, size or pixel spacing differ)")
            volumes.append(vol)
    return volumes


def _series_volume(key: str, paths: list[str], headers: dict[str, dict[str, Any]]) -> Volume:
    first = headers[paths[0]]
    orientation = first["orientation"]
    positions = np.array([headers[p]["position"] for p in paths], float)
    order, dist = order_slices(positions, orientation)
    report = check_spacing(dist)
    keep = [i for i in range(len(order)) if i not in set(report.duplicates)]
    slices = [(paths[order[i]], None, None) for i in keep]
    issues = report.issues()
    tilt = gantry_tilt(positions[order], orientation)
    if tilt > 0.1:
        issues.append(f"gantry tilt {tilt:.1f} degrees (not corrected)")
    step = report.step or first.get("slice_step") or 1.0
    return Volume(key, first["group"], slices, (float(step), *_in_plane(first)), first["rows"], first["columns"], issues)


def _enhanced_volume(path: str, h: dict[str, Any]) -> Volume:
    positions = np.array(h["frame_positions"], float)
    order, dist = order_slices(positions, h["orientation"])
    report = check_spacing(dist)
    keep = [int(order[i]) for i in range(len(order)) if i not in set(report.duplicates)]
    issues = report.issues()
    tilt = gantry_tilt(positions[order], h["orientation"])
    if tilt > 0.1:
        issues.append(f"gantry tilt {tilt:.1f} degrees (not corrected)")
    step = report.step or h.get("slice_step") or 1.0
    return Volume(series_key(path), h["group"], [(path, f, None) for f in keep], (float(step), *_in_plane(h)),
                  h["rows"], h["columns"], issues)


def _mosaic_volume(path: str, h: dict[str, Any]) -> Volume:
    n = h["mosaic"]
    tile = tuple(h["acquisition_tile"]) if h.get("acquisition_tile") else None
    _, th, tw = mosaic_grid(h["rows"], h["columns"], n, tile)
    issues = [] if n > 0 else ["mosaic slice count not in the header: every tile of the grid kept"]
    return Volume(series_key(path), h["group"], [(path, None, t) for t in range(abs(n))],
                  (float(h.get("slice_step") or 1.0), *_in_plane(h)), th, tw, issues, mosaic=n)
