"""A source's pixels to what the first pass stores: uint16 ``round(x * 65535)``, refusing (as a
skip reason naming the source) values outside [0, 1] that clipping would silently change."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: stored pixel = round(x * SCALE) for x in [0, 1]
SCALE = 65535.0
#: how far outside [0, 1] a pixel may be and still be stored, clipped: float rounding in the source
#: and in the antialiased resize (measured up to ~2e-6 on large downscales) stays far below it, while
#: what it is there to catch (a source scaling to 0-255, or 0-1.01) is far above
UNIT_TOLERANCE = 1e-3


def to_uint16(x: np.ndarray, source: Any) -> np.ndarray | str:
    """``x`` (floats in [0, 1]) as uint16 ``round(x * SCALE)`` (a new array: the source's stays as
    it is), or the skip reason of a sample with NaN, inf or values beyond [0, 1] by more than
    :data:`UNIT_TOLERANCE` (a source scaling to 0-255, say), naming ``source`` (its scheme): clipped,
    it would train on white (or black) images and record their statistics."""
    y = np.multiply(x, SCALE, dtype=np.result_type(x, np.float32))
    lo, hi = float(y.min()), float(y.max())
    if not (lo >= -UNIT_TOLERANCE * SCALE and hi <= (1 + UNIT_TOLERANCE) * SCALE):  # NaN fails too
        seen = "NaN" if math.isnan(lo) or math.isnan(hi) else f"{lo / SCALE:.6g} to {hi / SCALE:.6g}"
        name = getattr(source, "scheme", None) or type(source).__name__
        return f"pixels outside [0, 1] from source {name!r}: {seen} (Source.load must return values in [0, 1])"
    np.rint(y, out=y)
    np.clip(y, 0, SCALE, out=y)
    return y.astype(np.uint16)
