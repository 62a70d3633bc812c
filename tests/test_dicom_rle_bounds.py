"""RLE Lossless frames checked against the header before any decoding (DICOM PS3.5 Annex G).

An RLE frame is a 64-byte header (segment count, 15 offsets) and one PackBits segment per
byte of each sample, each decoding to Rows x Columns bytes. A 2-byte run gives at most 128
bytes, so a segment of L bytes decodes to at most 128 x (L // 2): a 90 KB file can claim
1000 frames of 13000 x 13000, each a 72-byte fragment, and the decoder allocated 169 MB
(0.2 s) per frame before failing; with ``--max-pixels 0``, 65535 x 65535 aborted the process.
Such a frame is refused from its fragment's bytes alone: the decoder is replaced by a spy
that fails the test.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from sslkit.api import Undecodable
from sslkit.registry import create_source
from sslkit_plugins.sources import dicom_decode
from sslkit_plugins.sources.dicom_limits import TooLarge, check_stream_size
from tests.test_dicom_hostile import _encapsulated, decoder  # noqa: F401 (decoder: the fixture)

STAGE = "compressed frame size differs from the header: TooLarge: "


def _rle_frame(*segments: bytes) -> bytes:
    """An RLE frame: the 64-byte header (count, offsets) and its segments."""
    offsets, at = [], 64
    for seg in segments:
        offsets.append(at)
        at += len(seg)
    return struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(segments))) + b"".join(segments)


def _rle_file(path: Path, frames: list[bytes], rows: int, cols: int, bits: int = 8, samples: int = 1) -> Path:
    return _encapsulated(path, frames, RLELossless, bits, rows, cols, samples)


RUN = b"\x81\x00"  # PackBits: repeat the next byte 128 times (-127 as a signed byte)


def _refusals(path: Path, max_pixels: int | None = None) -> list[str]:
    """The reason each frame of the file at ``path`` is refused (in frame order); any frame that loads fails."""
    src = create_source(f"dicom:{path.parent}", workers=1)
    if max_pixels is not None:
        src.max_pixels = max_pixels  # 0: --max-pixels 0, no limit from the header
    reasons = []
    for ref in sorted(src.index(), key=lambda r: r.frame):
        with pytest.raises(Undecodable) as refused:
            src.load(ref)
        reasons.append(str(refused.value))
    return reasons


def test_a_thousand_frames_claiming_13000_squared_are_refused_undecoded(tmp_path, decoder):
    path = _rle_file(tmp_path / "data" / "cine.dcm", [_rle_frame(RUN * 4)] * 1000, 13000, 13000)
    assert path.stat().st_size < 100_000
    src = create_source(f"dicom:{path.parent}", workers=1)
    refs = sorted(src.index(), key=lambda r: r.frame)
    assert [r.frame for r in refs] == list(range(1000))
    for ref in refs:
        with pytest.raises(Undecodable) as refused:
            src.load(ref)
        assert str(refused.value) == (f"{STAGE}RLE frame {ref.frame + 1} holds a segment of 8 bytes (at most 512 "
                                      "decoded), too few for 13000x13000")
    with pytest.raises(Undecodable, match=r"^compressed frame size differs .*RLE frame 1000 holds a segment of 8"):
        src.load_raw(refs[-1])
    assert decoder["refused"] == 0


@pytest.mark.parametrize("bits,samples", [(16, 1), (8, 3)])
def test_65535_squared_is_refused_undecoded_without_a_pixel_limit(tmp_path, decoder, bits, samples):
    segments = [RUN * 900] * (samples * bits // 8)  # 1800 bytes each: 115200 decoded at most
    path = _rle_file(tmp_path / "data" / "big.dcm", [_rle_frame(*segments)] * 2, 65535, 65535, bits, samples)
    assert _refusals(path, max_pixels=0) == [f"{STAGE}RLE frame {i} holds a segment of 1800 bytes (at most 115200 "
                                             "decoded), too few for 65535x65535" for i in (1, 2)]
    assert decoder["refused"] == 0


def test_single_frame_65535_squared_16_bit(tmp_path, decoder):
    path = _rle_file(tmp_path / "data" / "one.dcm", [_rle_frame(RUN * 2000, RUN)], 65535, 65535, 16)
    assert _refusals(path, max_pixels=0) == [f"{STAGE}RLE frame 1 holds a segment of 2 bytes (at most 128 "
                                             "decoded), too few for 65535x65535"]
    assert decoder["refused"] == 0


def test_a_wrong_segment_count_is_refused_undecoded(tmp_path, decoder):
    path = _rle_file(tmp_path / "data" / "one.dcm", [_rle_frame(RUN * 2)], 16, 16, 16)  # 16-bit: 2 segments
    assert _refusals(path) == [f"{STAGE}RLE frame 1 has 1 segment(s), 1 sample(s) of 16 bits need 2"]
    assert decoder["refused"] == 0


def test_a_frame_shorter_than_the_rle_header_is_refused_undecoded(tmp_path, decoder):
    path = _rle_file(tmp_path / "data" / "one.dcm", [b"\x01\x00\x00\x00" * 4], 16, 16)
    assert _refusals(path) == [f"{STAGE}RLE frame 1 is 16 bytes, less than the 64-byte RLE header"]
    assert decoder["refused"] == 0


def test_the_bound_is_exact_a_frame_at_it_decodes(tmp_path, decoder):
    """16 x 16 = 256 bytes: two 2-byte runs (4 bytes) hold them and decode; 17 x 16 is refused."""
    seg = b"\x81\x07" * 2
    data = tmp_path / "data"
    exact = _rle_file(data / "exact.dcm", [_rle_frame(seg)], 16, 16)
    over = _rle_file(tmp_path / "over" / "over.dcm", [_rle_frame(seg)], 17, 16)
    with pytest.raises(TooLarge) as refused:
        check_stream_size(pydicom.dcmread(over), None)
    assert str(refused.value) == "RLE frame 1 holds a segment of 4 bytes (at most 256 decoded), too few for 16x17"
    decoder["allow"] = True
    ds = pydicom.dcmread(exact)
    check_stream_size(ds, None)
    np.testing.assert_array_equal(dicom_decode._stored_frame(ds, None), np.full((16, 16), 7, np.uint8))
    src = create_source(f"dicom:{data}", workers=1)
    (ref,) = src.index()
    assert src.load_raw(ref).tolist() == np.full((1, 16, 16), 7.0, np.float32).tolist()


def _pydicom_rle_files() -> list[Path]:
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in root.glob("*.dcm") if "rle" in p.name.lower()
                  and pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless)


@pytest.mark.parametrize("path", _pydicom_rle_files(), ids=lambda p: p.name)
def test_valid_rle_files_pass_the_check_and_decode_as_pydicom_does(path):
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_stream_size(ds, None)
    expected = pydicom.dcmread(path).pixel_array
    if frames == 1:
        np.testing.assert_array_equal(dicom_decode._stored_frame(ds, None), expected)
    for frame in range(frames):
        check_stream_size(ds, frame)
        got = dicom_decode._stored_frame(ds, frame)
        np.testing.assert_array_equal(got, expected[frame] if frames > 1 else expected)


def test_pydicom_rle_test_files_are_found():
    names = {p.name for p in _pydicom_rle_files()}
    assert {"MR_small_RLE.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_2frame.dcm"} <= names, names
