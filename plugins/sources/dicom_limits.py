"""Bounds on what a DICOM file can make the ``dicom`` source allocate, checked before pydicom does.

* A compressed frame (JPEG, JPEG-LS, JPEG 2000) names its own size in its first bytes (a
  JPEG SOFn / JPEG-LS SOF55 marker, a JPEG 2000 SIZ marker, raw or in a JP2 ``jp2c`` box),
  which the decoder allocates whatever Rows and Columns say (a 934-byte file can claim
  30000 x 30000): :func:`check_stream_size` reads it with ``struct`` alone and refuses a
  frame whose size or component count differs from the header (the header's size is what
  the pixel limit checked). A JPEG or JP2 header past the frame's first MiB (APPn segments or
  boxes before it) is read in the whole frame. A header it cannot parse is left to the decoder.
* An RLE Lossless frame (DICOM PS3.5 Annex G) is a 64-byte header (segment count, offsets)
  and one PackBits segment per byte of each sample, each decoding to Rows x Columns bytes;
  a 2-byte run is at most 128 bytes, so a segment of L bytes gives at most 128 x (L // 2).
  The decoder allocates what the header says first (a 72-byte frame can claim 13000 x
  13000): :func:`check_stream_size` refuses a frame with another segment count than
  SamplesPerPixel x BitsAllocated / 8, or a segment too short for Rows x Columns bytes,
  from the fragment's bytes alone, and a segment whose runs decode to more than its
  Rows x Columns bytes (:func:`packbits_length`, from the run headers: pylibjpeg-rle panics
  on one). A decoder's panic is raised as :class:`DecoderPanic` (:func:`panic_free`).
* NumberOfFrames: :func:`frame_count` refuses, from the header, a count the file's size
  cannot hold (2^31 frames in 33 KB), or more frames than encapsulated pixel data has
  non-empty fragments (:func:`encapsulated_frames`: 10^6 empty items in 8 MB), before the
  index makes one sample per frame.

Deflated data sets are bounded in :mod:`sslkit_plugins.sources.dicom_deflate`. Reasons name sizes and
markers only, never the file.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any, Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, RLELossless

from sslkit_plugins.sources.dicom_reasons import mark_stage
from sslkit_plugins.sources.dicom_values import transfer_syntax, value

#: a skip reason's text before its first ':' (what a run's summary counts)
STREAM_STAGE = "compressed frame size differs from the header"
_JP2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class TooLarge(ValueError):
    """A file that would make a decoder allocate more than its header (or a limit) allows."""


class DecoderPanic(RuntimeError):
    """A decoder that panicked on a file (a Rust decoder's ``PanicException`` is a ``BaseException``)."""


def panic_free(decode: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``decode(*args, **kwargs)``, where a decoder's panic (a ``BaseException`` other than an
    interrupt or an exit) is raised as :class:`DecoderPanic`: the file is skipped with a reason."""
    try:
        return decode(*args, **kwargs)
    except (Exception, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        raise DecoderPanic(f"the decoder panicked: {exc}") from None


# ----------------------------------------------------------------------- compressed frames

def stream_size(data: bytes) -> tuple[str, int, int, int] | None:
    """``(kind, width, height, components)`` that a JPEG / JPEG-LS / JPEG 2000 stream's own
    header gives, or None where ``data`` starts no stream this parser knows."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:4] == b"\xff\x4f\xff\x51":
        return _siz(data, 0)
    if data[:12] == _JP2:
        pos = 0
        for _ in range(64):  # boxes: LBox, TBox[, XLBox]; the codestream is in "jp2c"
            if pos + 8 > len(data):
                return None
            length, kind = struct.unpack_from(">I4s", data, pos)
            head = 8
            if length == 1 and pos + 16 <= len(data):
                length, head = struct.unpack_from(">Q", data, pos + 8)[0], 16
            if kind == b"jp2c":
                return _siz(data, pos + head)
            if length < head:
                return None
            pos += length
    return None


def _siz(data: bytes, at: int) -> tuple[str, int, int, int] | None:
    """A JPEG 2000 codestream's SIZ marker (it must follow SOC): image size less its offsets."""
    if data[at:at + 4] != b"\xff\x4f\xff\x51" or len(data) < at + 42:
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, at + 8)
    (csiz,) = struct.unpack_from(">H", data, at + 40)
    return "JPEG 2000", xsiz - xo, ysiz - yo, csiz


def _jpeg_size(data: bytes) -> tuple[str, int, int, int] | None:
    """The first frame header (SOF0-15 but DHT/JPG/DAC, or JPEG-LS SOF55) after SOI."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI / SOS before a frame header
            return None
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if i + 10 > len(data):
                return None
            height, width, comps = struct.unpack_from(">HHB", data, i + 5)
            if height == 0:  # the height comes later (a DNL marker): unknown here
                return None
            return ("JPEG-LS" if marker == 0xF7 else "JPEG"), width, height, comps
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    return None


def _frame_starts(ds: Dataset, frame: int | None) -> list[tuple[bytes, int]]:
    """``(first bytes, length)`` of each encapsulated frame that ``pixel_array(ds, index=frame)``
    decodes (found as pydicom finds them: one frame through the offset tables, else every frame)."""
    from pydicom.encaps import generate_fragmented_frames

    count, ext = _frame_table(ds)
    if count > 1 and frame is not None:
        data = _whole_frame(ds, frame)
        return [(data, len(data))]  # whole already: a header past its first MiB is read without a second fetch
    frames = generate_fragmented_frames(ds.PixelData, number_of_frames=count, extended_offsets=ext)
    # a stream's header is at its start: the first bytes of each frame, but see _size_past_head
    return [(_head(fragments), sum(map(len, fragments))) for _, fragments in zip(range(count), frames)]


_HEAD = 1 << 20


def _frame_table(ds: Dataset) -> tuple[int, tuple[bytes, bytes] | None]:
    """NumberOfFrames and the extended offset table (None if absent), as pydicom takes them."""
    ext = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    return int(ds.get("NumberOfFrames", 1) or 1), (ext if all(v is not None for v in ext) else None)


def _whole_frame(ds: Dataset, index: int) -> bytes:
    """Frame ``index`` of the encapsulated pixel data, its fragments joined (pydicom's ``get_frame``)."""
    from pydicom.encaps import get_frame

    count, ext = _frame_table(ds)
    return get_frame(ds.PixelData, index, number_of_frames=count, extended_offsets=ext)


def _size_past_head(ds: Dataset, index: int, head: bytes, length: int) -> tuple[str, int, int, int] | None:
    """The size of a JPEG or JP2 frame whose header lies past its first :data:`_HEAD` bytes (APPn segments or
    boxes before it: a crafted file hid a 30000 x 30000 claim there), read in the whole frame fetched again."""
    if length <= len(head) or not (head[:2] == b"\xff\xd8" or head[:12] == _JP2):
        return None
    try:
        return stream_size(_whole_frame(ds, index))
    except Exception:
        return None  # the decoder says what is wrong, as before


def _head(fragments: tuple[bytes, ...]) -> bytes:
    """The first :data:`_HEAD` bytes of a frame held in ``fragments``."""
    out, size = [], 0
    for fragment in fragments:
        if size >= _HEAD:
            break
        out.append(fragment[:_HEAD - size])
        size += len(out[-1])
    return b"".join(out)


def decode_checked(decode: Callable[..., Any], ds: Dataset, **kwargs: Any) -> Any:
    """``decode(ds, **kwargs)`` through :func:`panic_free`; a panic on an RLE frame is then worded by
    the segments' scan (:func:`check_stream_size` with ``scan``): a Python walk of every run header,
    ~4x the decode of a noisy frame, so run only once a decoder failed, never on the first pass's path
    (pylibjpeg-rle allocates Rows x Columns and panics past it)."""
    try:
        return panic_free(decode, ds, **kwargs)
    except DecoderPanic:
        check_stream_size(ds, kwargs.get("index"), scan=True)  # TooLarge naming the segment, where it is one
        raise


def check_stream_size(ds: Dataset, frame: int | None, scan: bool = False) -> None:
    """Raise :class:`TooLarge` when a compressed frame of ``ds`` (``frame``, else each one) says
    it is another size than Rows x Columns x SamplesPerPixel (an RLE frame: :func:`rle_problem`,
    its segments' decoded lengths with ``scan``); anything unparsable passes."""
    ts = UID(str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")))
    if not ts or not ts.is_encapsulated or "PixelData" not in ds:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
        starts = _frame_starts(ds, frame)
    except Exception:
        return  # the decoder says what is wrong, as before
    for i, (start, length) in enumerate(starts):
        if ts == RLELossless:
            problem = rle_problem(start, length, rows, cols, samples, bits, scan)
            problem = problem and f"RLE frame {(frame if frame is not None else i) + 1} {problem}"
        else:
            size = stream_size(start) or _size_past_head(ds, frame if frame is not None else i, start, length)
            problem = size and size[1:] != (cols, rows, samples) and (
                f"the {size[0]} stream is {size[1]}x{size[2]} with {size[3]} component(s), the header says "
                f"{cols}x{rows} with {samples}")
        if problem:
            exc = TooLarge(problem)
            mark_stage(exc, STREAM_STAGE)
            raise exc


def rle_problem(head: bytes, length: int, rows: int, cols: int, samples: int, bits: int,
                scan: bool = False) -> str | None:
    """Why an RLE frame of ``length`` bytes starting ``head`` cannot hold ``samples`` samples of
    ``bits`` bits for each of ``rows`` x ``cols`` pixels (PS3.5 Annex G), or None (also where
    the samples are no whole number of bytes, or need over 15 segments: the decoder decides);
    with ``scan`` also a segment that decodes to more (:func:`packbits_length`)."""
    need = samples * bits // 8
    if bits % 8 or not 1 <= need <= 15:  # 15 segments at most: the decoder refuses more
        return None
    if length < 64 or len(head) < 64:
        return f"is {length} bytes, less than the 64-byte RLE header"
    count, *offsets = struct.unpack_from("<16I", head)
    if count != need:
        return f"has {count} segment(s), {samples} sample(s) of {bits} bits need {need}"
    # segment i lies from offsets[i] to the next offset (the last: to the frame's end), as decoders slice it
    ends = [*offsets[1:count], length]
    least = min(max(0, min(end, length) - min(start, length)) for start, end in zip(offsets, ends))
    if 128 * (least // 2) < rows * cols:  # PackBits: 2 bytes decode to 128 at most
        return f"holds a segment of {least} bytes (at most {128 * (least // 2)} decoded), too few for {cols}x{rows}"
    for i, (start, end) in enumerate(zip(offsets, ends) if scan else ()):  # past its share: pylibjpeg panics
        decoded = packbits_length(head, start, min(end, length), rows * cols)
        if decoded is not None and decoded > rows * cols:
            return f"has a segment {i + 1} that decodes to more than the {rows * cols} bytes of {cols}x{rows}"
    return None


def packbits_length(data: bytes, start: int, end: int, most: int) -> int | None:
    """How many bytes the PackBits runs of ``data[start:end]`` decode to, read from the run headers
    alone (header n: 0-127 copies the next n + 1 bytes, 129-255 repeats the next byte 257 - n times,
    128 does nothing), counting only bytes inside the segment; the scan stops once past ``most``.
    None where the segment runs past ``data`` (a frame's first bytes) before that: unknown."""
    pos, out, prev, stop = start, 0, start, min(end, len(data))
    for _ in range(most + _NOOP_RUNS + 1):  # each run but a no-op decodes a byte at least
        if pos >= stop or out > most:
            break
        prev = pos
        out += _GAIN[data[pos]]
        pos += _STEP[data[pos]]
    else:
        return None  # a long string of no-op runs: the decoder decides
    if out <= most and stop < end and pos < end:
        return None  # the segment goes on beyond the bytes read
    if pos > end:  # the last run is cut by the segment's end: only its bytes inside count
        out -= _GAIN[data[prev]] if data[prev] > 128 else pos - end
    return out


#: no-op runs (header 128) a segment may hold beyond one run per decoded byte before the scan gives up
_NOOP_RUNS = 4096
#: bytes each PackBits header byte decodes to, and how far it moves the scan
_GAIN = tuple(n + 1 if n < 128 else 0 if n == 128 else 257 - n for n in range(256))
_STEP = tuple(n + 2 if n < 128 else 1 if n == 128 else 2 for n in range(256))


#: encapsulated (compressed) pixel data: every frame is at least one 8-byte item header
_MIN_ENCAPSULATED_FRAME = 8
#: deflate expands at most ~1032:1 (zlib's limit)
_MAX_DEFLATE_RATIO = 1032


def frame_count(ds: Dataset, path: Path) -> int:
    """NumberOfFrames, checked against what the file can hold before any per-frame work.

    A header may claim 2^31 frames in a 33 KB file: uncompressed frames need
    ``Rows x Columns x SamplesPerPixel x BitsAllocated / 8`` bytes each and encapsulated
    ones at least one item header each, so a count the file's size cannot hold is an
    error (one report row for the file), never 2^31 sample refs.
    """
    frames = max(1, int(value(ds, "NumberOfFrames", 1) or 1))
    rows, cols = int(value(ds, "Rows")), int(value(ds, "Columns"))
    if rows < 1 or cols < 1:
        raise ValueError(f"empty image ({rows} rows, {cols} columns)")
    size = path.stat().st_size
    ts = transfer_syntax(ds)
    if ts == DeflatedExplicitVRLittleEndian:
        size *= _MAX_DEFLATE_RATIO
    if ts and ts.is_encapsulated:
        most = size // _MIN_ENCAPSULATED_FRAME
    else:
        bits = rows * cols * int(value(ds, "SamplesPerPixel", 1) or 1) * int(value(ds, "BitsAllocated", 8) or 8)
        most = size * 8 // bits
    if frames > 1 and frames > max(1, most):  # one frame: a truncated file is reported when decoded
        raise ValueError(f"NumberOfFrames {frames} does not fit the file: its {path.stat().st_size} bytes hold "
                         f"at most {most} frame(s) of {cols}x{rows}")
    held = encapsulated_frames(path, frames) if frames > 1 and ts and ts.is_encapsulated else None
    if held is not None and held < frames:
        raise ValueError(f"NumberOfFrames {frames} does not fit the file: its pixel data has room for at most {held} "
                         "frame(s) (each needs a non-empty fragment)")
    return frames


def encapsulated_frames(path: Path, frames: int) -> int | None:
    """How many of ``frames`` frames the encapsulated pixel data of the file at ``path`` can hold:
    its non-empty fragments (an empty item is no frame; counted up to ``frames``), fewer where a
    Basic Offset Table addresses fewer; None where the items cannot be read (the decoder decides).
    Item headers only are read, each once; where the rest of the file is too short for the frames
    still missing (a non-empty item takes at least 9 bytes), the count so far plus what it could
    hold, an upper bound under ``frames``."""
    with open(path, "rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        head, size = fp.read(12), path.stat().st_size
        if len(head) < 12 or head[:4] != b"\xe0\x7f\x10\x00" or head[8:12] != b"\xff\xff\xff\xff":
            return None
        held, table = 0, None
        for _ in range(size // 8 + 1):
            item = fp.read(8)
            if len(item) < 8 or item[:4] != b"\xfe\xff\x00\xe0":
                break  # the sequence delimiter, the file's end, or no item: what was counted
            (length,) = struct.unpack_from("<I", item, 4)
            if length == 0xFFFFFFFF:
                return None
            if table is None:
                table = length // 4  # the Basic Offset Table: one offset per frame, or empty
            else:
                held += length > 0
            if held < frames:
                room = held + (size - fp.seek(length, io.SEEK_CUR)) // 9
                if room >= frames:
                    continue
                held = room  # the rest of the file is too short for the frames still missing
            break
    return min(held, table) if table else held
