"""Hostile DICOM inputs found by the second audit: each is a skip with a reason or a note, never a crash.

1. An RLE segment whose PackBits runs decode to more than its Rows x Columns bytes (pylibjpeg-rle
   panicked, a ``BaseException`` that went past ``except Exception``).
2. Encapsulated pixel data whose NumberOfFrames exceeds the frames its fragments hold.
3. / 5. Mosaics whose tile does not divide the grid into a square of tiles, or with no tile at all.
4. The note for a mosaic that keeps every tile reaches the run's data report.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit

from sslkit.api import Undecodable
from sslkit.registry import create_source
from sslkit_plugins.sources import dicom_decode, dicom_limits
from sslkit_plugins.sources.dicom import read_header
from sslkit_plugins.sources.dicom_limits import (DecoderPanic, TooLarge, check_stream_size, encapsulated_frames,
                                                 frame_count, packbits_length, panic_free)
from sslkit_plugins.sources.dicom_mosaic import cut_mosaic, mosaic_layout
from tests.test_dicom_faults2 import write_mosaic_count
from tests.test_dicom_hostile import _encapsulated, decoder  # noqa: F401 (decoder: the fixture)
from tests.test_dicom_rle_bounds import STAGE, _rle_file, _rle_frame
from tests.test_series import mosaic_pixels, write_series


# ---------------------------------------------------------------- 1: RLE segments longer than their share

LONG = b"\x81\x07" * 4  # four runs of 128: 512 bytes, twice the 256 a 16 x 16 segment holds


@pytest.mark.parametrize("segment,expected", [
    (b"\x81\x07" * 2, 256),
    (b"\x03abcd\xfe\x01", 4 + 3),  # a literal run of 4, then a repeat of 3
    (b"\x80\x80\x00z", 1),  # two no-op runs, a literal of 1
    (b"\x81\x07\x00", 128),  # a trailing pad byte: a literal header with nothing after it
    (b"\x05ab", 2),  # a literal run cut by the segment's end: only the bytes in the segment
])
def test_packbits_length_counts_what_the_runs_decode_to(segment, expected):
    assert packbits_length(segment, 0, len(segment), 10**6) == expected
    from pydicom.pixels.decoders.rle import _rle_decode_segment
    assert len(_rle_decode_segment(segment)) == expected  # pydicom's own decoder agrees


def test_packbits_length_stops_past_the_limit_and_where_the_bytes_end():
    assert packbits_length(b"\x81\x00" * 1000, 0, 2000, 256) == 384  # stops at the third run
    assert packbits_length(b"\x81\x00" * 2, 0, 100, 1000) is None  # the segment runs past the bytes read


def test_an_rle_segment_decoding_to_more_than_rows_x_columns_is_a_skip_naming_it(tmp_path):
    """pylibjpeg-rle (it allocates Rows x Columns) panics on the long segment: the skip's reason is worded by
    the segments' scan, which runs only then (on every frame it cost ~4x a noisy frame's decode)."""
    pytest.importorskip("rle")
    path = _rle_file(tmp_path / "data" / "long.dcm", [_rle_frame(LONG, LONG)], 16, 16, bits=16)
    src = create_source(f"dicom:{path.parent}", workers=1)
    (ref,) = src.index()
    with pytest.raises(Undecodable) as refused:
        src.load(ref)
    assert str(refused.value) == f"{STAGE}RLE frame 1 has a segment 1 that decodes to more than the 256 bytes of 16x16"


def test_the_second_of_two_segments_too_long_is_found_by_the_scan_alone(tmp_path):
    path = _rle_file(tmp_path / "long.dcm", [_rle_frame(b"\x81\x07" * 2, LONG)], 16, 16, bits=16)
    check_stream_size(pydicom.dcmread(path), None)  # the first pass's check: header sizes only
    with pytest.raises(TooLarge) as refused:
        check_stream_size(pydicom.dcmread(path), None, scan=True)
    assert str(refused.value) == "RLE frame 1 has a segment 2 that decodes to more than the 256 bytes of 16x16"


class FakePanic(BaseException):
    """What pyo3 raises for a Rust panic: a BaseException, not an Exception."""


def test_a_real_decoder_panic_is_a_skip_with_a_reason(tmp_path, monkeypatch):
    """The checks bypassed, pylibjpeg-rle itself panics on the long 16-bit segments: a skip, not a crash."""
    pytest.importorskip("rle")
    monkeypatch.setattr(dicom_decode, "check_stream_size", lambda ds, frame: None)
    monkeypatch.setattr(dicom_limits, "check_stream_size", lambda ds, frame, scan=False: None)
    path = _rle_file(tmp_path / "data" / "long.dcm", [_rle_frame(LONG, LONG)], 16, 16, bits=16)
    src = create_source(f"dicom:{path.parent}", workers=1)
    (ref,) = src.index()
    with pytest.raises(Undecodable) as refused:
        src.load(ref)
    assert "DecoderPanic: the decoder panicked: index out of bounds: the len is 512 but the index is 513" in str(
        refused.value)


def test_panic_free_turns_panics_into_errors_and_lets_interrupts_through():
    def raising(exc):
        raise exc

    with pytest.raises(DecoderPanic, match="^the decoder panicked: index out of bounds$"):
        panic_free(raising, FakePanic("index out of bounds"))
    for exc in (KeyboardInterrupt(), SystemExit(3), GeneratorExit(), ValueError("x")):
        with pytest.raises(type(exc)):
            panic_free(raising, exc)
    assert panic_free(lambda a, b=0: a + b, 2, b=3) == 5


def test_a_panicking_decoder_on_a_valid_frame_is_a_skip(tmp_path, monkeypatch):
    path = _rle_file(tmp_path / "data" / "ok.dcm", [_rle_frame(b"\x81\x07" * 2)], 16, 16)
    monkeypatch.setattr(dicom_decode, "pixel_array", lambda ds, **kw: (_ for _ in ()).throw(FakePanic("boom")))
    src = create_source(f"dicom:{path.parent}", workers=1)
    (ref,) = src.index()
    with pytest.raises(Undecodable) as refused:
        src.load(ref)
    assert "DecoderPanic: the decoder panicked: boom" in str(refused.value)


# ---------------------------------------------------------------- 2: more frames than non-empty fragments

def _items(*lengths: int, table: bytes = b"") -> bytes:
    """Encapsulated pixel data: the Basic Offset Table, items of ``lengths`` bytes, the delimiter."""
    out = struct.pack("<HHI", 0xFFFE, 0xE000, len(table)) + table
    for n in lengths:
        out += struct.pack("<HHI", 0xFFFE, 0xE000, n) + b"\xaa" * n
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _multiframe(path: Path, pixel_data: bytes, frames: int) -> Path:
    """A 16 x 16 8-bit JPEG Baseline file claiming ``frames`` frames over ``pixel_data`` as given."""
    _encapsulated(path, [b"\xff\xd8\xff\xd9"], JPEGBaseline8Bit)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = frames
    ds.PixelData = pixel_data
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("lengths,table,frames,held", [
    ([0] * 2000, b"", 2000, None),  # the audit's case, small: all empty (16 KB: room for 2000 by size)
    ([0] * 500 + [10] * 3, b"", 4, 3),  # three non-empty fragments for four frames
    ([10] * 4, struct.pack("<2I", 0, 18), 4, 2),  # an offset table addressing two frames of four
])
def test_more_frames_than_the_pixel_data_holds_is_one_header_error(tmp_path, lengths, table, frames, held):
    path = _multiframe(tmp_path / "data" / "x.dcm", _items(*lengths, table=table), frames)
    held = _room_after_table(path) if held is None else held
    assert held < frames
    assert read_header(str(path)) == {
        "kind": "error", "reason": f"bad header value: ValueError: NumberOfFrames {frames} does not fit the file: "
                                   f"its pixel data has room for at most {held} frame(s) (each needs a non-empty "
                                   f"fragment)"}
    src = create_source(f"dicom:{path.parent}", workers=1)
    assert list(src.index()) == []


def test_a_long_run_of_empty_items_is_refused_by_the_bytes_left(tmp_path):
    """10^5 empty items and 10^5 frames: the rest of the file cannot hold them; no item-by-item scan to the end."""
    path = _multiframe(tmp_path / "x.dcm", _items(*[0] * 100_000), 100_000)
    assert encapsulated_frames(path, 100_000) == _room_after_table(path)  # read past the table only


def _room_after_table(path: Path) -> int:
    """The frames the bytes after an empty offset table could hold at most (9 bytes a non-empty item)."""
    raw = path.read_bytes()
    return (len(raw) - raw.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") - 12 - 8) // 9


def test_frames_each_in_their_fragments_pass(tmp_path):
    path = _multiframe(tmp_path / "ok.dcm", _items(0, 10, 12, 10, table=b""), 3)
    assert encapsulated_frames(path, 3) == 3
    assert frame_count(pydicom.dcmread(path, stop_before_pixels=True), path) == 3
    with_table = _multiframe(tmp_path / "t.dcm", _items(10, 10, table=struct.pack("<2I", 0, 18)), 2)
    assert frame_count(pydicom.dcmread(with_table, stop_before_pixels=True), with_table) == 2


@pytest.mark.parametrize("name", ["SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm", "rtdose_rle.dcm"])
def test_valid_multiframe_files_keep_their_frame_count(name):
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    frames = int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames)
    assert encapsulated_frames(path, frames) == frames
    header = read_header(str(path))
    assert header["kind"] == "image" and header["frames"] == frames


# ---------------------------------------------------------------- 3 / 5: mosaics with no usable grid

def _mosaic(path: Path, tiles: np.ndarray, matrix: list[int] | None, count: int | None = None) -> Path:
    """``tiles`` on their square grid, AcquisitionMatrix ``matrix`` (None: absent), no slice count."""
    write_mosaic_count(path, tiles, count, matrix=False)
    if matrix is not None:
        ds = pydicom.dcmread(path)
        ds.AcquisitionMatrix = matrix
        ds.save_as(path, enforce_file_format=True)
    return path


GRID = "mosaic slice count not in the header"


@pytest.mark.parametrize("rows,cols,tile,reason", [
    (64, 64, (32, 16), "the 16x32 AcquisitionMatrix tile does not cut the 64x64 mosaic into a square grid of "
                       "whole tiles"),  # the audit's case: 2 tiles down, 4 across
    (64, 64, (30, 30), "the 30x30 AcquisitionMatrix tile does not cut the 64x64 mosaic into a square grid of "
                       "whole tiles"),  # 2 x 2 tiles, 4 pixels left over
    (64, 64, (65535, 65535), "the 65535x65535 AcquisitionMatrix tile does not cut the 64x64 mosaic into a "
                             "square grid of whole tiles"),
    (64, 64, None, "no AcquisitionMatrix tile"),  # AcquisitionMatrix 0 (or absent): item 5
])
def test_a_mosaic_without_a_square_grid_of_whole_tiles_is_unusable(rows, cols, tile, reason):
    with pytest.raises(ValueError) as unusable:
        mosaic_layout(rows, cols, None, tile)
    assert str(unusable.value) == f"unusable mosaic: {GRID} and {reason}"


def test_a_rectangular_tile_on_a_square_grid_cuts_whole_tiles():
    tiles = np.arange(1, 4 * 4 * 10 + 1).reshape(4, 4, 10).astype(np.uint16)  # 4 tiles of 4x10: an 8x20 mosaic
    n, issue = mosaic_layout(8, 20, None, (4, 10))
    assert (n, issue) == (-4, f"{GRID}: every tile of the grid kept")
    np.testing.assert_array_equal(cut_mosaic(mosaic_pixels(tiles), n, (4, 10)), tiles)


@pytest.mark.parametrize("matrix,reason", [
    ([8, 0, 0, 4], "the 4x8 AcquisitionMatrix tile does not cut the 16x16 mosaic into a square grid of whole tiles"),
    ([0, 0, 0, 0], "no AcquisitionMatrix tile"),
    ([65535, 0, 0, 65535], "the 65535x65535 AcquisitionMatrix tile does not cut the 16x16 mosaic into a square "
                           "grid of whole tiles"),
])
def test_an_unusable_mosaic_is_skipped_with_its_reason_where_it_would_be_cut(tmp_path, matrix, reason):
    tiles = np.arange(1, 4 * 64 + 1).reshape(4, 8, 8).astype(np.uint16)  # 4 tiles of 8x8: a 16x16 mosaic
    _mosaic(tmp_path / "epi" / "epi.dcm", tiles, matrix)
    write_series(tmp_path / "ct", n=3)
    src = create_source(f"dicom:{tmp_path}", workers=1, sample="slab:1")
    assert len(src.index()) == 3  # the CT series only: no half tiles
    (path, why), = src.skipped
    assert path.endswith("epi.dcm") and why == f"unusable mosaic: {GRID} and {reason}"
    src = create_source(f"dicom:{tmp_path}", workers=1)  # slice mode: the mosaic is one 2D image, as before
    assert len(src.index()) == 4 and not src.skipped


# ---------------------------------------------------------------- 4: the note of a mosaic cut on its grid

def test_the_note_of_a_mosaic_without_a_count_reaches_the_run(tmp_path):
    tiles = np.arange(1, 4 * 4 * 5 + 1).reshape(4, 4, 5).astype(np.uint16)
    _mosaic(tmp_path / "epi.dcm", tiles, [4, 0, 0, 5])
    src = create_source(f"dicom:{tmp_path}", workers=1, sample="volume", volume_size="4,4,5")
    (ref,) = src.index()
    vol = src.sampler.volume_of(ref)
    assert src.notes() == [(f"series:{vol.key}", f"{GRID}: every tile of the grid kept")]
    np.testing.assert_array_equal(src.sampler.load(ref, raw=True)[0], tiles.astype(np.float32))
