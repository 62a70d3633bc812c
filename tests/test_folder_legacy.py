"""Runs on image folders recorded before 2026-12-05 (no EXIF turn, no reduction while decoding; describe() held
only ``scale``) resume as they started: the folder source's ``exif_orientation`` / ``reduce_large`` options take
their legacy values (``FolderSource.legacy_option_values``), so describe() matches the run's record again. Before,
such a resume was refused ("this sslkit decodes them differently"), and --allow-data-change, which the refusal
advised, would have continued on EXIF-turned pixels. A new run still turns a JPEG upright."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from sslkit.data.digest import fingerprint
from sslkit_plugins.sources.folder import FolderOptions, FolderSource
from tests.conftest import make_images


#: the folder source's whole describe() before 2026-12-05 (git show a1aa4de^:plugins/sources/folder.py)
OLD_DESCRIBE = {"scale": "8-bit / 255, 16-bit / 65535, float min-max"}
ARGS = ["--task", "simclr", "--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8",
        "--checkpoint-every", "2", "--seed", "1", "--quiet"]


def turned_jpeg(path: Path) -> Path:
    """A JPEG stored 80 wide and 40 high, left half white, whose EXIF says: shown turned 90 degrees clockwise."""
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
    return path


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0


def recording(monkeypatch) -> dict[str, np.ndarray]:
    """What ``FolderSource.load`` returns for each file, by name, as the run decodes it."""
    seen: dict[str, np.ndarray] = {}
    load = FolderSource.load

    def recorded(self, ref):
        seen[Path(ref.path).name] = x = load(self, ref)
        return x

    monkeypatch.setattr(FolderSource, "load", recorded)
    return seen


@pytest.mark.parametrize("era", ["before-2026-12-05", "before-the-options"])
def test_a_folder_run_recorded_before_the_options_resumes_on_its_own_decoding(tmp_path, monkeypatch, cli, era):
    """A run recorded before 2026-12-05 resumes unturned; one recorded since, before the options existed (its
    describe() holds "orientation" and "reduce"), resumes turned, as it started (not refused either way)."""
    images = make_images(tmp_path / "img", n_per_class=8, size=32)
    rot = turned_jpeg(images / "a" / "rot.jpg")
    run = tmp_path / "run"
    seen = recording(monkeypatch)
    assert cli("pretrain", "--data", f"folder:{images}", "--out", run, "--max-steps", "2", *ARGS).exit_code == 0
    with Image.open(rot) as img:
        upright, raw = pixels(ImageOps.exif_transpose(img)), pixels(img)
    np.testing.assert_array_equal(seen.pop("rot.jpg"), upright)  # a new run: turned upright, (3, 80, 40)
    # as such a run left it: no such options; before 2026-12-05 also describe() and fingerprint as then
    info = json.loads((run / "run.json").read_text())
    recorded = info["input_spec"]["preprocessing"]
    info["source_options_resolved"] = {"group": ""}
    if era == "before-2026-12-05":
        info["input_spec"]["preprocessing"] = recorded = OLD_DESCRIBE
        refs = FolderSource(str(images)).index()
        info["dataset"]["fingerprint"] = fingerprint(refs, OLD_DESCRIBE, info["dataset"]["fingerprint_scheme"])
    (run / "run.json").write_text(json.dumps(info))

    resumed = cli("pretrain", "--resume", run, "--max-steps", "4", "--quiet")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stderr.strip() == ""
    old = era == "before-2026-12-05"
    if old:  # the run's own decoding, as stored
        np.testing.assert_array_equal(seen["rot.jpg"], raw)
    else:  # the first session's decoded-pixel entry is reused: the same options, so the same (upright) pixels
        assert "rot.jpg" not in seen
    after = json.loads((run / "run.json").read_text())
    assert after["status"] == "finished" and after["summary"]["steps"] == 4
    assert after["source_options_resolved"] == {"group": "", "exif_orientation": not old, "reduce_large": not old}
    assert after["input_spec"]["preprocessing"] == recorded


def test_the_legacy_options_give_the_old_describe_and_never_reduce(tmp_path):
    legacy = {k: v(OLD_DESCRIBE) for k, v in FolderSource.legacy_option_values.items()}
    old = FolderSource(str(tmp_path), FolderOptions(**legacy))
    assert old.describe() == OLD_DESCRIBE
    old.sample_side = 3072
    assert old.decode_side is None and old.orientation() == "as stored (rows, columns)"
    new = FolderSource(str(tmp_path))
    assert set(new.describe()) == {"scale", "orientation", "reduce"}  # today's defaults: turned, reduced
    assert FolderSource(str(tmp_path), FolderOptions(reduce_large=False)).describe() == {
        **OLD_DESCRIBE, "orientation": "JPEG: upright by EXIF"}


def test_a_large_png_is_decoded_whole_with_reduce_large_off(tmp_path, monkeypatch):
    a = np.random.default_rng(0).integers(0, 255, (128, 160), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "big.png")
    monkeypatch.setattr("sslkit_plugins.sources.folder.DECODE_SIDE", 32)  # 128 px counts as huge
    for reduce_large, shape in ((True, (1, 32, 40)), (False, (1, 128, 160))):
        src = FolderSource(str(tmp_path), FolderOptions(reduce_large=reduce_large))
        (ref,) = src.index()
        got = src.load(ref)
        assert got.shape == shape
    np.testing.assert_array_equal(got[0], a / np.float32(255.0))  # off: every pixel as stored
