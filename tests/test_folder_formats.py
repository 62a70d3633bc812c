"""Image formats the ``folder`` source decoded wrong, as an audit found them: every value is
compared with Pillow's on the same file (or with the same pixels stored uncompressed).

* TIFF photometrics: CMYK is RGB as Pillow converts it (it kept C, M, Y as R, G, B and took
  K for alpha); MINISWHITE grey, 1-bit bool included, is inverted; YCbCr (returned raw by
  tifffile) is Pillow's RGB; CIELAB, which neither reads, is refused with a clear reason;
* 16-bit colour PNGs reduced while decoding keep 16 bits (they went through Pillow at 8);
* LZW / CCITT TIFFs decode without the imagecodecs package (Pillow reads them), and one
  that Pillow cannot read either names the package in its skip reason;
* tifffile's logger does not print a file's name, and a TIFF with no pages has a reason
  (it was "IndexError");
* 8-bit grey + alpha PNGs are one channel, as the channel probe says.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslkit.api import Undecodable, skip_reason
from sslkit_plugins.sources.folder import FolderSource

tifffile = pytest.importorskip("tifffile")

RNG = np.random.default_rng(7)
PRIVATE = "DOE_JOHN_19610301"


def source_and_ref(path: Path):
    src = FolderSource(str(path.parent))
    (ref,) = [r for r in src.index() if Path(r.path).name == path.name]
    return src, ref


def load(path: Path, **attrs) -> np.ndarray:
    """The ``folder`` source's pixels of the one file ``path`` (attributes of the source set first)."""
    src, ref = source_and_ref(path)
    for k, v in attrs.items():
        setattr(src, k, v)
    return src.load(ref)


def channels(path: Path) -> int | None:
    src, ref = source_and_ref(path)
    return src.channels_of(ref)


def pillow(path: Path, mode: str) -> np.ndarray:
    """Pillow's displayed values of ``path`` in ``mode`` ("RGB" or "L"), float32 (C, H, W) / 255."""
    a = np.asarray(Image.open(path).convert(mode), np.float32) / 255.0
    return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]


def has_imagecodecs() -> bool:
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return False
    return True


# --- 1. TIFF photometric interpretations ----------------------------------------------------------------------------


def test_a_cmyk_tiff_is_rgb_as_pillow_converts_it(tmp_path):
    rgb = RNG.integers(0, 256, (30, 26, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "pil.tif")  # Pillow's CMYK: K = 0
    cmyk = RNG.integers(0, 256, (30, 26, 4), dtype=np.uint8)  # every ink, K included
    tifffile.imwrite(tmp_path / "ink.tif", cmyk, photometric="separated")
    for name in ("pil.tif", "ink.tif"):
        x = load(tmp_path / name)
        assert x.shape == (3, 30, 26) and channels(tmp_path / name) == 3, name
        np.testing.assert_array_equal(x, pillow(tmp_path / name, "RGB"), err_msg=name)
    np.testing.assert_allclose(load(tmp_path / "pil.tif"), rgb.transpose(2, 0, 1) / 255.0, atol=1 / 255 + 1e-6)


def test_a_cmyk_tiff_reduced_while_decoding_is_pillows_rgb_reduced(tmp_path):
    cmyk = RNG.integers(0, 256, (64, 48, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "ink.tif", cmyk, photometric="separated")
    small = load(tmp_path / "ink.tif", decode_side=16)  # 48 >= 2 x 16: reduced by 3
    assert small.shape == (3, 22, 16)  # 64 rows: 21 boxes of 3 and one of 1
    rows = np.add.reduceat(pillow(tmp_path / "ink.tif", "RGB").astype(np.float64), np.arange(0, 64, 3), axis=1)
    boxes = np.add.reduceat(rows, np.arange(0, 48, 3), axis=2)
    counts = np.minimum(3, 64 - np.arange(0, 64, 3))[:, None] * 3
    np.testing.assert_allclose(small, boxes / counts, atol=1e-6)


def test_miniswhite_grey_and_bool_tiffs_are_inverted_as_displayed(tmp_path):
    g8 = RNG.integers(0, 256, (20, 24), dtype=np.uint8)
    g16 = RNG.integers(0, 65536, (20, 24), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "white8.tif", g8, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "white16.tif", g16, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "bool.tif", g8 > 128)  # tifffile writes a bool image as 1-bit MINISWHITE
    with tifffile.TiffFile(tmp_path / "bool.tif") as tif:
        assert tif.pages[0].photometric == 0 and tif.pages[0].bitspersample == 1
    for name in ("white8.tif", "bool.tif"):
        x = load(tmp_path / name)
        assert channels(tmp_path / name) == x.shape[0] == 1, name
        np.testing.assert_array_equal(x, pillow(tmp_path / name, "L"), err_msg=name)
    np.testing.assert_array_equal(load(tmp_path / "bool.tif"), (g8 <= 128)[None].astype(np.float32))
    # 16 bits: inverted within 0..65535 (Pillow 13 reads a 16-bit MINISWHITE page as I;16 and does not invert it)
    np.testing.assert_array_equal(load(tmp_path / "white16.tif"), (65535 - g16)[None].astype(np.float32) / 65535.0)


def test_a_ycbcr_tiff_is_pillows_rgb_and_a_cielab_one_is_refused(tmp_path):
    raw = RNG.integers(0, 256, (16, 18, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "ycc.tif", raw, photometric="ycbcr", subsampling=(1, 1))
    assert Image.open(tmp_path / "ycc.tif").mode == "YCbCr"
    x = load(tmp_path / "ycc.tif")
    np.testing.assert_array_equal(x, pillow(tmp_path / "ycc.tif", "RGB"))
    assert not np.allclose(x, raw.transpose(2, 0, 1) / 255.0, atol=0.05)  # not the raw Y, Cb, Cr
    tifffile.imwrite(tmp_path / "lab.tif", raw, photometric="cielab")
    with pytest.raises(Undecodable, match="TIFF photometric CIELAB is not supported"):
        load(tmp_path / "lab.tif")


# --- 2. 16-bit colour PNGs reduced while decoding ---------------------------------------------------------------------


def png16_constant(path: Path, side: int, value: int, colour_type: int, c: int) -> Path:
    """A ``side`` x ``side`` 16-bit PNG every sample of which is ``value`` (filter None)."""
    row = b"\x00" + np.full((side, c), value, ">u2").tobytes()
    co = zlib.compressobj()
    idat = b"".join(co.compress(row) for _ in range(side)) + co.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    head = struct.pack(">IIBBBBB", side, side, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("colour_type,c", [(2, 3), (6, 4), (4, 2)], ids=["rgb", "rgba", "grey_alpha"])
def test_16_bit_colour_pngs_reduced_while_decoding_keep_16_bits(tmp_path, colour_type, c):
    """0x0180 = 384 has a zero high byte's neighbour: at 8 bits it came back as 1/255 (or 0)."""
    path = png16_constant(tmp_path / "big.png", 128, 0x0180, colour_type, c)
    x = load(path, decode_side=64)  # 128 >= 2 x 64: reduced by 2, as a 4096 px image is by default
    want_c = 1 if c == 2 else 3
    assert x.shape == (want_c, 64, 64) and channels(path) == want_c
    np.testing.assert_array_equal(x, np.full(x.shape, 384 / 65535, np.float32))


def test_16_bit_png_reduced_varying_values_are_box_means_of_16_bits(tmp_path):
    from tests.test_folder_faults import png16

    pixels = RNG.integers(0, 65536, (40, 36, 3), dtype=np.uint16)
    x = load(png16(tmp_path / "v.png", pixels), decode_side=18)  # reduced by 2
    want = pixels.astype(np.float64).reshape(20, 2, 18, 2, 3).mean((1, 3)).transpose(2, 0, 1) / 65535.0
    np.testing.assert_allclose(x, want, atol=1e-6)


# --- 3. compressed TIFFs without imagecodecs ------------------------------------------------------------------------


def test_lzw_tiffs_decode_equal_to_the_uncompressed_ones(tmp_path):
    images = {"grey8": Image.fromarray(RNG.integers(0, 256, (21, 30), dtype=np.uint8)),
              "rgb8": Image.fromarray(RNG.integers(0, 256, (21, 30, 3), dtype=np.uint8)),
              "grey16": Image.fromarray(RNG.integers(0, 65536, (21, 30), dtype=np.uint16))}
    for name, im in images.items():
        im.save(tmp_path / f"{name}_lzw.tif", compression="tiff_lzw")
        im.save(tmp_path / f"{name}_raw.tif")
        with tifffile.TiffFile(tmp_path / f"{name}_lzw.tif") as tif:
            assert tif.pages[0].compression == 5  # LZW
        lzw, raw = load(tmp_path / f"{name}_lzw.tif"), load(tmp_path / f"{name}_raw.tif")
        assert lzw.shape == raw.shape and lzw.dtype == np.float32, name
        np.testing.assert_array_equal(lzw, raw, err_msg=name)
        assert channels(tmp_path / f"{name}_lzw.tif") == lzw.shape[0], name
    np.testing.assert_array_equal(load(tmp_path / "grey16_lzw.tif"),
                                  np.asarray(images["grey16"], np.float32)[None] / 65535.0)  # 16 bits kept


def test_a_ccitt_group4_tiff_decodes_equal_to_the_uncompressed_one(tmp_path):
    bits = Image.fromarray(RNG.random((25, 40)) > 0.5)
    bits.save(tmp_path / "g4.tif", compression="group4")
    bits.save(tmp_path / "raw.tif")
    x = load(tmp_path / "g4.tif")
    np.testing.assert_array_equal(x, load(tmp_path / "raw.tif"))
    np.testing.assert_array_equal(x, pillow(tmp_path / "g4.tif", "L"))


@pytest.mark.skipif(has_imagecodecs(), reason="tifffile decodes it itself where imagecodecs is installed")
def test_a_compressed_tiff_pillow_cannot_read_names_the_missing_package(tmp_path):
    """16-bit RGB is a page Pillow would cut to 8 bits: no fallback; the reason names the package
    (tifffile's own message quotes it, and quoted values are dropped from skip reasons)."""
    rgb16 = RNG.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "zlib16.tif", rgb16, photometric="rgb", compression="zlib")
    np.testing.assert_array_equal(load(tmp_path / "zlib16.tif"), rgb16.transpose(2, 0, 1) / np.float32(65535.0))
    path = tmp_path / "lzw16.tif"
    tifffile.imwrite(path, rgb16, photometric="rgb")
    data = bytearray(path.read_bytes())  # its Compression tag set to LZW: tifffile needs imagecodecs for it
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    data[offset:offset + 2] = struct.pack("<H", 5)
    path.write_bytes(bytes(data))
    with pytest.raises(Undecodable, match=r"LZW needs the imagecodecs package \(pip install imagecodecs\)"):
        load(path)


# --- 4. tifffile's log, a TIFF with no pages ------------------------------------------------------------------------


def test_a_tiff_with_no_pages_is_skipped_with_its_reason_and_no_name_in_the_log(tmp_path, capfd, caplog):
    path = tmp_path / f"{PRIVATE}.tif"
    path.write_bytes(b"II*\x00\x00\x00\x00\x00")  # a TIFF header, no page
    Image.fromarray(RNG.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "ok.png")
    logging.getLogger("tifffile").setLevel(logging.NOTSET)
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        src, ref = source_and_ref(path)
        with pytest.raises(Undecodable) as caught:
            src.load(ref)
        assert skip_reason(caught.value) == "TIFF with no pages"  # its data_report.json row (was "IndexError")
        assert src.channels_of(ref) is None
        src.properties(ref)
    out = capfd.readouterr()
    assert PRIVATE not in out.err + out.out
    assert not [r for r in caplog.records if r.name.startswith("tifffile")], caplog.text
    assert PRIVATE not in caplog.text
    assert logging.getLogger("tifffile").level == logging.NOTSET  # restored after the reads


# --- 5. grey + alpha PNGs -------------------------------------------------------------------------------------------


def test_8_and_16_bit_grey_alpha_pngs_are_one_channel_of_the_grey(tmp_path):
    from tests.test_folder_faults import png16

    la = RNG.integers(0, 256, (14, 11, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la8.png")
    la16 = RNG.integers(0, 65536, (14, 11, 2), dtype=np.uint16)
    png16(tmp_path / "la16.png", la16)
    x8, x16 = load(tmp_path / "la8.png"), load(tmp_path / "la16.png")
    np.testing.assert_array_equal(x8, pillow(tmp_path / "la8.png", "L"))
    np.testing.assert_array_equal(x16, la16[None, ..., 0].astype(np.float32) / 65535.0)
    assert channels(tmp_path / "la8.png") == x8.shape[0] == 1
    assert channels(tmp_path / "la16.png") == x16.shape[0] == 1
    small = load(tmp_path / "la8.png", decode_side=5)  # reduced by 2 in its own mode, still one channel
    assert small.shape == (1, 7, 6)
