"""``sslkit data inspect``: counts by header facts, unusable files with reasons, sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests.dicom_factory import write_dicom


def test_inspect_dicom_folder(tmp_path, cli, pydicom_dir):
    rng = np.random.default_rng(0)
    write_dicom(tmp_path / "a.dcm", (rng.random((3, 20, 30)) * 4000).astype(np.uint16), patient_id="A",
                syntax="rle", bits_stored=12, photometric="MONOCHROME1")
    write_dicom(tmp_path / "b.dcm", (rng.random((64, 96)) * 4000).astype(np.uint16), patient_id="B", syntax="j2k")
    shutil.copy(Path(pydicom_dir) / "test-SR.dcm", tmp_path / "report.dcm")  # not an image: not counted
    raw = (tmp_path / "b.dcm").read_bytes()
    (tmp_path / "c.dcm").write_bytes(raw[: len(raw) - 300])  # truncated
    (tmp_path / "notes.txt").write_text("not dicom")
    r = cli("data", "inspect", f"dicom:{tmp_path}", "--json", "--image-size", "64")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["files"] == 3 and rep["images"] == 5 and rep["groups"] == 2
    c = rep["counts"]
    assert c["modality"] == {"CR": 3}
    assert c["transfer_syntax"] == {"JPEG 2000 Image Compression (Lossless Only)": 2, "RLE Lossless": 1}
    assert c["photometric"] == {"MONOCHROME2": 2, "MONOCHROME1": 1}
    assert c["bits_stored"] == {"16": 2, "12": 1} and c["frames"] == {"1": 2, "3": 1} and c["size"] == {"96x64": 2, "30x20": 1}
    assert rep["estimated_bytes"]["cache_at_image_size"] == 5 * 64 * 64 * 2
    assert rep["estimated_bytes"]["decoded_full_resolution_float32"] == 3 * 20 * 30 * 4 + 2 * 64 * 96 * 4
    assert [u["path"] for u in rep["undecodable"]] == ["c.dcm"] and rep["decoded_ok"] == 2  # relative to the root
    text = cli("data", "inspect", f"dicom:{tmp_path}", "--modality", "CT")
    assert text.exit_code == 0 and "0 images" in text.output and "filtered out" in text.output


def test_inspect_user_errors(tmp_path, cli):
    for args in (["dicom:" + str(tmp_path / "nope")], [f"dicom:{tmp_path}", "--window", "lungs"],
                 [f"dicom:{tmp_path}", "--data-opt", "bogus=1"]):
        r = cli("data", "inspect", *args)
        assert r.exit_code == 2 and r.output.startswith("error:") and r.output.count("\n") == 1, r.output


def test_inspect_folder_and_npz(tmp_path, cli, gray_folder):
    r = cli("data", "inspect", f"folder:{gray_folder}", "--json", "--no-decode")
    rep = json.loads(r.output)
    assert rep["images"] == 16 and rep["counts"]["mode"] == {"L": 16} and "undecodable" not in rep


def test_inspect_every_sample_finds_a_bad_frame_the_default_check_passes(tmp_path, cli):
    imgs = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32)
    imgs[4, 2, 3] = np.nan  # one image of six: the first decodes
    np.save(tmp_path / "a.npy", imgs)
    rep = json.loads(cli("data", "inspect", f"npz:{tmp_path / 'a.npy'}", "--json").output)
    assert rep["undecodable"] == [] and rep["decoded_ok"] == 1 and rep["decode_checked"] == {"of": 1, "what": "files"}
    r = cli("data", "inspect", f"npz:{tmp_path / 'a.npy'}", "--json", "--every-sample")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["decoded_ok"] == 5 and rep["decode_checked"] == {"of": 6, "what": "samples"}
    assert [u["path"] for u in rep["undecodable"]] == ["a.npy"] and "NaN" in rep["undecodable"][0]["reason"]
    text = cli("data", "inspect", f"npz:{tmp_path / 'a.npy'}", "--every-sample").output
    assert "decode check: 5 of 6 samples decode" in text
    r = cli("data", "inspect", f"npz:{tmp_path / 'a.npy'}", "--every-sample", "--no-decode")
    assert r.exit_code == 2 and r.output == "error: --every-sample decodes samples and --no-decode reads headers only: give one\n"
