"""Native pixel arrays to float32 in [0, 1], the one rule of the image sources (``folder``,
``npz``): integers by their type's range, floats and wide integers by their own min-max,
NaN or inf refused; with box means for images reduced while decoding."""

from __future__ import annotations

import math

import numpy as np

from sslkit.data.source import Undecodable

#: the skip reason of a float image with NaN or inf pixels
NON_FINITE = "holds NaN or inf values"
_F32_MAX = float(np.finfo(np.float32).max)
#: values a band of :func:`_wide_scaled` holds (its float64 temporaries: 16 MB)
WIDE_BAND = 2**21


def unit_floats(a: np.ndarray, f: int = 1) -> np.ndarray:
    """Native pixels ``(C, H, W)`` (or ``(H, W)``) -> float32 in [0, 1]: uint8 / 255, uint16 /
    65535, bool as 0 / 1, floats and wide integers by their own min-max (NaN or inf:
    ``Undecodable``; a float64 range beyond float32's is scaled in float64); box means over
    ``f x f`` (:func:`box_reduce`) first when ``f > 1``. The one pixels-to-[0, 1] rule of the
    image sources (``folder``, ``npz``); always a new array."""
    if a.size == 0:
        raise Undecodable(f"empty image of shape {tuple(a.shape)}")
    kind = a.dtype.newbyteorder("=")  # a big-endian uint16 ('>u2') is uint16 too
    own_range = kind not in (np.uint8, np.uint16, np.bool_)
    if own_range:
        lo, hi = float(a.min()), float(a.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise Undecodable(NON_FINITE)
        if max(-lo, hi, hi - lo) > _F32_MAX:  # beyond float32: scaled in float64, a band of rows at a time
            y = _wide_scaled(a, lo, hi)
            return box_reduce(y if y.ndim == 3 else y[None], f) if f > 1 else y
        lo, hi = float(np.float32(lo)), float(np.float32(hi))  # as float32 holds them
    x = box_reduce(a if a.ndim == 3 else a[None], f) if f > 1 else _float32_copy(a)
    if kind == np.uint8:
        x /= 255.0
    elif kind == np.uint16:
        x /= 65535.0
    elif own_range and hi > lo:
        x -= lo
        x /= hi - lo
    elif own_range:
        x[...] = 0.0
    return x


def box_reduce(a: np.ndarray, f: int) -> np.ndarray:
    """``(C, H, W)`` of any number type -> float32 ``(C, ceil(H/f), ceil(W/f))``: the mean of
    each ``f x f`` box (of what an edge box holds), a band of rows at a time (about 16 MB of float)."""
    c, h, w = a.shape
    cols = np.arange(0, w, f)
    out = np.empty((c, len(range(0, h, f)), len(cols)), np.float32)
    band = f * max(1, 2**21 // max(1, c * w * f))  # reduceat may cast a band to float64 whole
    for top in range(0, h, band):
        part = np.add.reduceat(a[:, top : top + band], cols, axis=2, dtype=np.float64)
        part = np.add.reduceat(part, np.arange(0, part.shape[1], f), axis=1)
        out[:, top // f : top // f + part.shape[1]] = part
    rows_n = np.minimum(f, h - np.arange(0, h, f))
    cols_n = np.minimum(f, w - cols)
    out /= (rows_n[:, None] * cols_n[None, :]).astype(np.float32)
    return out


def _wide_scaled(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(a - lo) / (hi - lo)`` (zeros where ``hi == lo``) as a new float32 array, computed in float64
    a band of rows at a time: its float64 temporaries are a band's (about 16 MB), not the image's."""
    y = np.zeros(a.shape, np.float32)
    if hi > lo:
        x, out = (a, y) if a.ndim == 3 else (a[None], y[None])  # views: any layout, no copy
        band = max(1, WIDE_BAND // max(1, x.shape[0] * x.shape[2]))
        for top in range(0, x.shape[1], band):
            part = x[:, top : top + band].astype(np.float64)
            part -= lo
            part /= hi - lo
            out[:, top : top + band] = part
    return y


def _float32_copy(a: np.ndarray) -> np.ndarray:
    """``a`` as a new C-contiguous float32 array (one copy, whatever ``a``'s layout)."""
    x = np.empty(a.shape, np.float32)
    np.copyto(x, a, casting="unsafe")
    return x
