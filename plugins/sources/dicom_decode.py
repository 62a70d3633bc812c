"""DICOM pixels to float32 ``(C, H, W)`` in [0, 1], through pydicom's own LUT functions.

Order of operations (DICOM PS3.4 N.2, the grayscale pipeline):

1. ``pixel_array(ds, index=frame)``: decode one frame with whatever codec the transfer
   syntax needs (pylibjpeg for JPEG, JPEG-LS, JPEG 2000, RLE); colour data comes back as
   RGB (pydicom's ``convert_color_space`` for YBR_FULL / YBR_FULL_422, planar
   configuration handled by the decoder).
2. ``apply_modality_lut``: RescaleSlope / RescaleIntercept or a Modality LUT Sequence, in
   float32, before any windowing (CT values become Hounsfield units); for enhanced
   multi-frame objects the frame's own values from the functional groups (:func:`frame_luts`).
3. One window per output channel, each through ``apply_windowing`` / ``apply_voi``:

   * ``auto``: the file's own first VOI window (or VOI LUT); min-max when it has none;
   * ``minmax``: the image's own range;
   * ``W,L`` or a preset (``lung``, ``mediastinum``, ``bone``, ``brain``, ``abdomen``...):
     a linear window of width ``W`` centred on level ``L``.

4. MONOCHROME1 is inverted *after* windowing, so high attenuation is bright in every window mode.
Explicit windows are applied as pydicom's ``apply_windowing`` applies a VOI module holding only
that window, 16-bit unsigned output range: LINEAR and LINEAR_EXACT by :func:`linear_window`, the same
float64 arithmetic without its masked copies (bit-equal, ~4x faster: tests/test_cache_first_pass.py).
SIGMOID and VOI LUTs go through pydicom.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sslkit.api import UsageError
from sslkit_plugins.sources.dicom_limits import check_stream_size, decode_checked, read_deflated
from sslkit_plugins.sources.dicom_reasons import mark_stage
from sslkit_plugins.sources.dicom_values import has


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

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
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


def read_dataset(path: str | BinaryIO, stop_before_pixels: bool = False) -> Dataset:
    """``dcmread`` of a path or an open file (opened once); files without a preamble / file meta are read
    with ``force=True``: one with no image attributes raises ``InvalidDicomError``, a missing Transfer
    Syntax UID is filled in from how the data set was actually encoded."""
    fp = open(path, "rb") if isinstance(path, str) else path
    try:
        start = fp.tell()
        if (ds := read_deflated(fp, stop_before_pixels)) is not None:  # inflated in steps, within a limit
            return ds
        try:
            return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
        except pydicom.errors.InvalidDicomError:
            fp.seek(start)
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
            if "SOPClassUID" not in ds and "Rows" not in ds:
                raise pydicom.errors.InvalidDicomError("not a DICOM file (no preamble, no SOP class, no image)")
            _fill_transfer_syntax(ds)
            return ds
    finally:
        if fp is not path:
            fp.close()


def _fill_transfer_syntax(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def decode(ds: Dataset, frame: int | None, windows: tuple[Window, ...], region: tuple[slice, slice] | None = None,
           pixels: np.ndarray | None = None) -> np.ndarray:
    """One frame of ``ds`` -> float32 ``(C, H, W)`` in [0, 1].

    Colour images give 3 channels (RGB); grayscale gives one channel per window.
    ``region`` (rows, columns): only that part is returned; where every window maps value
    by value (``W,L``, presets, the file's own VOI) only that part goes through the LUTs,
    and large images go through them once per stored value (:data:`TABLE_RATIO`); a
    min-max window needs the whole image, so it is cut after. ``pixels``: the frame's
    stored values as ``pixel_array`` would give them, already read (``ds`` then needs no
    pixel data).
    """
    arr = _stored_frame(ds, frame) if pixels is None else pixels
    if arr.ndim == 4 or (arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1):
        arr = arr[0]  # a single-frame file that still came back with a frame axis
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _cut(_unit(rgb.astype(np.float32) / float(2**bits - 1)).transpose(2, 0, 1), region).copy()
    if arr.ndim == 3:  # RGB (pydicom converted YBR_* to RGB)
        if arr.dtype.kind == "f":
            return _cut(_minmax(arr.astype(np.float32)).transpose(2, 0, 1), region).copy()
        bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
        return _cut(_unit(arr.astype(np.float32) / float(2**bits - 1)).transpose(2, 0, 1), region).copy()
    luts = frame_luts(ds, frame)
    local = all(w.width is not None or (w.name == "auto" and (own_window(luts) is not None or
                                                              luts.get("VOILUTSequence"))) for w in windows)
    if region is not None and local:
        arr = arr[region]
    if local and arr.dtype.kind in "iu" and arr.size >= TABLE_MIN_PIXELS:
        lo, hi = int(arr.min()), int(arr.max())
        if arr.size >= TABLE_RATIO * (hi - lo + 1):  # each stored value once, then one lookup per pixel
            table = _grayscale(np.arange(lo, hi + 1, dtype=arr.dtype), luts, windows, pi)
            offsets = arr - arr.dtype.type(lo) if arr.dtype.kind == "u" else arr.astype(np.int64) - lo
            return np.take(table, offsets, axis=1)  # = table[:, offsets], ~3x faster
    out = _grayscale(arr, luts, windows, pi)
    return out if local else _cut(out, region)


#: pixel-to-pixel stages are computed once per stored value and looked up (bit-equal, as every
#: stage is value by value) when an image has at least TABLE_RATIO pixels per value in its range
TABLE_RATIO = 8
TABLE_MIN_PIXELS = 4096


def _grayscale(arr: np.ndarray, luts: Dataset, windows: tuple[Window, ...], pi: str) -> np.ndarray:
    """Stored values -> modality LUT -> one window per channel -> MONOCHROME1 inversion: float32 ``(C, *arr.shape)``."""
    values = arr.astype(np.float32) if arr.dtype.kind == "f" else apply_modality_lut(arr, luts).astype(np.float32)
    if arr.dtype.kind != "f" and not np.isfinite(values).all():  # else NaN -> 0, inf clipped: an image of zeros
        raise ValueError("the rescale (RescaleSlope / RescaleIntercept) gives NaN or infinite values")
    out = np.stack([apply_window(values, luts, w) for w in windows])
    if pi == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32, copy=False)


def _cut(x: np.ndarray, region: tuple[slice, slice] | None) -> np.ndarray:
    return x if region is None else x[(slice(None), *region)]


_LUT_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
                 "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction")


def _stored_frame(ds: Dataset, frame: int | None) -> np.ndarray:
    """One frame of ``ds``'s pixel data, decoded by pydicom with whatever codec it needs."""
    try:
        if not any(k in ds for k in PIXEL_KEYWORDS):
            # only files whose header describes an image get here: its pixels are missing
            raise ValueError("no pixel data in an image file (truncated or corrupt)")
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            _fill_transfer_syntax(ds)
        check_stream_size(ds, frame)  # a compressed frame's own size, before a decoder allocates it
        return decode_checked(pixel_array, ds, index=frame if _frames(ds) > 1 else None)  # a panic: an error
    except Exception as exc:
        mark_stage(exc, "unreadable pixel data")  # its skip reason says so (dicom_reasons)
        raise


def modality_values(ds: Any, frame: int | None, region: tuple[slice, slice] | None = None,
                    pixels: np.ndarray | None = None) -> np.ndarray:
    """Stored pixels of one frame through the modality LUT only: float32 ``(1, H, W)``
    (``region``: of those rows and columns only; ``pixels``: as in :func:`decode`)."""
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":  # its values index colours
        raise ValueError("raw values of a colour image are not defined (use it without --raw)")
    arr = _stored_frame(ds, frame) if pixels is None else pixels
    if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError("raw values of a colour image are not defined (use it without --raw)")
    if region is not None:
        arr = arr[region]
    values = arr.astype(np.float32) if arr.dtype.kind == "f" else apply_modality_lut(arr, frame_luts(ds, frame))
    return np.asarray(values, dtype=np.float32)[None]


def frame_luts(ds: Dataset, frame: int | None) -> Dataset:
    """``ds`` itself, or for an enhanced multi-frame object the LUT attributes of ``frame``.

    Enhanced CT/MR/XA keep rescale and window per frame in functional groups (Pixel Value
    Transformation and Frame VOI LUT sequences, per-frame before shared), where pydicom's
    LUT functions do not look: they are copied to the top level of a small data set so
    that ``apply_modality_lut`` / ``apply_windowing`` apply them unchanged.
    """
    if not has(ds, "SharedFunctionalGroupsSequence") and not has(ds, "PerFrameFunctionalGroupsSequence"):
        return ds
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame or "ModalityLUTSequence" in ds:
        return ds
    groups = []
    if per_frame and frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    if shared:
        groups.append(shared[0])
    view = Dataset()
    for kw in _LUT_KEYWORDS:
        if kw in ds:
            setattr(view, kw, ds[kw].value)
    for seq_kw, keys in (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
                         ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction"))):
        for group in groups:
            item = group.get(seq_kw)
            if item:
                for kw in keys:
                    if kw in item[0]:
                        setattr(view, kw, item[0][kw].value)
                break
    if "VOILUTSequence" in ds:
        view.VOILUTSequence = ds.VOILUTSequence
    return view


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


def _frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def codec_failure(ds: Dataset, reason: str) -> str | None:
    """Why compressed pixels could not be decoded, naming the transfer syntax, the bit
    depth and the decoder that is missing; None for uncompressed data.

    ``reason`` is the (identifier-free) codec error. 12-bit JPEG Extended (process 4) is
    the common case: of pydicom's decoders only pylibjpeg-libjpeg decodes it (Pillow and,
    as pydicom 3.0 drives it, GDCM refuse 12-bit samples; measured with python-gdcm 3.2.6).
    """
    from pydicom.pixels import get_decoder

    ts = pydicom.uid.UID(str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")))
    if not ts or not ts.is_encapsulated:
        return None
    bits = int(ds.get("BitsStored", 0) or 0)
    where = f"{ts.name} ({ts}), {bits}-bit"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"{where}: pydicom has no decoder for this transfer syntax"
    if not decoder.is_available:
        return f"{where}: no decoder installed ({'; '.join(decoder.missing_dependencies)})"
    tried = ", ".join(decoder.available_plugins)
    need = ""
    if ts == pydicom.uid.JPEGExtended12Bit and bits > 8 and "pylibjpeg" not in decoder.available_plugins:
        need = (" 12-bit JPEG needs pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg; "
                "Pillow decodes 8-bit only);")
    return f"{where}:{need} installed decoders ({tried}) failed: {reason}"
