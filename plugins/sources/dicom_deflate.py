"""Deflated Explicit VR Little Endian, within a limit: pydicom inflates the whole data set in one call,
even to read a header; :func:`read_deflated` inflates it in steps and refuses a data set that inflates
past :data:`DEFLATE_LIMIT` (a 1.5 MB file can hold a 1.5 GB element)."""

from __future__ import annotations

import io
import struct
import zlib
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from sslkit.api import DEFAULT_MAX_PIXELS, human_bytes
from sslkit_plugins.sources.dicom_limits import TooLarge

#: the most bytes a deflated data set may inflate to: the largest allowed 16-bit grayscale
#: image and 16 MiB of header (a larger one is skipped before it is inflated further)
DEFLATE_LIMIT = DEFAULT_MAX_PIXELS * 2 + (16 << 20)
_DEFLATED = str(DeflatedExplicitVRLittleEndian).encode("ascii")
_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def _transfer_syntax(fp: BinaryIO) -> bytes | None:
    """The Transfer Syntax UID in the file meta group at ``fp`` (read from the element headers
    alone; explicit or implicit VR), or None."""
    head = fp.read(132)
    if head[128:132] != b"DICM":
        fp.seek(-len(head), io.SEEK_CUR)
    for _ in range(1000):
        elem = fp.read(8)
        if len(elem) < 8 or elem[:2] != b"\x02\x00":
            return None
        vr = elem[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<I", fp.read(4))[0]
        elif vr.isalpha() and vr.isupper():
            length = struct.unpack_from("<H", elem, 6)[0]
        else:  # implicit VR
            length = struct.unpack_from("<I", elem, 4)[0]
        if elem[2:4] == b"\x10\x00":
            return fp.read(min(length, 64)).rstrip(b"\x00 ")
        fp.seek(length, io.SEEK_CUR)
    return None


def read_deflated(path: str | BinaryIO, stop_before_pixels: bool = False) -> Dataset | None:
    """``dcmread`` of a deflated file, inflated in steps up to :data:`DEFLATE_LIMIT` bytes
    (more: :class:`TooLarge`); None, ``path`` left where it was, for any other file."""
    fp = open(path, "rb") if isinstance(path, str) else path
    start = fp.tell()
    try:
        try:
            deflated = _transfer_syntax(fp) == _DEFLATED
        except (OSError, struct.error, ValueError):
            deflated = False
        fp.seek(start)
        return _inflated_dataset(fp, stop_before_pixels) if deflated else None
    finally:
        if fp is not path:
            fp.close()


def _inflated_dataset(fp: BinaryIO, stop_before_pixels: bool) -> Dataset:
    """The deflated file at ``fp`` read as the same data set in Explicit VR Little Endian."""
    head = pydicom.filereader.read_preamble(fp, True)
    meta = pydicom.filereader._read_file_meta_info(fp)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(head + b"DICM" if head is not None else b"")
    write_file_meta_info(out, meta, enforce_standard=False)
    parts, size = [out.getvalue()], 0
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    while not inflate.eof:
        chunk = inflate.unconsumed_tail or fp.read(1 << 20)
        if not chunk:
            break
        parts.append(inflate.decompress(chunk, DEFLATE_LIMIT + 1 - size))
        size += len(parts[-1])
        if size > DEFLATE_LIMIT:
            raise TooLarge(f"deflated data set larger than {human_bytes(DEFLATE_LIMIT)} inflated (the limit)")
    if not inflate.eof:  # as zlib.decompress, which pydicom calls, refuses it
        raise zlib.error("Error -5 while decompressing data: incomplete or truncated stream")
    ds = pydicom.dcmread(io.BytesIO(b"".join(parts)), stop_before_pixels=stop_before_pixels, force=head is None)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds
