"""Faults of the ``folder`` source and the folder walk, as an audit found them.

* a float TIFF holding NaN or inf is one skipped file with that reason (it was min-max
  scaled into an all-black or NaN image and trained on), with no RuntimeWarning;
* a small file that decodes to a huge image (a 1-bit PNG bomb just under the pixel limit,
  a deflated TIFF) is reduced while it is decoded: memory stays near the final image's;
  a TIFF's samples lie as its tags say (60 samples a pixel were read as 2000 channels);
* ``ln -s .. data/up`` does not pull the root's sibling folders into the data;
* a JPEG is turned upright by its EXIF orientation; 16-bit colour PNGs keep 16 bits;
* and images of ordinary size decode exactly as before.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslkit.api import Undecodable, resize_square
from sslkit_plugins.sources.folder import FolderSource
from sslkit.data.unit_range import NON_FINITE
from sslkit_plugins.sources.folder_decode import reduce_factor
from sslkit.pseudonym import file_key

tifffile = pytest.importorskip("tifffile")


RNG = np.random.default_rng(0)
LINK_ABOVE = "symbolic link to a folder above the data root"


def good_pngs(folder: Path, n: int = 8, size: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(RNG.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"good{i}.png")
    return folder


def load(path: Path, **attrs) -> np.ndarray:
    """``folder`` source's pixels of the one file ``path`` (attributes of the source set first)."""
    src = FolderSource(str(path.parent))
    for k, v in attrs.items():
        setattr(src, k, v)
    (ref,) = [r for r in src.index() if Path(r.path).name == path.name]
    return src.load(ref)


def channels(path: Path) -> int | None:
    src = FolderSource(str(path.parent))
    (ref,) = [r for r in src.index() if Path(r.path).name == path.name]
    return src.channels_of(ref)


def float_tiffs(folder: Path) -> dict[str, Path]:
    """Float TIFFs with one NaN, one inf, one -inf, all NaN."""
    folder.mkdir(parents=True, exist_ok=True)
    base = RNG.random((20, 30)).astype(np.float32)
    out = {}
    for name, value in (("nan", np.nan), ("inf", np.inf), ("neginf", -np.inf)):
        x = base.copy()
        x[3, 4] = value
        tifffile.imwrite(folder / f"{name}.tif", x)
        out[name] = folder / f"{name}.tif"
    tifffile.imwrite(folder / "allnan.tif", np.full((20, 30), np.nan, np.float32))
    out["allnan"] = folder / "allnan.tif"
    return out


# --- 1. NaN / inf ---------------------------------------------------------------------------------------------------


def test_float_tiffs_with_nan_or_inf_are_refused_without_runtime_warnings(tmp_path):
    files = float_tiffs(tmp_path / "f")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (nanmin of all-NaN, inf - inf) fails the test
        for name, path in files.items():
            with pytest.raises(Undecodable, match=NON_FINITE):
                load(path)
        x = RNG.random((20, 30)).astype(np.float32) * 7 - 3
        tifffile.imwrite(tmp_path / "f" / "ok.tif", x)
        got = load(tmp_path / "f" / "ok.tif")
    lo, hi = float(x.min()), float(x.max())
    np.testing.assert_array_equal(got, ((x - lo) / (hi - lo))[None])  # finite floats: min-max, as before


def test_a_float64_tiff_beyond_the_float32_range_is_scaled_not_refused(tmp_path):
    """Finite float64 pixels past float32's range were refused as NaN / inf (one rule with npz now)."""
    x = np.array([[-1e300, 0.0], [1e300, 5e299]])
    tifffile.imwrite(tmp_path / "wide.tif", x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load(tmp_path / "wide.tif")
    np.testing.assert_allclose(got, [[[0, 0.5], [1, 0.75]]])


# --- 2. memory, TIFF axes -------------------------------------------------------------------------------------------


def test_tiff_samples_follow_the_tags_not_the_shape(tmp_path):
    rgb = RNG.integers(0, 65535, (3, 5, 3), dtype=np.uint16)  # 3 rows: the old shape guess took rows for channels
    tifffile.imwrite(tmp_path / "contig.tif", rgb, photometric="rgb", planarconfig="contig")
    tifffile.imwrite(tmp_path / "planar.tif", rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    want = rgb.transpose(2, 0, 1).astype(np.float32) / 65535.0
    for name in ("contig.tif", "planar.tif"):
        np.testing.assert_array_equal(load(tmp_path / name), want, err_msg=name)
        assert channels(tmp_path / name) == 3
    grey_alpha = RNG.integers(0, 255, (6, 7, 2), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "ga.tif", grey_alpha, photometric="minisblack", planarconfig="contig")
    np.testing.assert_array_equal(load(tmp_path / "ga.tif"), grey_alpha[None, ..., 0].astype(np.float32) / 255.0)
    assert channels(tmp_path / "ga.tif") == 1


def test_a_tiff_with_60_samples_or_too_many_bytes_is_refused_from_its_header(tmp_path):
    tifffile.imwrite(tmp_path / "s60.tif", np.zeros((30, 20, 60), np.uint8), photometric="minisblack",
                     planarconfig="contig", compression="zlib")
    with pytest.raises(Undecodable, match="60 samples per pixel"):
        load(tmp_path / "s60.tif")
    tifffile.imwrite(tmp_path / "f64.tif", np.zeros((100, 100, 3), np.float64), photometric="rgb")
    with pytest.raises(Undecodable, match=r"too large to decode: 100x100 pixels x 3 samples x 8 bytes"):
        load(tmp_path / "f64.tif", max_pixels=20_000)  # 10,000 pixels pass; 240,000 bytes > 4 x 20,000
    assert load(tmp_path / "f64.tif", max_pixels=60_000).shape == (3, 100, 100)


def test_reduce_factor_leaves_images_below_twice_the_decode_side_alone():
    assert reduce_factor(4095, 9000, 2048) == 1 and reduce_factor(4096, 4096, 2048) == 2
    assert reduce_factor(13000, 13000, 2048) == 6 and reduce_factor(13000, 13000, None) == 1


def smooth(h: int, w: int, c: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    return np.stack([np.sin(3 * xx + k) * np.cos(2 * yy - k) for k in range(c)], -1) * 0.5 + 0.5


def test_large_images_are_reduced_while_decoding_close_to_a_full_decode(tmp_path):
    """With the decode side set low (64), a 260 x 300 image is a large one: it comes back
    reduced by 4, and resized to 32 it is within 2 % of the full decode resized."""
    h, w = 260, 300
    g = smooth(h, w, 3)
    Image.fromarray((g[..., 0] * 255).astype(np.uint8)).save(tmp_path / "l.png")
    Image.fromarray((g * 255).astype(np.uint8)).save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray((g[..., 0] * 65535).astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray((g * 255).astype(np.uint8)).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(g[..., 0] > 0.5).save(tmp_path / "bits.png")
    tifffile.imwrite(tmp_path / "u16.tif", (g * 65535).astype(np.uint16), photometric="rgb")
    tifffile.imwrite(tmp_path / "f32.tif", (g[..., 0] * 1000 - 200).astype(np.float32))
    for name in ("l.png", "rgb.jpg", "i16.png", "pal.png", "bits.png", "u16.tif", "f32.tif"):
        full = load(tmp_path / name, decode_side=None)
        small = load(tmp_path / name, decode_side=64)
        assert full.shape[1:] == (h, w) and small.shape == (full.shape[0], 65, 75), name
        assert small.dtype == np.float32 and 0.0 <= small.min() and small.max() <= 1.0, name
        tol = 0.1 if name == "bits.png" else 0.02  # a two-level image's edges blur either way
        assert np.abs(resize_square(small, 32) - resize_square(full, 32)).max() < tol, name


@pytest.mark.timeout(300)
def test_a_small_png_bomb_and_a_deflated_tiff_decode_in_bounded_memory(tmp_path):
    """A 6000 x 6000 1-bit PNG (a few KB) took ~1.4 GB (RGB, then three float32 copies); a
    deflated 6000 x 6000 TIFF ~0.3 GB. Both are reduced while decoding now."""
    Image.new("1", (6000, 6000)).save(tmp_path / "bomb.png")
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((6000, 6000), np.uint8), compression="zlib")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    code = textwrap.dedent(f"""
        import json, resource
        from sslkit_plugins.sources.folder import FolderSource
        src = FolderSource({str(tmp_path)!r})
        refs = {{r.path.rsplit("/", 1)[-1]: r for r in src.index()}}
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        base = peak()
        tif = src.load(refs["big.tif"]).shape
        after_tif = peak() - base
        png = src.load(refs["bomb.png"]).shape
        print(json.dumps({{"tif": tif, "png": png, "tif_mb": after_tif, "png_mb": peak() - base}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Warning" not in out.stderr, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tif"] == got["png"] == [1, 3000, 3000]  # reduced by 2: 6000 >= 2 x 2048
    assert got["tif_mb"] < 150, got  # native 36 MB + reduced floats (was ~330 MB)
    assert got["png_mb"] < 300, got  # 1-bit and 8-bit planes of 36 MB + reduced floats (was ~1.4 GB)


# --- 3. links above the root ----------------------------------------------------------------------------------------


def test_a_link_above_the_root_is_reported_not_followed(tmp_path, cli):
    data = good_pngs(tmp_path / "case" / "data", 8)
    good_pngs(tmp_path / "case" / "private_other_patient", 3)
    good_pngs(tmp_path / "elsewhere", 2)
    os.symlink("..", data / "up")  # the root's parent: would add private_other_patient/
    os.symlink("/", data / "everything")
    os.symlink(".", data / "self")  # the root itself: adds nothing, silently (as before)
    os.symlink(str(tmp_path / "elsewhere"), data / "linked")  # a folder outside, neither root nor above: followed
    r = cli("data", "inspect", f"folder:{data}", "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["images"] == 10  # 8 + the 2 linked ones; nothing from private_other_patient
    unreadable = {u["path"]: u["reason"] for u in rep["unreadable"]}
    assert set(unreadable) == {"up", "everything"}
    assert all(LINK_ABOVE in reason for reason in unreadable.values())
    assert "private_other_patient" not in r.stdout + r.stderr


# --- the report of a run ------------------------------------------------------------------------------------------


def test_bad_files_are_one_report_row_each_and_not_trained_on(tmp_path, cli):
    data = good_pngs(tmp_path / "scans" / "data", 8)
    float_tiffs(data / "floats")
    tifffile.imwrite(data / "s60.tif", np.zeros((30, 20, 60), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    good_pngs(tmp_path / "scans" / "other_patient", 3)
    os.symlink("..", data / "up")
    out = tmp_path / "run"
    r = cli("pretrain", "--task", "simclr", "--data", f"folder:{data}", "--out", out, "--backbone",
            "timm:resnet10t", "--image-size", 16, "--batch-size", 8, "--max-steps", 1, "--epochs", 1, "--quiet",
            "--no-cache")
    assert r.exit_code == 0, r.stderr[-3000:]
    assert "RuntimeWarning" not in r.stderr
    report = json.loads((out / "data_report.json").read_text())
    reasons = {row["file"]: row["reason"] for row in report["skipped_files"]}
    assert report["samples"] == 8
    for name in ("nan", "inf", "neginf", "allnan"):
        assert reasons[file_key(f"floats/{name}.tif")] == NON_FINITE
    assert "60 samples per pixel" in reasons[file_key("s60.tif")]
    assert LINK_ABOVE in reasons[file_key("up")]
    assert len(reasons) == 6 == report["skipped"]


# --- 4. EXIF orientation, 16-bit colour PNG -------------------------------------------------------------------------


def test_a_jpeg_is_turned_upright_by_its_exif_orientation(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = 255  # stored 80 wide, 40 high, left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 40 wide, 80 high, top half white
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(a).save(tmp_path / "plain.jpg", quality=95)
    x = load(tmp_path / "rot.jpg")
    assert x.shape == (3, 80, 40)
    assert x[:, :35].mean() > 0.95 and x[:, 45:].mean() < 0.05
    plain = load(tmp_path / "plain.jpg")
    assert plain.shape == (3, 40, 80)  # no orientation: as stored
    np.testing.assert_array_equal(plain, np.asarray(Image.open(tmp_path / "plain.jpg"), np.float32).transpose(2, 0, 1)
                                  / 255.0)


def png16(path: Path, pixels: np.ndarray, interlace: bool = False) -> Path:
    """A 16-bit PNG of ``pixels`` (H, W, C), rows Sub-filtered (the filter's pixel stride is 2 C bytes)."""
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    h, w, c = pixels.shape
    bpp = 2 * c

    def rows(img):
        out = b""
        for row in img:
            raw = np.frombuffer(row.astype(">u2").tobytes(), np.uint8).astype(np.int16)
            raw[bpp:] = raw[bpp:] - np.frombuffer(row.astype(">u2").tobytes(), np.uint8)[:-bpp]
            out += b"\x01" + (raw % 256).astype(np.uint8).tobytes()
        return out

    parts = [pixels[y::dy, x::dx] for x, y, dx, dy in passes] if interlace else [pixels]
    data = b"".join(rows(p) for p in parts if p.size)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, int(interlace))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("c,interlace", [(3, False), (3, True), (4, False), (2, True)])
def test_16_bit_colour_and_grey_alpha_pngs_keep_16_bits(tmp_path, c, interlace):
    pixels = RNG.integers(0, 65536, (21, 17, c), dtype=np.uint16)
    path = png16(tmp_path / "x.png", pixels, interlace)
    x = load(path)
    kept = pixels[..., :3] if c == 4 else (pixels[..., :1] if c == 2 else pixels)  # alpha dropped
    np.testing.assert_array_equal(x, kept.transpose(2, 0, 1).astype(np.float32) / 65535.0)
    assert channels(path) == x.shape[0]


def test_a_1_bit_png_is_one_channel_of_0_and_1(tmp_path):
    """It was converted to RGB (3 channels, 12 bytes a pixel as floats) while its header said 1 channel."""
    bits = RNG.random((30, 50)) > 0.5
    Image.fromarray(bits).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(load(tmp_path / "bits.png"), bits[None].astype(np.float32))
    assert channels(tmp_path / "bits.png") == 1


# --- images of ordinary size: exactly as before ----------------------------------------------------------------------


def test_ordinary_images_decode_exactly_as_before(tmp_path):
    """Every layout below the reduction size gives the values the source gave before (its
    formulas spelled out), so runs, caches and exported models on ordinary data do not move."""
    h, w = 70, 90
    u8 = RNG.integers(0, 256, (h, w, 4), dtype=np.uint8)
    u16 = RNG.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray(u8[..., 0]).save(d / "l.png")
    Image.fromarray(u8[..., :3]).save(d / "rgb.png")
    Image.fromarray(u8, "RGBA").save(d / "rgba.png")
    Image.fromarray(u8[..., :3]).save(d / "rgb.bmp")
    Image.fromarray(u8[..., :3]).save(d / "rgb.jpg", quality=90)
    Image.fromarray(u16[..., 0]).save(d / "i16.png")
    tifffile.imwrite(d / "u8.tif", u8[..., 0])
    tifffile.imwrite(d / "u16.tif", u16[..., 0])
    tifffile.imwrite(d / "rgb16.tif", u16, photometric="rgb")
    i16 = (u16[..., 0].astype(np.int32) - 30000).astype(np.int16)
    tifffile.imwrite(d / "i16.tif", i16)
    f = u16[..., 1].astype(np.float32) / 7 - 100
    tifffile.imwrite(d / "f32.tif", f)
    by255 = lambda a: (np.asarray(a, np.float32) / 255.0)  # noqa: E731
    chw = lambda a: a.transpose(2, 0, 1) if a.ndim == 3 else a[None]  # noqa: E731
    minmax = lambda a: (lambda x: (x - float(x.min())) / (float(x.max()) - float(x.min())))(a.astype(np.float32))  # noqa: E731
    want = {
        "l.png": chw(by255(u8[..., 0])), "rgb.png": chw(by255(u8[..., :3])), "rgba.png": chw(by255(u8[..., :3])),
        "rgb.bmp": chw(by255(u8[..., :3])), "rgb.jpg": chw(by255(Image.open(d / "rgb.jpg"))),
        "i16.png": chw(u16[..., 0].astype(np.float32) / 65535.0), "u8.tif": chw(by255(u8[..., 0])),
        "u16.tif": chw(u16[..., 0].astype(np.float32) / 65535.0), "rgb16.tif": chw(u16.astype(np.float32) / 65535.0),
        "i16.tif": chw(minmax(i16)), "f32.tif": chw(minmax(f)),
    }
    src = FolderSource(str(d))
    refs = {Path(r.path).name: r for r in src.index()}
    assert sorted(refs) == sorted(want)
    for name, expected in want.items():
        got = src.load(refs[name])
        assert got.dtype == np.float32 and got.flags.c_contiguous, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
        assert src.channels_of(refs[name]) == (3 if got.shape[0] == 3 else 1), name


def test_huge_images_are_reduced_no_further_than_twice_the_runs_sample_side(tmp_path):
    """The reduction side followed no run: a 4096 px image was cut to 2048 px even for a run at
    3072 px (then upsampled). It is now DECODE_SIDE or twice the sample side, whichever is larger."""
    from sslkit_plugins.sources.folder_decode import DECODE_SIDE

    src = FolderSource(str(tmp_path))
    assert src.decode_side == DECODE_SIDE
    src.sample_side = 3072
    assert src.decode_side == 6144 and "6144" in src.describe()["reduce"]  # in the cache key
    src.sample_side = 224
    assert src.decode_side == DECODE_SIDE


def test_a_dump_with_nothing_decodable_says_why(tmp_path, cli):
    """``data dump --limit 3`` over three damaged files said only "no decodable sample (3 failed)"."""
    for i in range(3):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    r = cli("data", "dump", f"folder:{tmp_path / 'd'}", "--out", tmp_path / "d.npz", "--limit", "3")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert r.stderr.startswith(f"error: no decodable sample in 'folder:{tmp_path / 'd'}': 3 files skipped: 3 x ")
    assert not (tmp_path / "d.npz").exists()
