"""The window stage of DICOM decoding (DICOM PS3.4 N.2, VOI LUT): ``--window`` parsed into
:class:`Window` objects, and one window mapping modality values to [0, 1].

* ``auto``: the file's own first VOI window (or VOI LUT); min-max when it has none;
* ``minmax``: the image's own range;
* ``W,L`` or a preset (:data:`PRESETS`: ``lung``, ``mediastinum``, ``bone``, ``brain``, ``abdomen``...):
  a linear window of width ``W`` centred on level ``L``.

Explicit windows are applied as pydicom's ``apply_windowing`` applies a VOI module holding only
that window, 16-bit unsigned output range: LINEAR and LINEAR_EXACT by :func:`linear_window`, the same
float64 arithmetic without its masked copies (bit-equal, ~4x faster: tests/test_cache_first_pass.py).
SIGMOID and VOI LUTs go through pydicom.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi, apply_windowing

from sslkit.api import UsageError


#: CT windows in Hounsfield units: name -> (width, level). Common radiology defaults.
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "abdomen": (400.0, 50.0),
    "liver": (150.0, 30.0),
    "subdural": (200.0, 75.0),
    "stroke": (40.0, 40.0),
}

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)"


@dataclass(frozen=True)
class Window:
    """One intensity mapping to [0, 1]: ``auto``, ``minmax`` or a linear ``width``/``level``."""

    name: str
    width: float | None = None
    level: float | None = None

    def describe(self) -> str:
        if self.width is None:
            return self.name
        return f"{self.name} (W {self.width:g}, L {self.level:g})" if self.name != "custom" else f"W {self.width:g}, L {self.level:g}"


def parse_windows(text: str) -> tuple[Window, ...]:
    """``"auto"``, ``"minmax"``, ``"400,40"`` (W,L), ``"lung"`` or ``"lung,mediastinum,bone"``.

    Items of a stack may also be ``W:L`` (``"1500:-600,350:50,1800:400"``). A stack
    gives one channel per window; 1 or 3 windows are allowed (the channel counts a
    backbone takes).
    """
    text = (text or "auto").strip().lower().replace(" ", "")
    m = re.fullmatch(f"({_NUM}),({_NUM})", text)
    if m:
        return (_linear("custom", m.group(1), m.group(2)),)
    windows = []
    for item in text.split(","):
        if item in ("auto", "minmax"):
            windows.append(Window(item))
        elif item in PRESETS:
            windows.append(Window(item, *PRESETS[item]))
        elif m := re.fullmatch(f"({_NUM}):({_NUM})", item):
            windows.append(_linear("custom", m.group(1), m.group(2)))
        else:
            raise UsageError(
                f"window {item!r} is not auto, minmax, W,L (e.g. 400,40), W:L or a preset "
                f"({', '.join(PRESETS)})"
            )
    if len(windows) not in (1, 3):
        raise UsageError(f"--window stacks 1 or 3 windows (one per channel), got {len(windows)}: {text!r}")
    return tuple(windows)


def _linear(name: str, width: str, level: str) -> Window:
    w, lvl = float(width), float(level)
    if not w > 0:
        raise UsageError(f"window width must be > 0, got {width}")
    return Window(name, w, lvl)


def apply_window(values: np.ndarray, ds: Dataset, window: Window) -> np.ndarray:
    """Modality values ``(H, W)`` -> float32 ``(H, W)`` in [0, 1] with one window."""
    if window.name == "auto":
        voi = own_window(ds)
        if voi is not None:
            return _windowed(values, voi)
        if ds.get("VOILUTSequence"):
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            lut_in = np.rint(values).astype(np.int64)  # LUTs index stored/modality values
            return _unit(apply_voi(lut_in, ds).astype(np.float32) / float(2**bits - 1))
        return _minmax(values)
    if window.name == "minmax":
        return _minmax(values)
    return linear_window(values, window.width, window.level, "LINEAR_EXACT")


def _windowed(values: np.ndarray, voi: Dataset) -> np.ndarray:
    func = str(voi.VOILUTFunction).upper()
    if func in ("LINEAR", "LINEAR_EXACT"):
        return linear_window(values, float(voi.WindowWidth), float(voi.WindowCenter), func)
    return _unit(apply_windowing(values, voi).astype(np.float32) / 65535.0)


def linear_window(values: np.ndarray, width: float, level: float, function: str = "LINEAR_EXACT") -> np.ndarray:
    """A LINEAR / LINEAR_EXACT window (DICOM PS3.3 C.11.2.1.2) -> float32 in [0, 1].

    The arithmetic of pydicom's ``apply_windowing`` with a 16-bit unsigned output range,
    step for step in float64 (so the result is bit-equal to it divided by 65535), but on
    the whole array at once instead of through masked copies; NaN becomes 0 as in :func:`_unit`.
    """
    if function == "LINEAR":  # the DICOM default: centre - 0.5, width - 1
        level, width = level - 0.5, width - 1
    t = np.array(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # LINEAR width 1: a step at the level
        t -= level
        t /= width
        t += 0.5
        t *= 65535.0
        np.fmax(t, 0.0, out=t)  # fmax, not clip: NaN becomes 0 here, no nan_to_num pass
        np.fmin(t, 65535.0, out=t)
    out = t.astype(np.float32)
    out /= np.float32(65535.0)
    return out


def own_window(ds: Dataset) -> Dataset | None:
    """The file's first VOI window as a stand-alone VOI module (16-bit output), or None."""
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is not None and w is not None and c != "" and w != "":
        c = float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c)
        w = float(w[0] if isinstance(w, pydicom.multival.MultiValue) else w)
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if math.isfinite(c) and math.isfinite(w) and (w >= 1 or (w > 0 and func != "LINEAR")):
            return _voi_module(w, c, func)
    return None


def _voi_module(width: float, level: float, function: str) -> Dataset:
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.WindowWidth = float(width)
    voi.WindowCenter = float(level)
    voi.VOILUTFunction = function
    voi.BitsStored = 16
    voi.PixelRepresentation = 0  # output range [0, 65535]
    return voi


def _minmax(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to [0, 1] by its finite minimum and maximum (NaN -> 0, inf clipped); ValueError when none."""
    lo, hi = (float(x.min()), float(x.max())) if x.size and x.dtype == np.float32 else (math.nan, math.nan)
    if math.isfinite(lo) and math.isfinite(hi) and 0 < hi - lo < 1e30:
        # every value finite (min/max would be NaN or inf otherwise) and x - lo cannot
        # overflow: the general path's NaN and clip passes change nothing but a last-ulp 1
        out = (x - lo) / (hi - lo)
        return np.minimum(out, np.float32(1.0), out=out)
    finite = x[np.isfinite(x)]
    if x.size and not finite.size:
        raise ValueError("no finite pixel value (all NaN or inf)")
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return _unit((x - lo) / (hi - lo))


def _unit(x: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(x.astype(np.float32, copy=False)), 0.0, 1.0)
