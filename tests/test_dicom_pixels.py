"""The first pass decodes from pixel bytes the header index located (dicom_pixels.py):
the same pixels as a full read, on every pydicom test file it applies to, and the full
read (with its error) wherever it does not."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from sslkit.registry import create_source
from sslkit_plugins.sources import dicom as dicom_module
from sslkit_plugins.sources.dicom import read_header
from sslkit_plugins.sources.dicom_decode import decode, modality_values, read_dataset
from sslkit_plugins.sources.dicom_pixels import decode_located, native_pixels, pixels_dataset
from sslkit_plugins.sources.dicom_window import parse_windows
from tests.conftest import PYDICOM_FILES
from tests.dicom_factory import write_dicom

WINDOWS = [parse_windows(w) for w in ("auto", "minmax", "400,40")]


def _full(path, frame, windows):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return decode(read_dataset(path), frame, windows)
        except Exception as exc:
            return exc


def test_located_pixels_equal_a_full_read_on_every_pydicom_file():
    located = full_only = 0
    for path in sorted(PYDICOM_FILES.rglob("*")):
        if not path.is_file():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = read_header(str(path))
        if h.get("kind") != "image":
            continue
        facts = h["pixels"]
        if facts is None:
            full_only += 1
            continue
        frames = [None] if h["frames"] == 1 else [0, h["frames"] - 1]
        for windows in WINDOWS:
            for frame in frames:
                full = _full(str(path), frame, windows)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fast = decode_located(str(path), frame, windows, facts)
                if isinstance(full, Exception):  # the source then reads in full and reports this error
                    assert fast is None, path.name
                    continue
                assert fast is not None, (path.name, frame)
                assert fast.dtype == full.dtype and fast.shape == full.shape, path.name
                np.testing.assert_array_equal(fast, full, err_msg=f"{path.name} frame {frame}")
                with warnings.catch_warnings():  # a region (what a cropped volume reads) is the same pixels, cut
                    warnings.simplefilter("ignore")
                    part = decode_located(str(path), frame, windows, facts, region=(slice(1, -1), slice(2, None)))
                np.testing.assert_array_equal(part, full[:, 1:-1, 2:], err_msg=f"{path.name} region")
                located += 1
        if h["samples_per_pixel"] == 1 and not isinstance(_full(str(path), frames[0], WINDOWS[0]), Exception):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw_full = modality_values(read_dataset(str(path)), frames[0])
                raw_fast = decode_located(str(path), frames[0], WINDOWS[0], facts, raw=True)
            np.testing.assert_array_equal(raw_fast, raw_full, err_msg=path.name)
    assert located > 150 and full_only < 25, (located, full_only)  # most files go the short way


def test_the_first_pass_reads_no_header_twice(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i, syntax in enumerate(("explicit", "rle", "j2k")):
        write_dicom(tmp_path / f"{i}.dcm", rng.integers(0, 4096, (40, 48)).astype(np.uint16), bits_stored=12,
                    syntax=syntax, slope=1.0, intercept=-1024.0, window=(400.0, 40.0))
    multi = rng.integers(0, 4096, (3, 40, 48)).astype(np.uint16)
    write_dicom(tmp_path / "multi.dcm", multi, bits_stored=12)
    source = create_source(f"dicom:{tmp_path}")
    refs = source.index()
    expected = [decode(read_dataset(r.path), r.frame, source.windows) for r in refs]

    def no_full_read(path, stop_before_pixels=False):
        raise AssertionError("read in full")

    monkeypatch.setattr(dicom_module, "read_dataset", no_full_read)
    monkeypatch.setattr("sslkit_plugins.sources.dicom_pixels.read_dataset", no_full_read)
    for ref, want in zip(refs, expected):
        np.testing.assert_array_equal(source.load(ref), want)
    assert sum(r.frame is not None for r in refs) == 3


def test_a_file_changed_after_indexing_is_read_in_full_and_reported(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    source = create_source(f"dicom:{tmp_path}")
    (ref,) = source.index()
    assert source.headers[ref.path]["pixels"] is not None
    with open(path, "r+b") as f:  # truncated after the index: the located bytes are gone
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(Exception) as located_way:
        source.load(ref)
    with pytest.raises(Exception) as full_way:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source.headers[ref.path]["pixels"] = None
            source.load(ref)
    assert str(located_way.value) == str(full_way.value)


def test_located_facts_hold_no_identifier(tmp_path):
    write_dicom(tmp_path / "a.dcm", np.ones((8, 8), dtype=np.uint16), patient_id="PID-4711",
                patient_name="Doe^Jane", birth_date="19700101")
    facts = read_header(str(tmp_path / "a.dcm"))["pixels"]
    text = json.dumps(facts)
    assert facts["offset"] > 0 and not any(s in text for s in ("4711", "Doe", "Jane", "19700101"))
    assert {tag >> 16 for tag, _, _ in facts["elements"]} == {0x0028}


def test_stored_value_table_gives_the_pixels_of_the_direct_computation(monkeypatch, tmp_path):
    """decode() looks large images up in a table of every stored value's output: bit-equal."""
    from sslkit_plugins.sources import dicom_decode

    rng = np.random.default_rng(1)
    extra = [write_dicom(tmp_path / "signed.dcm", rng.integers(0, 4096, (64, 64)).astype(np.uint16), slope=2.0,
                         intercept=-1024.5, window=(350.0, 40.0), photometric="MONOCHROME1", bits_stored=12)]
    compared, tables = 0, []
    real = dicom_decode._grayscale
    monkeypatch.setattr(dicom_decode, "_grayscale", lambda arr, *a: tables.append(arr.ndim == 1) or real(arr, *a))
    for path in sorted(PYDICOM_FILES.rglob("*")) + extra:
        if not path.is_file():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = read_dataset(str(path))
                frame = 0 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None
            except Exception:
                continue
            for windows in WINDOWS + [parse_windows("lung,bone,brain")]:
                monkeypatch.setattr(dicom_decode, "TABLE_MIN_PIXELS", 10**12)
                try:
                    direct = decode(ds, frame, windows)
                except Exception:
                    continue
                monkeypatch.setattr(dicom_decode, "TABLE_MIN_PIXELS", 0)
                monkeypatch.setattr(dicom_decode, "TABLE_RATIO", 0)
                looked_up = decode(ds, frame, windows)
                assert looked_up.dtype == direct.dtype
                np.testing.assert_array_equal(looked_up, direct, err_msg=f"{path.name} {windows}")
                compared += 1
    assert compared > 200 and sum(tables) > 150  # most through a table of stored values


def _plain_file(path, stored: np.ndarray, bits_allocated: int, bits_stored: int, signed: int, photometric: str,
                implicit: bool = False, frames: int = 1):
    """A native grayscale file whose pixel bytes are ``stored`` as given: unused high bits
    may hold anything, as some scanners leave them."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CT", 1, photometric
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_allocated, bits_stored, \
        bits_stored - 1, signed
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -1024.0
    ds.PixelData = stored.tobytes() + (b"\0" if stored.nbytes % 2 else b"")
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    ds.save_as(path, enforce_file_format=True)
    return str(path)


@pytest.mark.parametrize("bits_allocated,bits_stored,signed,photometric,implicit,frames,shape", [
    (16, 12, 0, "MONOCHROME2", False, 1, (40, 48)),
    (16, 12, 1, "MONOCHROME2", False, 1, (40, 48)),
    (16, 16, 1, "MONOCHROME1", True, 1, (40, 48)),
    (8, 7, 0, "MONOCHROME2", False, 1, (15, 17)),   # an odd number of bytes: a padding byte follows
    (8, 8, 1, "MONOCHROME1", True, 3, (16, 16)),
    (32, 20, 1, "MONOCHROME2", False, 2, (24, 20)),
    (16, 10, 0, "MONOCHROME2", True, 4, (33, 31)),
])
def test_plain_grayscale_read_by_numpy_equals_pydicom(tmp_path, monkeypatch, bits_allocated, bits_stored, signed,
                                                     photometric, implicit, frames, shape):
    """Stored values with garbage in their unused high bits, signed and unsigned, 8 to 32 bits,
    implicit VR, MONOCHROME1, multi-frame: the numpy read gives pydicom's ``pixel_array``,
    and the decode built on it the pixels of a full read, in every window mode."""
    rng = np.random.default_rng(bits_allocated + bits_stored + signed)
    dtype = np.dtype(f"<{'ui'[signed]}{bits_allocated // 8}")
    info = np.iinfo(dtype)
    stored = rng.integers(info.min, info.max, (frames, *shape), dtype=dtype, endpoint=True)
    path = _plain_file(tmp_path / "a.dcm", stored if frames > 1 else stored[0], bits_allocated, bits_stored, signed,
                       photometric, implicit, frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = read_header(path)
        facts = h["pixels"]
        assert facts["native"][:2] + facts["native"][3:] == [*shape, bits_stored] and np.dtype(facts["native"][2]) == dtype
        full = read_dataset(path)
        for frame in (range(frames) if frames > 1 else [None]):
            want = full.pixel_array if frames == 1 else full.pixel_array[frame]
            got = native_pixels(path, facts, frame)
            assert got.dtype == want.dtype and got.flags.writeable
            np.testing.assert_array_equal(got, want)
            for windows in WINDOWS:
                np.testing.assert_array_equal(decode_located(path, frame, windows, facts),
                                              decode(full, frame, windows))
            np.testing.assert_array_equal(decode_located(path, frame, WINDOWS[0], facts, raw=True),
                                          modality_values(full, frame))


def test_the_plain_grayscale_way_is_the_one_taken_and_a_short_file_is_not_read_by_it(tmp_path, monkeypatch):
    from sslkit_plugins.sources import dicom_pixels

    stored = np.arange(40 * 48, dtype=np.uint16).reshape(40, 48)
    path = _plain_file(tmp_path / "a.dcm", stored, 16, 16, 0, "MONOCHROME2")
    facts = read_header(path)["pixels"]
    monkeypatch.setattr(dicom_pixels, "pixels_dataset", lambda *a: pytest.fail("read through pydicom"))
    assert decode_located(path, None, WINDOWS[2], facts) is not None
    short = dict(facts, end=facts["end"] - 2, native=facts["native"])  # one sample fewer than rows x columns
    assert native_pixels(path, short, None) is None


def test_minmax_short_way_equals_the_general_one():
    """_minmax skips its NaN and clip passes when min and max are finite and the range
    cannot overflow: bit-equal to the general computation on ranges from 1e-30 to 3e38,
    constants, NaN, infinities, and values one ulp apart."""
    from sslkit_plugins.sources.dicom_window import _minmax, _unit

    def general(x):
        finite = x[np.isfinite(x)]
        if not finite.size:
            return np.zeros_like(x, dtype=np.float32)
        lo, hi = float(finite.min()), float(finite.max())
        return np.zeros_like(x, dtype=np.float32) if hi <= lo else _unit((x - lo) / (hi - lo))

    rng = np.random.default_rng(0)
    cases = [(rng.normal(size=(64, 64)) * s).astype(np.float32) for s in (1e-30, 1e-3, 1, 1e3, 1e20, 1e37, 1e38)]
    cases += [np.full((8, 8), 5, np.float32), np.zeros((0, 3), np.float32),
              *(np.array([[v, 1, 2]], np.float32) for v in (np.nan, np.inf, -np.inf)),
              np.array([[-3e38, 3e38, 0]], np.float32)]
    for _ in range(500):
        a = rng.uniform(-1e6, 1e6, (2, 3)).astype(np.float32)
        cases += [a, np.nextafter(a, np.float32(np.inf))]
    with np.errstate(all="ignore"):
        for x in cases:
            want, got = general(x), _minmax(x)
            assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want), x
