"""DICOM pixels to float32 ``(C, H, W)`` in [0, 1], through pydicom's own LUT functions.

Order of operations (DICOM PS3.4 N.2, the grayscale pipeline):

1. ``pixel_array(ds, index=frame)``: decode one frame with whatever codec the transfer
   syntax needs (pylibjpeg for JPEG, JPEG-LS, JPEG 2000, RLE); colour data comes back as
   RGB (pydicom's ``convert_color_space`` for YBR_FULL / YBR_FULL_422, planar
   configuration handled by the decoder).
2. ``apply_modality_lut``: RescaleSlope / RescaleIntercept or a Modality LUT Sequence, in
   float32, before any windowing (CT values become Hounsfield units); for enhanced
   multi-frame objects the frame's own values from the functional groups (:func:`frame_luts`).
3. One window per output channel (``auto``, ``minmax``, ``W,L`` or a preset), each through
   :func:`~sslkit_plugins.sources.dicom_window.apply_window` (:mod:`.dicom_window`: the windows,
   ``--window``'s parsing, and how each is applied).
4. MONOCHROME1 is inverted *after* windowing, so high attenuation is bright in every window mode.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sslkit_plugins.sources.dicom_deflate import read_deflated
from sslkit_plugins.sources.dicom_limits import check_stream_size, decode_checked
from sslkit_plugins.sources.dicom_reasons import mark_stage
from sslkit_plugins.sources.dicom_values import has
from sslkit_plugins.sources.dicom_window import Window, _minmax, _unit, apply_window, own_window


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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
