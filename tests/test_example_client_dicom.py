"""The torch-free example client (examples/onnx_inference.py) on pydicom's own test files, against
`sslkit embed` of the same ONNX file: PALETTE COLOR read through its colour tables, colour files
given to a one-window graph, SEG and other non-image objects skipped and named, and the codec hint
only where a decoder package is missing (a corrupt stream gives the decoder's own message)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PYDICOM_FILES, REPO, make_images, tiny_run

EXAMPLE = REPO / "examples" / "onnx_inference.py"
PALETTE = "examples_palette.dcm"  # ultrasound, PALETTE COLOR: 8-bit indices into 16-bit tables
SEG = "liver_1frame.dcm"  # a DICOM SEG object: carries pixels, is not an image
CORRUPT_J2K = "JPEG2000-embedded-sequence-delimiter.dcm"  # JPEG 2000 with 4 stream bytes overwritten
CORRUPT_JPEG12 = "JPEG-lossy.dcm"  # 12-bit JPEG Extended with a bad scan header
#: decodable files of the kinds the client reads: grey with and without a VOI window; JPEG (12-bit),
#: JPEG-LS, JPEG 2000, RLE, deflated, big endian; RGB, YBR multi-frame, palette colour
DECODABLE = ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
             "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "image_dfl.dcm",
             "examples_overlay.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", PALETTE)
COLOUR = ("SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", PALETTE)
CODECS_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"


def _copy(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(PYDICOM_FILES / name, folder / name)
    return folder


def _client(model: Path, data: Path, out: Path, blocked_codecs: bool = False) -> subprocess.CompletedProcess:
    """The example as a user runs it (pydicom's warnings off); ``blocked_codecs``: as on a machine
    without pylibjpeg and its plugins."""
    block = ("class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('pylibjpeg', 'libjpeg', 'openjpeg', 'rle'):\n"
             "            raise ImportError('blocked in this test')\n"
             "sys.meta_path.insert(0, Block())\n") if blocked_codecs else ""
    code = (f"import runpy, sys\n{block}"
            f"sys.argv = {[str(EXAMPLE), str(model), str(data), '--out', str(out)]!r}\n"
            f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _cosines(client: Path, ours) -> dict[str, float]:
    got = np.load(client)
    assert list(got["ids"]) == ours.ids  # the same files and frames, in the same order
    a, b = got["embeddings"], ours.embeddings
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {Path(i.split("#")[0]).name: float(c) for i, c in zip(ours.ids, cos)}


def _export(tmp: Path, name: str, *extra: str) -> Path:
    from click.testing import CliRunner

    from sslkit.cli import main

    run = tiny_run(f"dicom:{_copy(tmp / 'train', ('CT_small.dcm', 'MR_small.dcm', PALETTE, 'SC_rgb_rle.dcm'))}",
                   tmp / "run", 32, "--max-steps", 2, *extra)
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp / name), "--with-preprocessing"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp / name


@pytest.fixture(scope="module")
def auto_onnx(tmp_path_factory) -> Path:
    """A run with the default per-file window (``auto``), exported: the graph takes [0, 1]."""
    return _export(tmp_path_factory.mktemp("auto"), "auto.onnx")


def test_client_matches_sslkit_embed_on_palette_colour_and_other_decodable_files(auto_onnx, tmp_path):
    """PALETTE COLOR was read as grey indices (cosine 0.91-0.98 to sslkit); the SEG object was
    embedded, which sslkit skips; now every file and frame is the same and the SEG is named."""
    from sslkit.embed import embed

    data = _copy(tmp_path / "d", (*DECODABLE, SEG))
    proc = _client(auto_onnx, data, tmp_path / "c.npz")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = embed(auto_onnx, f"dicom:{data}", progress=False)
    assert len(ours.ids) == len(DECODABLE) - 1 + 30  # examples_ybr_color.dcm: 30 frames
    cos = _cosines(tmp_path / "c.npz", ours)
    assert set(cos) == set(DECODABLE) and min(cos.values()) > 0.9999, cos
    assert f"skipped {data / SEG}: not an image (Modality SEG; sslkit skips these too)" in proc.stderr
    assert "1 file(s) skipped: 1 x not an image (Modality SEG" in proc.stderr
    assert f"embedded {len(ours.ids)} images" in proc.stdout and "; 1 files skipped;" in proc.stdout


def test_palette_colour_is_rgb_through_its_tables(tmp_path):
    """The client's pixels of the palette file are pydicom's apply_color_lut over 2^16 - 1 (its
    tables are 16-bit), not the stored indices, and are what sslkit's dicom source decodes."""
    import runpy

    import pydicom
    from pydicom.pixels import apply_color_lut

    from sslkit_plugins.sources.dicom_decode import decode
    from sslkit_plugins.sources.dicom_window import parse_windows

    client = runpy.run_path(str(EXAMPLE))
    ((frame, (kind, rgb, _)),) = client["dicom_frames"](PYDICOM_FILES / PALETTE)
    ds = pydicom.dcmread(PYDICOM_FILES / PALETTE)
    expected = apply_color_lut(ds.pixel_array, ds).astype(np.float32).transpose(2, 0, 1) / 65535.0
    assert frame is None and kind == "rgb" and rgb.shape == (3, 350, 800)
    np.testing.assert_array_equal(rgb, expected)
    np.testing.assert_array_equal(rgb, decode(ds, None, parse_windows("auto")))
    assert np.abs(rgb[0] - rgb[2]).max() > 0.1  # colour, not grey


def test_corrupt_compressed_files_give_the_decoders_message_not_the_codec_hint(auto_onnx, tmp_path):
    """With the codecs installed, a corrupt JPEG 2000 and a corrupt 12-bit JPEG are the decoder's one
    line each; the pip hint, which was printed for them, comes only where a decoder is missing."""
    data = _copy(tmp_path / "d", ("CT_small.dcm", CORRUPT_J2K, CORRUPT_JPEG12))
    proc = _client(auto_onnx, data, tmp_path / "c.npz")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    (j2k,) = [line for line in lines if line.startswith(f"skipped {data / CORRUPT_J2K}: ")]
    assert "RuntimeError: Unable to decode" in j2k and "Error decoding the J2K data" in j2k
    (jpeg,) = [line for line in lines if line.startswith(f"skipped {data / CORRUPT_JPEG12}: ")]
    assert "libjpeg error code" in jpeg and "A misplaced marker segment was found" in jpeg
    assert "pip install" not in proc.stderr and "no decoder installed" not in proc.stderr
    assert "embedded 1 images" in proc.stdout and "; 2 files skipped;" in proc.stdout

    # without pylibjpeg: JPEG-LS has no decoder at all, a 12-bit JPEG none that takes 12 bits; a corrupt
    # JPEG 2000 still has Pillow's, so it is not blamed on a missing package
    data2 = _copy(tmp_path / "d2", ("CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm", CORRUPT_J2K))
    proc = _client(auto_onnx, data2, tmp_path / "c2.npz", blocked_codecs=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hint = [line for line in proc.stderr.splitlines() if CODECS_HINT in line]
    assert hint == ["no decoder installed for 12-bit JPEG Extended (Process 2 and 4), JPEG-LS Lossless Image "
                    f"Compression: {CODECS_HINT}"], proc.stderr
    assert "; 3 files skipped;" in proc.stdout


@pytest.fixture(scope="module")
def lung_onnx(tmp_path_factory) -> Path:
    """A run with one fixed window (lung), exported: the graph takes HU and windows them itself."""
    return _export(tmp_path_factory.mktemp("lung"), "lung.onnx", "--window", "lung")


def test_one_window_graph_takes_colour_files_and_large_ct_as_sslkit_embed_does(lung_onnx, tmp_path):
    """Palette indices were fed as HU (cosine 0.17 to sslkit) and RGB files refused; a 512 x 512 CT
    resized in HU before the graph's window disagreed (0.986). Now a colour file is the HU value the
    window maps to its luma, and grey values are clipped to the window before resizing, as the run did."""
    from sslkit.embed import embed

    data = _copy(tmp_path / "d", ("693_J2KI.dcm", "CT_small.dcm", "MR_small.dcm", *COLOUR))
    proc = _client(lung_onnx, data, tmp_path / "c.npz")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cos = _cosines(tmp_path / "c.npz", embed(lung_onnx, f"dicom:{data}", progress=False))
    assert set(cos) == {"693_J2KI.dcm", "CT_small.dcm", "MR_small.dcm", *COLOUR}
    assert min(cos.values()) > 0.9999, cos


def test_a_window_stack_refuses_colour_files_in_one_line(tmp_path):
    """A stack of windows has no single HU value per colour pixel (the export says colour files cannot
    use it): each colour file is one skip line, the grey files are embedded."""
    stack = _export(tmp_path, "stack.onnx", "--window", "lung,mediastinum,bone")
    data = _copy(tmp_path / "d", ("CT_small.dcm", PALETTE, "SC_rgb_rle.dcm"))
    proc = _client(stack, data, tmp_path / "c.npz")
    assert proc.returncode == 0, proc.stderr[-2000:]
    why = "ValueError: colour DICOM cannot be given to a graph that stacks windows"
    refused = sorted(line.split(": ", 1)[0] for line in proc.stderr.splitlines() if why in line and "skipped " in line)
    assert refused == [f"skipped {data / 'SC_rgb_rle.dcm'}", f"skipped {data / PALETTE}"], proc.stderr
    assert list(np.load(tmp_path / "c.npz")["ids"]) == [str(data / "CT_small.dcm")]


def test_an_8bit_graph_gets_dicom_pixels_on_its_scale(tmp_path):
    """A graph that takes uint8 pixels (an image-folder run's export) given DICOM files: the client
    fed [0, 1] values, rounded to 0 or 1 (cosine 0.59-0.80 to sslkit); now x 255, as sslkit does."""
    import json

    import onnx
    from click.testing import CliRunner

    from sslkit.cli import main
    from sslkit.embed import embed

    run = tiny_run(f"folder:{make_images(tmp_path / 'png', n_per_class=4, size=32, channels=3)}", tmp_path / "run",
                   32, "--max-steps", 2)
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "rgb.onnx"), "--with-preprocessing"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    meta = json.loads({p.key: p.value for p in onnx.load(tmp_path / "rgb.onnx").metadata_props}["sslkit"])
    assert meta["input"]["raw"]["kind"] == "uint8"
    data = _copy(tmp_path / "d", ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm"))
    proc = _client(tmp_path / "rgb.onnx", data, tmp_path / "c.npz")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cos = _cosines(tmp_path / "c.npz", embed(tmp_path / "rgb.onnx", f"dicom:{data}", progress=False))
    assert len(cos) == 3 and min(cos.values()) > 0.9999, cos
