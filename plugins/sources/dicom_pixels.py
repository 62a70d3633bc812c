"""Where a DICOM file's pixels lie, found while its header is read, so decoding need not
parse the header a second time.

The index reads every header once (``stop_before_pixels``); pydicom leaves the file at
the Pixel Data element, so :func:`pixel_facts` notes the value's byte range and the
attributes the decode uses (group 0028: the image pixel module, rescale, windows). The
first decoding pass then reads only those bytes and rebuilds a small data set
(:func:`pixels_dataset`) for the same :func:`~sslkit_plugins.sources.dicom_decode.decode`:
the same pydicom calls on the same values, so the same pixels (tests compare both ways
on every pydicom test file), without a second parse of a header that can be most of the
cost of a small CT slice.

Plain grayscale samples (native transfer syntax, one sample per pixel, 8/16/32 bits,
MONOCHROME1/2: most CT and MR slices) skip pydicom's pixel machinery too:
:func:`native_pixels` reads them with numpy, clearing unused high bits as pydicom does,
and the decode uses one group-0028 data set per distinct header (a series shares one),
whose values pydicom converts once. Both are bit-equal to ``pixel_array`` (tests).

Facts are noted only where that is certain to be equivalent: little-endian, not deflated,
no modality / VOI LUT sequences, no functional groups, no palette, no extended offset
table, encapsulated data in one frame. Anything else, and any failure while reading or
decoding this way, goes through the full ``dcmread`` as before (so error reasons do not
change). The facts hold no identifier: byte offsets, the transfer syntax and group 0028.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any, BinaryIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from sslkit_plugins.sources.dicom_decode import decode, modality_values, read_dataset
from sslkit_plugins.sources.dicom_window import Window
from sslkit_plugins.sources.dicom_values import has, transfer_syntax, value

PIXEL_DATA = 0x7FE00010
ITEM, SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
#: keywords whose presence means decode() reads more than group 0028's plain values
NOT_SIMPLE = ("ModalityLUTSequence", "VOILUTSequence", "SharedFunctionalGroupsSequence",
              "PerFrameFunctionalGroupsSequence", "ExtendedOffsetTable", "FloatPixelData", "DoubleFloatPixelData")
#: native multi-frame data whose frames are whole bytes of plain samples
BYTE_FRAMES = ("MONOCHROME1", "MONOCHROME2", "RGB")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def pixel_facts(ds: Dataset, fp: BinaryIO) -> dict[str, Any] | None:
    """The pixel value's byte range and the decode's attributes, or None (decode in full).

    ``fp`` is the file ``ds`` was read from with ``stop_before_pixels``, positioned where
    pydicom stopped: at the Pixel Data element's tag, if the file has one.
    """
    ts = transfer_syntax(ds)
    if not ts or ts == DeflatedExplicitVRLittleEndian or not ts.is_little_endian:
        return None
    elements = _group_0028(ds)  # first: before any value is converted
    photometric = str(value(ds, "PhotometricInterpretation", "")).upper()
    if elements is None or any(has(ds, k) for k in NOT_SIMPLE) or photometric == "PALETTE COLOR":
        return None
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 12 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    if ts.is_implicit_VR:
        vr, length, offset = ("OW" if int(value(ds, "BitsAllocated", 8) or 8) > 8 else "OB"), *struct.unpack(
            "<I", head[4:8]), start + 8
    else:
        vr, length, offset = head[4:6].decode("ascii", "replace"), struct.unpack("<I", head[8:12])[0], start + 12
        if vr not in ("OB", "OW"):
            return None
    frames = int(value(ds, "NumberOfFrames", 1) or 1)
    if length == 0xFFFFFFFF:
        end = _items_end(fp, offset) if ts.is_encapsulated and frames == 1 else None
    else:
        end = offset + length if not ts.is_encapsulated else None
    if end is None:
        return None
    out = {"offset": offset, "end": end, "vr": vr, "ts": str(ts), "implicit": ts.is_implicit_VR, "elements": elements}
    rows, columns = int(value(ds, "Rows")), int(value(ds, "Columns"))
    samples, bits = int(value(ds, "SamplesPerPixel", 1) or 1), int(value(ds, "BitsAllocated", 0) or 0)
    if frames > 1:
        if bits % 8 or photometric not in BYTE_FRAMES:
            return None
        out["frame_bytes"] = rows * columns * samples * bits // 8
    signed, stored = int(value(ds, "PixelRepresentation", 0) or 0), int(value(ds, "BitsStored", 0) or 0)
    if not ts.is_encapsulated and samples == 1 and photometric in MONOCHROME and bits in (8, 16, 32) and \
            signed in (0, 1) and 0 < stored <= bits:  # plain grayscale samples: numpy reads them as pydicom would
        out["native"] = [rows, columns, f"<{'ui'[signed]}{bits // 8}", stored]
    return out


def _items_end(fp: BinaryIO, offset: int) -> int | None:
    """Where an encapsulated value's sequence delimiter starts (item headers only are read)."""
    pos = offset
    for _ in range(1 << 20):
        fp.seek(pos)
        head = fp.read(8)
        if len(head) < 8:
            return None
        group, elem, length = struct.unpack("<HHI", head)
        tag = group << 16 | elem
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM or length == 0xFFFFFFFF:
            return None
        pos += 8 + length
    return None


def _group_0028(ds: Dataset) -> list | None:
    """``[tag, VR, value bytes as hex]`` of every group 0028 element as the file holds it
    (unconverted: the rebuilt data set converts them as a full read would), or None when
    one with a value was converted already."""
    out = []
    for tag in ds.keys():
        if tag.group == 0x0028:
            raw = ds.get_item(tag)
            if isinstance(raw, RawDataElement) and raw.value is not None:
                out.append([int(tag), raw.VR, raw.value.hex()])
            elif raw.is_empty:  # pydicom converts some empty values while reading
                out.append([int(tag), raw.VR, ""])
            else:
                return None
    return out


def pixels_dataset(path: str, facts: dict[str, Any], frame: int | None) -> Dataset:
    """A data set holding only group 0028, the transfer syntax and the pixel bytes of
    ``path`` (of ``frame`` alone for native multi-frame data), as :func:`pixel_facts` found
    them. Raises ``ValueError`` when the file no longer holds those bytes."""
    data = _pixel_bytes(path, facts, frame)
    ds = _attributes(facts)
    if facts.get("frame_bytes"):
        ds.NumberOfFrames = 1
    ds.add_new(PIXEL_DATA, facts["vr"], data)
    return ds


def _pixel_bytes(path: str, facts: dict[str, Any], frame: int | None) -> bytes:
    """The located pixel bytes of ``path`` (of one frame of native multi-frame data)."""
    offset, end = facts["offset"], facts["end"]
    size = facts.get("frame_bytes")
    if size and frame is not None:
        offset += frame * size
        end = offset + size
        if end > facts["end"]:
            raise ValueError("frame outside the pixel data")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(end - offset)
    if len(data) != end - offset:
        raise ValueError("pixel data shorter than its header says")
    return data


def _attributes(facts: dict[str, Any]) -> Dataset:
    """A new data set of the file's group 0028 (as it holds them) and its transfer syntax."""
    implicit = facts["implicit"]
    ds = Dataset({BaseTag(tag): RawDataElement(BaseTag(tag), vr, len(value) // 2, bytes.fromhex(value), 0, implicit,
                                                True) for tag, vr, value in facts["elements"]})
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(facts["ts"])
    return ds


@lru_cache(maxsize=256)
def _shared_attributes(ts: str, implicit: bool, elements: tuple) -> Dataset:
    """:func:`_attributes`, one data set per distinct group 0028 (slices of a series share
    theirs; values converted once). Only read, never changed, by the decode."""
    return _attributes({"ts": ts, "implicit": implicit, "elements": elements})


def native_pixels(path: str, facts: dict[str, Any], frame: int | None) -> np.ndarray | None:
    """Plain grayscale samples (``facts["native"]``: rows, columns, dtype, bits stored) as
    numpy reads them from the located bytes: what pydicom's ``pixel_array`` gives for such
    data (tests compare both), unused high bits cleared (signed: the sign extended) as
    pydicom does; None where the bytes are not exactly one frame (pydicom then decides)."""
    rows, columns, dtype, stored = facts["native"]
    data = _pixel_bytes(path, facts, frame)
    count = rows * columns
    dtype = np.dtype(dtype)
    if len(data) not in (count * dtype.itemsize, count * dtype.itemsize + 1):
        return None
    arr = np.frombuffer(bytearray(data), dtype=dtype, count=count).reshape(rows, columns)
    unused = dtype.itemsize * 8 - stored
    if unused:
        np.left_shift(arr, unused, out=arr)
        np.right_shift(arr, unused, out=arr)
    return arr


def read_frame(path: str, frame: int | None, windows: tuple[Window, ...], facts: dict[str, Any] | None,
               raw: bool = False, region: tuple[slice, slice] | None = None) -> np.ndarray:
    """:func:`decode` of one frame (``raw``: :func:`modality_values`; ``region``: rows and
    columns to keep): from the located pixel bytes alone when ``facts`` says where they
    are, else, or when that way fails, from the file read in full (whose error is then
    the one raised)."""
    if facts is not None:
        located = decode_located(path, frame, windows, facts, raw, region)
        if located is not None:
            return located
    ds = read_dataset(path)
    return modality_values(ds, frame, region) if raw else decode(ds, frame, windows, region)


def decode_located(path: str, frame: int | None, windows: tuple[Window, ...], facts: dict[str, Any],
                   raw: bool = False, region: tuple[slice, slice] | None = None) -> np.ndarray | None:
    """:func:`read_frame` through the located bytes only (plain grayscale straight to
    numpy, with the series' shared attributes); None when that way fails."""
    try:
        pixels = native_pixels(path, facts, frame) if facts.get("native") else None
        if pixels is not None:
            ds = _shared_attributes(facts["ts"], facts["implicit"], tuple(map(tuple, facts["elements"])))
        else:
            ds = pixels_dataset(path, facts, frame)
        return modality_values(ds, frame, region, pixels) if raw else decode(ds, frame, windows, region, pixels)
    except Exception:
        return None
