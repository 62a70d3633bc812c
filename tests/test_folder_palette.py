"""The ``folder`` source gives a palette image's colours, never its indices (PNG and TIFF alike);
``data dump --raw`` stays refused for it (raw means values before windowing: ``dicom``, ``nifti``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sslkit.pseudonym import file_key
from sslkit.registry import create_source

INDICES = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
COLOUR = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200], [250, 250, 250]], np.uint8)
GREY = np.array([[40] * 3, [90] * 3, [160] * 3, [250] * 3], np.uint8)


def palette_image(path: Path, palette: np.ndarray) -> Path:
    img = Image.fromarray(INDICES, mode="P")
    img.putpalette(palette.ravel().tolist() + [0] * (3 * (256 - len(palette))))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    assert Image.open(path).mode == "P"
    return path


def expected(palette: np.ndarray, top: float = 255.0) -> np.ndarray:
    """``(C, H, W)`` of the palette's colours at INDICES: RGB, or one channel for a grey palette."""
    colours = palette[INDICES].transpose(2, 0, 1).astype(np.float32) / top
    return colours[:1] if (palette == palette[:, :1]).all() else colours


def test_palette_png_and_tiff_give_their_colours_rgb_or_grey(tmp_path):
    for name, palette in (("colour.png", COLOUR), ("grey.png", GREY), ("colour.tif", COLOUR), ("grey.tif", GREY)):
        palette_image(tmp_path / "d" / name, palette)
    src = create_source(f"folder:{tmp_path / 'd'}")
    got = {Path(r.path).name: (src.channels_of(r), src.load(r)) for r in src.index()}
    assert sorted(got) == ["colour.png", "colour.tif", "grey.png", "grey.tif"]
    for name, (channels, x) in got.items():
        palette = COLOUR if name.startswith("colour") else GREY
        # Pillow writes a TIFF colormap as value * 256 of 65535 (TIFF's 16-bit scale)
        want = expected(palette) if name.endswith(".png") else expected(palette.astype(np.float32) * 256, 65535.0)
        assert channels == x.shape[0] == want.shape[0], name  # the header's count agrees with the decoded one
        np.testing.assert_allclose(x, want, atol=1e-6, err_msg=name)
        assert not np.allclose(x[0] * 255, INDICES), name  # not the indices


def test_dump_of_palette_images_is_their_colours_and_raw_is_refused(tmp_path, cli):
    palette_image(tmp_path / "d" / "colour.png", COLOUR)
    palette_image(tmp_path / "d" / "grey.png", GREY)
    r = cli("data", "dump", f"folder:{tmp_path / 'd'}", "--out", tmp_path / "d.npz")
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "d.npz")
    np.testing.assert_allclose(z[file_key("colour.png")], expected(COLOUR), atol=1e-6)
    np.testing.assert_allclose(z[file_key("grey.png")], expected(GREY), atol=1e-6)
    assert json.loads(str(z["__meta__"]))["orientation"] == ("as stored (rows, columns); a JPEG turned upright by "
                                                                  "its EXIF orientation")
    r = cli("data", "dump", f"folder:{tmp_path / 'd'}", "--out", tmp_path / "raw.npz", "--raw")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "leave --raw out" in r.stderr
    assert not (tmp_path / "raw.npz").exists()
