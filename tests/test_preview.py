"""``sslkit data dump`` (decoded / raw arrays keyed by id) and ``sslkit data preview`` (a sheet)."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from sslkit.cli import main
from sslkit.pseudonym import file_key
from tests.conftest import make_images
from tests.test_nifti import displayed, grid, write
from tests.test_series import expected_volume, slice_pixels, write_series


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_dump_raw_slices_are_the_stored_values(tmp_path):
    paths = write_series(tmp_path / "ct", n=3)
    invoke("data", "dump", f"dicom:{tmp_path / 'ct'}", "--out", tmp_path / "raw.npz", "--raw")
    z = np.load(tmp_path / "raw.npz")
    meta = json.loads(str(z["__meta__"]))
    assert meta["axes"] == "C,H,W" and "before windowing" in meta["values"]
    import pydicom

    for p in paths:
        key = file_key(p.name)  # its path relative to the data root, keyed
        np.testing.assert_array_equal(z[key][0], pydicom.dcmread(p).pixel_array.astype(np.float32))
        assert meta["spacing_mm"][key] == [0.5, 0.5]


def test_dump_volumes_keyed_by_series_with_spacing(tmp_path):
    write_series(tmp_path / "ct", n=4, seed=2)
    invoke("data", "dump", f"dicom:{tmp_path / 'ct'}", "--out", tmp_path / "v.npz", "--sample", "volume",
           "--volume-size", "4,6,5", "--window", "1000,500")
    z = np.load(tmp_path / "v.npz")
    meta = json.loads(str(z["__meta__"]))
    (key,) = [k for k in z.files if k != "__meta__"]
    assert key.startswith("series:") and meta["axes"] == "C,D,H,W" and meta["spacing_mm"][key] == [2.5, 0.5, 0.5]
    np.testing.assert_allclose(z[key], expected_volume(range(4)), atol=1e-6)
    invoke("data", "dump", f"dicom:{tmp_path / 'ct'}", "--out", tmp_path / "r.npz", "--sample", "volume",
           "--volume-size", "4,6,5", "--raw")
    raw = np.load(tmp_path / "r.npz")[key]
    np.testing.assert_array_equal(raw[0], np.stack([slice_pixels(k) for k in range(4)]).astype(np.float32))


def test_dump_nifti_raw(tmp_path):
    write(tmp_path / "a.nii.gz", grid())
    invoke("data", "dump", f"nifti:{tmp_path / 'a.nii.gz'}", "--out", tmp_path / "n.npz", "--raw",
           "--sample", "volume", "--volume-size", "3,4,5")
    z = np.load(tmp_path / "n.npz")
    key = file_key("a.nii.gz")  # a file source: its name, keyed
    np.testing.assert_array_equal(z[key][0], displayed(grid()))
    assert json.loads(str(z["__meta__"]))["spacing_mm"][key] == [4.0, 3.0, 2.0]


def test_dump_raw_of_a_source_without_raw_values_is_one_line(tmp_path, cli):
    make_images(tmp_path / "imgs", n_per_class=1)
    (tmp_path / "keep.npz").write_bytes(b"mine")
    proc = cli("data", "dump", f"folder:{tmp_path / 'imgs'}", "--out", tmp_path / "keep.npz", "--raw", "--overwrite")
    assert proc.exit_code == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--raw" in proc.stderr
    assert (tmp_path / "keep.npz").read_bytes() == b"mine"


def test_preview_draws_slabs_and_volumes(tmp_path):
    write_series(tmp_path / "ct", n=4)
    invoke("data", "preview", f"dicom:{tmp_path / 'ct'}", "--out", tmp_path / "slab.png", "--sample", "slab:3",
           "--samples", 2, "--image-size", 16, "--window", "1000,500")
    invoke("data", "preview", f"dicom:{tmp_path / 'ct'}", "--out", tmp_path / "vol.png", "--sample", "volume",
           "--volume-size", "4,6,5", "--samples", 1)
    slab, vol = Image.open(tmp_path / "slab.png"), Image.open(tmp_path / "vol.png")
    assert slab.size[1] > 0 and vol.size[0] > 2 * slab.size[0]  # volumes: 3 planes x 3 images per row


def test_preview_of_12_bit_pngs_shows_them_as_training_views_them(tmp_path):
    """A sheet of 12-bit content in 16-bit PNGs was black (values up to 0.0625 shown on 0-1) and its views
    took a gamma many times stronger than training's, which rescales such data (InputSpec.value_range)."""
    from PIL import Image

    from sslkit.data.preview import preview

    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    for i in range(4):
        Image.fromarray((rng.random((20, 20)) * 4095).astype(np.uint16)).save(tmp_path / "d" / f"{i}.png")
    result = preview(f"folder:{tmp_path / 'd'}", tmp_path / "sheet.png", samples=4, image_size=16)
    low, high = result["value_range"]
    assert 0 <= low < 0.01 and 0.05 < high <= 4095 / 65535 + 1e-6 and (tmp_path / "sheet.png").stat().st_size > 0
    (tmp_path / "e").mkdir()
    for i in range(4):  # full-range 8-bit images are shown and viewed as they are
        Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(tmp_path / "e" / f"{i}.png")
    assert preview(f"folder:{tmp_path / 'e'}", tmp_path / "sheet2.png", samples=4, image_size=16)["value_range"] == [0, 1]
