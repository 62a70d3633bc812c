"""Hostile DICOM files found by an audit: a skip reason that named a file, compressed frames
whose own header claims a huge size, a deflated data set that inflates to gigabytes.

Every crafted file is a few KB; each refusal is asserted to happen before anything large is
allocated (the decoder / pydicom's one-call inflate are replaced by spies that fail the test).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless,
                         generate_uid)

from sslkit.api import Undecodable
from sslkit.plugins import get_plugins
from sslkit.pseudonym import file_key
from sslkit.registry import create_source
from sslkit_plugins.sources import dicom_decode
from sslkit_plugins.sources.dicom_decode import read_dataset
from tests.dicom_factory import write_dicom
from tests.test_series import AXIAL, write_slice

CT = "1.2.840.10008.5.1.4.1.1.2"
HUGE = 30000


# ---------------------------------------------------------------- 1: a file's name in a skip reason


def test_repeated_slice_reason_names_the_kept_file_by_its_key_only(tmp_path):
    folder = tmp_path / "DOE_JOHN_19610301"
    uid = generate_uid()
    paths = [write_slice(folder / f"IM_DOE_JOHN_{i}.dcm", np.full((6, 5), i, np.uint16), uid,
                         (0.0, 0.0, float(2 if i == 3 else i)), AXIAL, instance=i + 1) for i in range(6)]
    src = create_source(f"dicom:{tmp_path}", workers=1, sample="slab:3")
    src.index()
    repeats = [(p, r) for p, r in src.skipped if r.startswith("slice position repeated")]
    assert len(repeats) == 1, src.skipped
    dropped, reason = repeats[0]
    for word in ("DOE", "JOHN", "IM_", ".dcm", "19610301"):
        assert word not in reason, reason
    kept = {str(paths[2]), str(paths[3])} - {str(dropped)}
    assert len(kept) == 1
    # named as data_report.json names files: the keyed hash of its path below the data root
    assert reason == f"slice position repeated in its series: {file_key(src.relative(kept.pop()))}'s is used"


# ---------------------------------------------------------------- 3: a compressed frame that claims a huge size


def _jpeg(rows: int, cols: int, claim: tuple[int, int] | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.arange(rows * cols) % 251).astype(np.uint8).reshape(rows, cols)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    if claim:
        sof = data.find(b"\xff\xc0")
        struct.pack_into(">HH", data, sof + 5, *claim)  # height, width
    return bytes(data)


def _j2k_codestream(tmp_path, claim: int) -> bytes:
    """A real 64x64 JPEG 2000 codestream whose SIZ marker says ``claim`` x ``claim``."""
    ds = pydicom.dcmread(write_dicom(tmp_path / "src" / "j2k.dcm", np.zeros((64, 64), np.uint16), syntax="j2k"))
    stream = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    siz = stream.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">IIIIII", stream, siz + 8, claim, claim, 0, 0, claim, claim)  # image and tile size
    return bytes(stream)


def _jp2(codestream: bytes) -> bytes:
    """``codestream`` in a JP2 file: signature, file type and contiguous codestream boxes."""
    return (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I4s4sI4s", 20, b"ftyp", b"jp2 ", 0, b"jp2 ")
            + struct.pack(">I4s", 8 + len(codestream), b"jp2c") + codestream)


def _jpeg_ls(claim: int) -> bytes:
    """A JPEG-LS stream's start (SOI, SOF55 of ``claim`` x ``claim`` 8-bit samples) and junk."""
    return b"\xff\xd8" + b"\xff\xf7" + struct.pack(">HBHHBBBB", 11, 8, claim, claim, 1, 1, 0x11, 0) + b"\0" * 64


def _encapsulated(path, frames: list[bytes], syntax: str, bits: int = 8, rows: int = 16, cols: int = 16,
                  samples: int = 1, fragments: int = 1):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "P1", generate_uid(), generate_uid(), "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames, fragments_per_frame=fragments)
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def decoder(monkeypatch):
    """pydicom's decoder, reachable only while ``decoder["allow"]`` is set (else the test fails)."""
    state = {"allow": False, "refused": 0}
    real = dicom_decode.pixel_array

    def spy(ds, *args, **kwargs):
        if not state["allow"]:
            state["refused"] += 1
            raise AssertionError("a frame that claims more than its bytes hold reached the decoder")
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(dicom_decode, "pixel_array", spy)
    return state


@pytest.mark.parametrize("kind", ["JPEG", "JPEG-LS", "JPEG 2000", "JP2"])
def test_compressed_frame_claiming_a_huge_size_is_refused_before_decoding(tmp_path, decoder, kind):
    data = tmp_path / "data"
    bad = data / "bad.dcm"
    if kind == "JPEG":
        _encapsulated(bad, [_jpeg(16, 16, (HUGE, HUGE))], JPEGBaseline8Bit)
    elif kind == "JPEG-LS":
        _encapsulated(bad, [_jpeg_ls(HUGE)], JPEGLSLossless)
    else:
        stream = _j2k_codestream(tmp_path, HUGE)
        _encapsulated(bad, [_jp2(stream) if kind == "JP2" else stream], JPEG2000Lossless, bits=16)
    assert bad.stat().st_size < 8192
    pixels = np.arange(4096, dtype=np.uint16).reshape(64, 64) * 13
    good = write_dicom(data / "good.dcm", pixels, syntax="j2k", study_uid="1.2.3")
    plain = write_dicom(tmp_path / "plain" / "plain.dcm", pixels, study_uid="1.2.3")
    src = create_source(f"dicom:{data}", workers=1)
    refs = {r.path: r for r in src.index()}
    assert set(refs) == {str(bad), str(good)}
    with pytest.raises(Undecodable) as refused:
        src.load(refs[str(bad)])
    named = "JPEG 2000" if kind == "JP2" else kind
    assert str(refused.value) == (f"compressed frame size differs from the header: TooLarge: the {named} stream "
                                  f"is {HUGE}x{HUGE} with 1 component(s), the header says 16x16 with 1")
    with pytest.raises(Undecodable, match=r"^compressed frame size differs from the header: .*30000x30000"):
        src.load_raw(refs[str(bad)])
    assert decoder["refused"] == 0
    decoder["allow"] = True  # a stream of the header's own size decodes as before (lossless: bit-equal)
    expected = create_source(f"dicom:{plain.parent}", workers=1)
    np.testing.assert_array_equal(src.load(refs[str(good)]), expected.load(expected.index()[0]))


def test_one_frame_of_a_multiframe_file_claiming_a_huge_size(tmp_path, decoder):
    path = _encapsulated(tmp_path / "data" / "cine.dcm", [_jpeg(16, 16), _jpeg(16, 16, (16, HUGE))], JPEGBaseline8Bit)
    src = create_source(f"dicom:{path.parent}", workers=1)
    refs = sorted(src.index(), key=lambda r: r.frame)
    assert [r.frame for r in refs] == [0, 1]
    with pytest.raises(Undecodable, match=f"the JPEG stream is {HUGE}x16 with 1 component.s., the header says 16x16"):
        src.load(refs[1])
    assert decoder["refused"] == 0
    decoder["allow"] = True
    assert src.load(refs[0]).shape == (1, 16, 16)


def _padded(stream: bytes, pad: int) -> bytes:
    """``stream`` with ``pad`` bytes of APP15 segments (65,533 data bytes each at most) after its SOI."""
    segments = []
    while pad > 0:
        n = min(pad, 65533)
        segments.append(b"\xff\xef" + struct.pack(">H", n + 2) + b"\0" * n)
        pad -= n
    return stream[:2] + b"".join(segments) + stream[2:]


@pytest.mark.parametrize("fragments", [1, 3])
def test_a_frame_header_behind_a_mib_of_app_segments_is_read_too(tmp_path, decoder, fragments):
    """The check read a frame's first MiB: a JPEG whose 30000 x 30000 claim sat behind 1.1 MiB of APPn
    segments reached the decoder. It is refused, in one fragment or several; a truthful frame behind the
    same segments decodes to the pixels of the frame without them."""
    pad, data = (1 << 20) + 100_000, tmp_path / "data"
    _encapsulated(data / "bad.dcm", [_padded(_jpeg(16, 16, (HUGE, HUGE)), pad)], JPEGBaseline8Bit,
                  fragments=fragments)
    _encapsulated(data / "good.dcm", [_padded(_jpeg(16, 16), pad)], JPEGBaseline8Bit, fragments=fragments)
    _encapsulated(data / "plain.dcm", [_jpeg(16, 16)], JPEGBaseline8Bit)
    src = create_source(f"dicom:{data}", workers=1)
    refs = {r.path.rsplit("/", 1)[-1]: r for r in src.index()}
    with pytest.raises(Undecodable, match=f"the JPEG stream is {HUGE}x{HUGE} with 1 component.s., the header says"):
        src.load(refs["bad.dcm"])
    assert decoder["refused"] == 0
    decoder["allow"] = True
    np.testing.assert_array_equal(src.load(refs["good.dcm"]), src.load(refs["plain.dcm"]))


def test_one_frame_of_a_multiframe_file_claiming_a_huge_size_behind_a_mib_of_app_segments(tmp_path, decoder):
    frames = [_jpeg(16, 16), _padded(_jpeg(16, 16, (16, HUGE)), (1 << 20) + 100_000)]
    path = _encapsulated(tmp_path / "data" / "cine.dcm", frames, JPEGBaseline8Bit)
    src = create_source(f"dicom:{path.parent}", workers=1)
    refs = sorted(src.index(), key=lambda r: r.frame)
    with pytest.raises(Undecodable, match=f"the JPEG stream is {HUGE}x16 with 1 component.s., the header says 16x16"):
        src.load(refs[1])
    assert decoder["refused"] == 0


def test_a_jp2_codestream_behind_a_mib_of_boxes_is_read_too(tmp_path, decoder):
    jp2, pad = _jp2(_j2k_codestream(tmp_path, HUGE)), (1 << 20) + 100_000
    xml = struct.pack(">I4s", 8 + pad, b"xml ") + b" " * pad  # after the signature and file type boxes
    path = _encapsulated(tmp_path / "data" / "bad.dcm", [jp2[:32] + xml + jp2[32:]], JPEG2000Lossless, bits=16)
    src = create_source(f"dicom:{path.parent}", workers=1)
    with pytest.raises(Undecodable, match=f"the JPEG 2000 stream is {HUGE}x{HUGE} with 1 component"):
        src.load(src.index()[0])
    assert decoder["refused"] == 0


# ---------------------------------------------------------------- 5: a deflated data set that inflates to gigabytes


def _deflated(path, private: int = 0):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "P1", "1.2.3", generate_uid(), "CT"
    ds.set_pixel_data((np.arange(32 * 32, dtype=np.uint16) * 7).reshape(32, 32), "MONOCHROME2", 16,
                      generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if private:
        ds.add_new(0x00291010, "LO", "ACME 1")
        ds.add_new(0x00291011, "OB", b"\0" * private)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_deflated_data_set_is_inflated_within_a_limit(tmp_path, monkeypatch):
    limit = 100_000
    spec = importlib.util.find_spec("sslkit_plugins.sources.dicom_deflate")
    if spec is not None:  # the limit is ~375 MB: a test file that big is not made here
        monkeypatch.setattr(importlib.import_module(spec.name), "DEFLATE_LIMIT", limit)
    good = _deflated(tmp_path / "data" / "good.dcm")
    bomb = _deflated(tmp_path / "data" / "bomb.dcm", private=3_000_000)
    assert bomb.stat().st_size < 16384
    expected = pydicom.dcmread(good)
    get_plugins()  # loaded before the spy: an import can call zlib.decompress (a zipped package)
    calls = []
    real = zlib.decompress
    monkeypatch.setattr(zlib, "decompress", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))

    src = create_source(f"dicom:{tmp_path / 'data'}", workers=1)
    refs = src.index()
    assert [r.path for r in refs] == [str(good)]
    assert [(p, r) for p, r in src.skipped] == [
        (str(bomb), "unreadable header: TooLarge: deflated data set larger than 97.7 KiB inflated (the limit)")]
    assert calls == []  # never inflated in one call
    ds = read_dataset(str(good))
    assert ds == expected and ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, expected.pixel_array)
    out = src.load(refs[0])
    assert out.shape == (1, 32, 32) and float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert calls == []


def test_a_header_reread_for_a_skip_reason_is_inflated_within_the_limit(tmp_path, monkeypatch):
    """A decode failure re-reads the file's header to drop its identifying values from the reason
    (dicom_reasons.header_of): that read must be the source's own, bounded one, not a plain dcmread that
    inflates a deflated data set whole (a file replaced by a bomb between indexing and decoding)."""
    from sslkit_plugins.sources import dicom_deflate
    from sslkit_plugins.sources.dicom_reasons import header_of

    monkeypatch.setattr(dicom_deflate, "DEFLATE_LIMIT", 100_000)
    bomb = _deflated(tmp_path / "bomb.dcm", private=3_000_000)
    calls = []
    real = zlib.decompress
    monkeypatch.setattr(zlib, "decompress", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    assert header_of(str(bomb)) is None and calls == []
    assert header_of(str(_deflated(tmp_path / "good.dcm"))).PatientID == "P1"
