"""What a hospital export holds beside clean series: file names that are not UTF-8, headers cut
before Rows, grey and colour images in one folder; and `data inspect` on volumes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PYDICOM_FILES, make_images
from tests.test_series import write_series

LATIN1 = b"M\xfcller_scan.dcm"  # "Müller_scan.dcm" as a Windows share stores it: not UTF-8


def _non_utf8(folder: Path, source: Path, name: bytes = LATIN1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    shutil.copy(source, path)
    return path


def test_a_file_name_that_is_not_utf8_is_read_trained_on_and_drawn(tmp_path, cli):
    ct = PYDICOM_FILES / "CT_small.dcm"
    data = tmp_path / "dicom"
    _non_utf8(data, ct)
    shutil.copy(ct, data / "plain.dcm")
    r = cli("data", "inspect", f"dicom:{data}", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["images"] == 2, r.output
    r = cli("pretrain", "--task", "simclr", "--data", f"dicom:{data}", "--out", tmp_path / "run", "--backbone",
            "timm:resnet10t", "--image-size", 32, "--batch-size", 2, "--max-steps", 1, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["samples"] == 2
    # an image folder too, through the pictures (whose fonts cannot draw the undecodable bytes)
    folder = make_images(tmp_path / "imgs", n_per_class=3, size=32, channels=1)
    _non_utf8(folder / "a", next((folder / "a").iterdir()), b"p\xe9rson1.png")
    r = cli("data", "preview", f"folder:{folder}", "--out", tmp_path / "sheet.png", "--image-size", 32)
    assert r.exit_code == 0 and (tmp_path / "sheet.png").stat().st_size > 0, r.output
    r = cli("eval", "tsne", tmp_path / "run", "--data", f"folder:{folder}", "--color-by", "folder", "--quiet")
    assert r.exit_code == 0, r.output


def test_an_image_header_cut_before_rows_is_reported_not_taken_for_a_non_image(tmp_path, cli):
    """A file cut short inside its header used to look like a non-image object (no Rows): silently
    left out. An image SOP class, or pixel data, without Rows/Columns is an unreadable file now;
    a structured report (no Rows either) stays a non-image object, as before."""
    import pydicom

    whole = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    data = tmp_path / "dicom"
    data.mkdir()
    (data / "cut.dcm").write_bytes(whole[:3000])
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    del ds.Rows
    ds.save_as(data / "norows.dcm")
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", data / "whole.dcm")
    shutil.copy(PYDICOM_FILES / "reportsi.dcm", data / "report.dcm")  # an SR: not an image, not an error
    r = cli("data", "inspect", f"dicom:{data}", "--json")
    report = json.loads(r.output)
    assert report["images"] == 1
    assert {u["path"]: u["reason"] for u in report["unreadable"]} == {
        "cut.dcm": "unreadable header: a CT Image Storage object that ends without Rows and Columns (truncated?)",
        "norows.dcm": "unreadable header: pixel data without Rows"}


def test_inspect_checks_volumes_at_their_own_size(tmp_path, cli):
    """`data inspect --sample volume` decoded each volume as a 2D image at 8 px and called every one
    undecodable; it now decodes them as the run would (`--volume-size`)."""
    write_series(tmp_path / "ct" / "a", n=4, seed=1)
    write_series(tmp_path / "ct" / "b", n=5, seed=2)
    r = cli("data", "inspect", f"dicom:{tmp_path / 'ct'}", "--sample", "volume", "--volume-size", "4,6,5", "--json")
    report = json.loads(r.output)
    assert r.exit_code == 0 and report["undecodable"] == [] and report["decoded_ok"] == 2, r.output
    assert report["files"] == 9 and report["images"] == 2  # the 9 slice files of 2 volumes (it said 2 files)
    assert report["decode_checked"] == {"of": 2, "what": "volumes"}
    text = cli("data", "inspect", f"dicom:{tmp_path / 'ct'}", "--sample", "volume", "--volume-size", "4,6,5").output
    assert "dicom: 2 volumes in 9 files" in text and "decode check: 2 of 2 volumes decode" in text, text


@pytest.mark.parametrize("mixed", ["dicom", "folder"])
def test_preview_of_grey_and_colour_images_together(tmp_path, cli, mixed):
    """A CT beside an RGB secondary capture (common in hospital exports) is one sheet, in the channels
    the run would train on (the majority: grey), as `pretrain` converts them."""
    data = tmp_path / "data"
    if mixed == "dicom":
        data.mkdir()
        for name in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm"):
            shutil.copy(PYDICOM_FILES / name, data / name)
    else:
        make_images(data / "grey", n_per_class=2, size=32, channels=1)
        make_images(data / "rgb", n_per_class=1, size=32, channels=3)
    r = cli("data", "preview", f"{mixed}:{data}", "--out", tmp_path / "sheet.png", "--samples", 3,
            "--image-size", 32)
    assert r.exit_code == 0 and "drew 3 samples" in r.output, r.output
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "sheet.png")).std() > 0


def test_preview_planes_show_superior_at_the_top_at_true_proportions():
    """D runs inferior to superior: the coronal and sagittal mid-planes put its last slice on the top
    row (they showed the feet up), and anisotropic voxels keep their proportions."""
    from sslkit.data.preview import plane_aspects, planes

    x = np.zeros((1, 4, 6, 8), np.float32)
    x[0] = np.arange(4)[:, None, None]  # each slice holds its D index
    axial, coronal, sagittal = planes(x)
    assert axial.shape == (6, 8) and coronal.shape == (4, 8) and sagittal.shape == (4, 6)
    assert (coronal[0] == 3).all() and (coronal[-1] == 0).all() and (sagittal[0] == 3).all()
    assert plane_aspects([2.5, 1.0, 0.5]) == [2.0, 5.0, 2.5] and plane_aspects(None) == [1.0, 1.0, 1.0]
