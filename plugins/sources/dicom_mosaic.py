"""Siemens mosaics: how many slices a mosaic holds, how to cut it, and where each slice is.

A mosaic (ImageType holds ``MOSAIC``) stores the ``n`` slices of one volume as tiles of
one image, row-major on a square grid of ``ceil(sqrt(n))`` tiles per side. Its
ImagePositionPatient is that of the whole mosaic's first voxel, not of slice 1: the
real position of slice 1 is moved by half the difference between the mosaic and a
tile, in pixels, along the column and row directions (nibabel's
``MosaicWrapper.image_position``, the ``dicom_mosaic`` note of its docs; dcm2niix does the
same)::

    slice1 = IPP + col_cosine * PixelSpacing[0] * (mosaic_rows - rows) / 2
                 + row_cosine * PixelSpacing[1] * (mosaic_cols - cols) / 2

and slice ``k`` lies ``k * step`` further along the slice normal, which is the CSA
header's ``SliceNormalVector`` when there is one (it may point against the cross
product of the row and column cosines: then the tiles are stored top-down), else that
cross product. ``step`` is SpacingBetweenSlices, else SliceThickness.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np


def csa_image_header(ds: Any) -> dict | None:
    """The CSA image header (read with :mod:`nibabel.nicom.csareader`), None without one or nibabel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader
            return csareader.get_csa_header(ds, "image")
    except Exception:  # nibabel missing, no CSA header, or an unreadable one
        return None


def csa_slice_normal(csa: dict | None) -> list[float] | None:
    """``SliceNormalVector`` of a CSA header as a unit vector, None when absent or degenerate."""
    try:
        items = [float(v) for v in csa["tags"]["SliceNormalVector"]["items"]]
    except (TypeError, KeyError, ValueError):
        return None
    norm = math.sqrt(sum(v * v for v in items))
    return [v / norm for v in items] if len(items) == 3 and norm > 0 and math.isfinite(norm) else None


def mosaic_count(ds: Any, csa: dict | None = None) -> int | None:
    """Slices in a Siemens mosaic: ``NumberOfImagesInMosaic`` from (0019,xx0A), else the
    CSA image header. None when neither is there (then the non-empty tiles are counted)."""
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
        n = int(csa["tags"]["NumberOfImagesInMosaic"]["items"][0])  # type: ignore[index]
        return n if n > 0 else None
    except (TypeError, KeyError, IndexError, ValueError):
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


def mosaic_layout(rows: int, columns: int, n: int | None, tile: tuple[int, int] | None) -> tuple[int, str]:
    """The slice count to cut a ``rows x columns`` mosaic with, and an issue ('' when none).

    ``n`` (NumberOfImagesInMosaic) is kept when its square grid of ``ceil(sqrt(n))`` tiles
    per side divides the image evenly and, with ``tile`` (from AcquisitionMatrix), that many
    tiles of that size fit; otherwise (or without ``n``) the grid of ``tile`` is used where
    it cuts the image into a square grid of whole tiles, every tile kept (``-tiles``: the
    count is unknown), with an issue saying so (:data:`GRID_ISSUES`). Anything else (a count
    that does not fit, or none, and no such tile) raises ValueError with a one-line reason:
    an unusable mosaic (one image in slice mode, skipped where it would be cut).
    """
    if n and _fits(rows, columns, n, tile):
        return n, ""
    of = f" of {tile[1]}x{tile[0]} tiles" if tile else ""
    wrong = f"NumberOfImagesInMosaic {n} does not fit the {columns}x{rows} mosaic{of}" if n else ""
    if tile and _tile_grid(rows, columns, tile):
        return -_tile_grid(rows, columns, tile) ** 2, f"{wrong or GRID_ISSUES[1]}: every tile of the grid kept"
    if wrong:
        raise ValueError(f"unusable mosaic: {wrong} (and no AcquisitionMatrix tile fits it)")
    if tile:
        raise ValueError(f"unusable mosaic: {GRID_ISSUES[1]} and the {tile[1]}x{tile[0]} AcquisitionMatrix tile "
                         f"does not cut the {columns}x{rows} mosaic into a square grid of whole tiles")
    raise ValueError(f"unusable mosaic: {GRID_ISSUES[1]} and no AcquisitionMatrix tile")


#: how the issues of a mosaic cut by its AcquisitionMatrix grid start (they reach the run's data report)
GRID_ISSUES = ("NumberOfImagesInMosaic", "mosaic slice count not in the header")


def _tile_grid(rows: int, columns: int, tile: tuple[int, int]) -> int:
    """Tiles per side of the square grid that ``tile`` cuts ``rows x columns`` into, 0 where it
    does not cut it into whole tiles on a square grid (e.g. 32x16 tiles of a 64x64 image)."""
    if rows % tile[0] or columns % tile[1] or rows // tile[0] != columns // tile[1]:
        return 0
    return rows // tile[0]


def _fits(rows: int, columns: int, n: int, tile: tuple[int, int] | None) -> bool:
    """Whether ``n`` slices on a square grid cut ``rows x columns`` into whole, equal tiles."""
    side = math.ceil(math.sqrt(n))
    if side > min(rows, columns) or rows % side or columns % side:
        return False
    return tile is None or (side * tile[0] <= rows and side * tile[1] <= columns)


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


def mosaic_positions(position: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float],
                     mosaic_shape: tuple[int, int], tile: tuple[int, int], count: int, step: float,
                     normal: Sequence[float] | None = None) -> np.ndarray:
    """ImagePositionPatient of each of the ``count`` tiles, ``(count, 3)`` mm, in stored
    order (see the module docstring for the correction of slice 1 and the normal)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    (mrows, mcols), (rows, cols) = mosaic_shape, tile
    first = (np.asarray(position, float) + col * float(pixel_spacing[0]) * (mrows - rows) / 2
             + row * float(pixel_spacing[1]) * (mcols - cols) / 2)
    if normal is None:
        n = np.cross(row, col)
        normal = n / (np.linalg.norm(n) or 1.0)
    return first + np.arange(count)[:, None] * float(step) * np.asarray(normal, float)[None]
