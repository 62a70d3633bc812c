"""Data sources on an audit's hostile inputs: an npz whose index would not fit memory, a .nii.gz with
data appended past its voxels, a skip for lack of memory (never cached), a DICOM rescale giving NaN or
inf, header values holding control characters in ``sslkit data inspect``'s text."""

from __future__ import annotations

import gzip
import warnings
import zlib

import numpy as np
import pytest

import sslkit_plugins.sources.npz as npz_mod
from sslkit.data.pipeline import load_data
from sslkit.registry import create_source
from sslkit_plugins.sources.folder import FolderSource
from tests.conftest import make_images, one_line_error
from tests.dicom_factory import write_dicom


# --- 1: an npz of many tiny images: its index is refused from the header ---------------------------
def test_an_image_count_whose_index_would_not_fit_memory_is_one_line(tmp_path, cli, monkeypatch):
    per = npz_mod.INDEX_BYTES_PER_IMAGE
    monkeypatch.setattr(npz_mod, "available_memory", lambda: 2 * 100 * per)  # half of it: 100 images' index
    np.savez_compressed(tmp_path / "many.npz", train_images=np.zeros((101, 2, 2), np.uint8))
    np.savez(tmp_path / "mapped.npz", train_images=np.zeros((101, 2, 2), np.uint8))
    for name in ("many.npz", "mapped.npz"):  # compressed or memory-mapped: the index costs the same
        one_line_error(cli("data", "inspect", f"npz:{tmp_path / name}", "--image-size", "16"),
                        "(101, 2, 2) holds 101 images", "more than half the available memory", "max_gb")
    np.savez_compressed(tmp_path / "fits.npz", train_images=np.arange(400, dtype=np.uint8).reshape(100, 2, 2))
    src = create_source(f"npz:{tmp_path / 'fits.npz'}")
    refs = src.index()
    assert len(refs) == 100
    expected = np.arange(28, 32, dtype=np.float32).reshape(2, 2) / np.float32(255)
    np.testing.assert_array_equal(src.load(refs[7])[0], expected)
    src = create_source(f"npz:{tmp_path / 'many.npz'}", max_gb=1e-3)  # the bound raised: indexed
    assert len(src.index()) == 101


# --- 2: a .nii.gz is inflated only up to its voxels ------------------------------------------------
def _nifti_bytes(seed: int = 0) -> tuple[bytes, np.ndarray]:
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(seed).random((6, 7, 5)).astype(np.float32)
    return nib.Nifti1Image(vol, np.eye(4)).to_bytes(), vol


def test_a_nii_gz_with_appended_data_decodes_and_stops_at_its_voxels(tmp_path, monkeypatch):
    from sslkit_plugins.sources import nifti_read

    raw, vol = _nifti_bytes()
    trailing = 8 * 2**20
    co = zlib.compressobj(9, zlib.DEFLATED, 31)  # one gzip member: voxels, then megabytes of zeros
    (tmp_path / "bomb.nii.gz").write_bytes(co.compress(raw) + co.compress(bytes(trailing)) + co.flush())
    read = []
    real_open = gzip.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            assert n is not None and n >= 0, "an unbounded read"
            out = self.f.read(n)
            read.append(len(out))
            return out

    monkeypatch.setattr(gzip, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    img = nifti_read.read_image(str(tmp_path / "bomb.nii.gz"))
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)  # what nibabel has for the clean file
    assert len(raw) <= sum(read) <= len(raw) + nifti_read.GZIP_TAIL < trailing
    monkeypatch.undo()
    src = create_source(f"nifti:{tmp_path}")
    refs = src.index()
    assert len(refs) == 5 and not src.skipped
    assert src.load(refs[0]).shape == (1, 7, 6)


def test_a_nii_gz_shorter_than_its_voxels_or_with_a_bad_crc_is_still_skipped(tmp_path):
    from sslkit_plugins.sources import nifti_read

    raw, _ = _nifti_bytes(1)
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:-100]))
    bad = bytearray(gzip.compress(raw))
    bad[-8] ^= 0xFF  # the CRC: the stream ends within what is read, so it is checked
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="not enough data"):
        nifti_read.canonical_volume(nifti_read.read_image(str(tmp_path / "short.nii.gz")))
    with pytest.raises(gzip.BadGzipFile, match="CRC"):
        nifti_read.read_image(str(tmp_path / "crc.nii.gz"))


# --- 3: a skip for lack of memory is reported, never cached ----------------------------------------
def test_a_memory_error_skip_is_not_cached_and_the_next_run_decodes_the_file(tmp_path, monkeypatch):
    data = make_images(tmp_path / "imgs", n_per_class=3, size=24)
    original, calls, failed = FolderSource.load, [], []

    def short_of_memory(self, ref):  # the first load of a/1.png meets a memory limit, no later one
        calls.append(ref.path)
        if ref.path.endswith("a/1.png") and not failed:
            failed.append(ref.path)
            raise MemoryError()
        return original(self, ref)

    monkeypatch.setattr(FolderSource, "load", short_of_memory)
    cache = tmp_path / "cache"
    first = load_data(f"folder:{data}", 16, cache_dir=cache, progress=False)
    assert len(first.prepared) == 5
    reasons = [reason for _, reason in first.prepared.skipped]
    assert reasons == ["MemoryError: decoding it needs more memory than is free"]
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]  # no entry kept
    calls.clear()
    again = load_data(f"folder:{data}", 16, cache_dir=cache, progress=False)
    assert len(again.prepared) == 6 and again.prepared.skipped == [] and len(calls) == 6
    calls.clear()
    third = load_data(f"folder:{data}", 16, cache_dir=cache, progress=False)  # now cached
    assert calls == [] and len(third.prepared) == 6
    np.testing.assert_array_equal(np.asarray(third.prepared.pixels), np.asarray(again.prepared.pixels))


# --- 4: a DICOM rescale giving NaN or inf: skipped with its reason, not an image of zeros -----------
def test_a_dicom_rescale_giving_nan_or_inf_is_skipped(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from sslkit_plugins.sources.dicom_window import _minmax

    cases = {"nan": ("NaN", "0"), "ninf": ("1", "-inf"), "huge": ("-1e308", "0"), "ok": ("1", "-1024")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid DS values it writes
        for name, (slope, intercept) in cases.items():
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            ds.save_as(tmp_path / f"{name}.dcm")
        data = load_data(f"dicom:{tmp_path}", 32, progress=False)
    assert [r.path.rsplit("/", 1)[-1] for r in data.prepared.refs] == ["ok.dcm"]
    assert sorted(p for p, _ in data.prepared.skipped) == ["huge.dcm", "nan.dcm", "ninf.dcm"]
    assert all("gives NaN or infinite values" in why for _, why in data.prepared.skipped)
    x = data.source.load(data.prepared.refs[0])  # the good file: min-max of its own range
    assert x.shape == (1, 128, 128) and x.min() == 0 and x.max() == 1
    with pytest.raises(ValueError, match="no finite pixel value"):
        _minmax(np.full((4, 4), np.nan, np.float32))  # float pixel data holding no finite value


# --- 5: header values are printed escaped ------------------------------------------------------------
def test_inspect_prints_header_values_escaped(tmp_path, cli):
    img = (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid CS value it writes
        write_dicom(tmp_path / "d" / "a.dcm", img, modality="\x1b[31mCT\nX")
    write_dicom(tmp_path / "d" / "b.dcm", img, modality="CT")
    result = cli("data", "inspect", f"dicom:{tmp_path / 'd'}", "--image-size", "16")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\nX" not in result.output
    line = next(ln for ln in result.output.splitlines() if "\\x1b" in ln)
    assert "\\x1b[31MCT\\nX 1" in line and "CT 1" in line
