"""Crafted files whose decoding would need many times their size in memory: refused from the
header with one line, or decoded with bounded temporaries (all files a few KB; limits small)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from sslkit.data.source import Undecodable
from sslkit.data.unit_range import unit_floats
from sslkit_plugins.sources import folder_tiff
from sslkit_plugins.sources.folder import FolderSource


def _row(w: int, bpp: int) -> bytes:
    return bytes(range(256)) * (w * bpp // 256) + b"\x07" * (w * bpp % 256)


def _png(path: Path, w: int, h: int, bitdepth: int, ctype: int, bpp: int) -> Path:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + _row(w, bpp) for _ in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bitdepth, ctype, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    return path


def test_16_bit_rgba_png_beyond_the_byte_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    path = _png(tmp_path / "d" / "x.png", 64, 64, 16, 6, 8)  # 64 x 64 x 4 samples x 2 bytes = 32 KiB decoded
    src = FolderSource(str(tmp_path / "d"))
    src.max_pixels = 64 * 64  # under the pixel limit, over 4 bytes a pixel of it
    decoded = []
    import sslkit_plugins.sources.folder_decode as fd
    monkeypatch.setattr(fd, "_unpacked", lambda *a: decoded.append(a) or np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(Undecodable, match="too large to decode: 64x64 pixels x 4 samples x 2 bytes"):
        src.load(src.index()[0])
    assert decoded == []  # refused before anything was decoded
    src.max_pixels = 64 * 64 * 2  # within the limit: decoded, all 16 bits kept
    monkeypatch.undo()
    x = src.load(src.index()[0])
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    row = np.frombuffer(_row(64, 8), ">u2").reshape(64, 4)[:, :3] / 65535.0  # RGBA 16-bit, big-endian
    np.testing.assert_allclose(x[:, 0, :].T, row, atol=1e-6)


def test_16_bit_png_colour_joins_bands_without_full_size_temporaries(tmp_path, monkeypatch):
    """The 16-bit values are built in the result a band at a time: the largest temporary is a
    band, not another image (the high and low 8-bit decodes are never held at once)."""
    import sslkit_plugins.sources.folder_decode as fd

    path = _png(tmp_path / "x.png", 40, 600, 16, 6, 8)
    held, real = [], fd._unpacked

    def unpacked(p, mode):
        out = real(p, mode)
        held.append(out)
        return out

    monkeypatch.setattr(fd, "_unpacked", unpacked)
    wide = fd.png16_colour(str(path), "RGBA;16B")
    assert wide.shape == (3, 600, 40) and wide.dtype == np.uint16  # alpha dropped here, not copied out
    import sys
    assert sys.getrefcount(held[0]) <= 3  # the high bytes were released before the low ones were decoded
    b = np.frombuffer(_row(40, 8), ">u2").reshape(40, 4)[:, :3].T
    np.testing.assert_array_equal(wide[:, 0, :], b)


def test_cmyk_conversion_works_in_bands_over_its_input():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, (4, 700, 33), dtype=np.uint16)
    want = np.empty((3, 700, 33), np.uint16)
    for i in range(3):
        want[i] = ((65535 - a[i].astype(np.uint64)) * (65535 - a[3].astype(np.uint64)) + 32767) // 65535
    out = folder_tiff.cmyk_to_rgb(a.copy(), band=64)
    np.testing.assert_array_equal(out, want)
    b = a.copy()
    out = folder_tiff.cmyk_to_rgb(b, band=64)
    assert np.shares_memory(out, b)  # written over the C, M, Y planes: no new image


def test_float64_beyond_float32_is_scaled_in_bands(monkeypatch):
    """A float64 image of +-1e300 is scaled with band-sized float64 temporaries, not image-sized ones."""
    a = np.zeros((600, 512), np.float64)
    a[0, 0], a[1, 1], a[300, 7] = 1e300, -1e300, 5e299
    biggest = []
    real = np.ndarray.astype

    class Spy(np.ndarray):
        def astype(self, dtype, *args, **kw):
            out = real(np.asarray(self), dtype, *args, **kw)
            if np.dtype(dtype) == np.float64:
                biggest.append(out.nbytes)
            return out

    import sslkit.data.unit_range as ur
    monkeypatch.setattr(ur, "WIDE_BAND", 512 * 64)
    x = unit_floats(a.view(Spy))
    assert x.dtype == np.float32 and x.shape == a.shape
    assert x[1, 1] == 0.0 and x[0, 0] == 1.0 and abs(float(x[300, 7]) - 0.75) < 1e-6 and abs(float(x[5, 5]) - 0.5) < 1e-6
    assert biggest and max(biggest) <= 512 * 64 * 8  # a band's, never the whole image's


def test_nifti_gz_whose_working_bytes_exceed_the_limit_is_skipped_at_the_index(tmp_path, monkeypatch):
    nib = pytest.importorskip("nibabel")
    from sslkit_plugins.sources import nifti

    d = tmp_path / "nii"
    d.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.uint8), np.eye(4)), str(d / "v.nii.gz"))
    src = nifti.NiftiSource(str(d))
    src.max_pixels = 32 * 32 * 16 * 5 // nifti.BYTES_PER_LIMIT_PIXEL - 1  # slices fit; 5 bytes a voxel do not
    read = []
    monkeypatch.setattr(nifti, "read_image", lambda p: read.append(p))
    assert src.index() == []
    [(_, why)] = src.skipped
    assert why.startswith("too large to decode: 32x32x16 voxels x (1 stored + 4 float32) bytes") and "\n" not in why
    assert read == []


def test_nifti_volume_is_one_float32_copy_laid_out_as_before(tmp_path, monkeypatch):
    nib = pytest.importorskip("nibabel")
    from sslkit_plugins.sources import nifti

    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 3000, (6, 5, 4, 2)).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([-1.0, 2.0, 3.0, 1.0]))  # x flipped: reoriented to RAS+
    img.header.set_slope_inter(0.5, -3.0)
    path = tmp_path / "v.nii.gz"
    nib.save(img, str(path))
    made = []
    real = np.ascontiguousarray
    monkeypatch.setattr(np, "ascontiguousarray", lambda x, *a, **k: made.append(x.nbytes) or real(x, *a, **k))
    vol, spacing = nifti.canonical_volume(nifti.read_image(str(path)))
    canon = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, dtype=np.float32)
    want = canon.transpose(3, 2, 1, 0)[:, :, ::-1, ::-1]
    np.testing.assert_array_equal(vol, want)
    assert vol.flags.c_contiguous and spacing == (3.0, 2.0, 1.0)
    assert not [n for n in made if n >= vol.nbytes]  # no second whole-volume float32 copy
