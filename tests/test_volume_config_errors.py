"""Settings that do not apply to a ``--sample volume`` run, and resuming a run whose ``--data`` was
relative: each a one-line error (exit 2) before anything is decoded, never a traceback or a setting
silently ignored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sslkit import config
from sslkit.errors import UsageError

VOLUME = ("--task", "simclr", "--backbone", "monai:resnet10", "--sample", "volume", "--volume-size", "8,8,8",
          "--max-steps", 1, "--batch-size", 2, "--device", "cpu", "--quiet", "--no-cache",
          "--task-opt", "proj_hidden_dim=64", "--task-opt", "proj_dim=32")
SIZES = ("the side of 2D samples; a --sample volume run's samples are --volume-size D,H,W voxels")


@pytest.fixture(scope="module")
def nii(tmp_path_factory) -> Path:
    """Three small NIfTI volumes (20 x 18 x 12 voxels) in a folder ``nii``."""
    import nibabel as nib
    import numpy as np

    root = tmp_path_factory.mktemp("volumes") / "nii"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        nib.save(nib.Nifti1Image(rng.normal(0, 100, (20, 18, 12)).astype(np.int16), np.diag([1.0, 1.2, 2.5, 1.0])),
                 root / f"vol{i}.nii.gz")
    return root


def _one_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_channels_last_with_a_3d_backbone_is_refused_before_decoding(cli, nii, tmp_path, monkeypatch):
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    args = [a for a in VOLUME if a != "--no-cache"]
    result = cli("pretrain", "--data", f"nifti:{nii}", "--out", tmp_path / "r", *args, "--channels-last")
    assert _one_line(result) == ("error: --channels-last is a layout of 2D images and monai:resnet10 is a 3D "
                                 "backbone (--sample volume); drop --channels-last")
    assert not (tmp_path / "r").exists() and not list((tmp_path / "cache").glob("*/pixels.npy"))


@pytest.mark.parametrize("given,flags,verb", [
    (("--image-size", 32), "--image-size", "sets"),
    (("--cache-size", 64), "--cache-size", "sets"),  # was refused as "below --image-size 224"
    (("--image-size", 32, "--cache-size", 64), "--image-size and --cache-size", "set"),
])
def test_a_2d_side_given_to_a_volume_run_is_refused(cli, nii, tmp_path, given, flags, verb):
    result = cli("pretrain", "--data", f"nifti:{nii}", "--out", tmp_path / "r", *VOLUME, *given)
    assert _one_line(result) == f"error: {flags} {verb} {SIZES}: drop {flags}"
    assert not (tmp_path / "r").exists()
    result = cli("pretrain", "--print-config", "--data", f"nifti:{nii}", *VOLUME, *given)
    assert _one_line(result) == f"error: {flags} {verb} {SIZES}: drop {flags}"


def test_a_2d_side_is_kept_for_slabs_and_a_config_file_is_not_refused(nii, tmp_path):
    """``--image-size`` still sets a slab run's side; a config file's ``image_size`` (what ``--print-config``
    and a run's ``config.toml`` write for every run) is not the command line's and loads for volumes."""
    common = {"task": "simclr", "data": f"nifti:{nii}", "out": str(tmp_path / "r"), "max_steps": 1}
    cfg = config.resolve({**common, "image_size": 32, "cache_size": 64, "source_options": {"sample": "slab:3"}})
    assert (cfg.image_size, cfg.cache_size) == (32, 64)
    file = tmp_path / "c.toml"
    file.write_text("image_size = 224\n")
    cfg = config.resolve({**common, "source_options": {"sample": "volume", "volume_size": "8,8,8"}}, str(file))
    assert cfg.image_size == 224
    with pytest.raises(UsageError, match=r"^--image-size sets the side of 2D samples"):
        config.resolve({**common, "image_size": 224, "source_options": {"sample": "volume", "volume_size": "8"}})


def test_a_volume_run_resumes_from_another_folder_given_its_data(cli, nii, tmp_path, monkeypatch):
    """A run started with ``--data nifti:nii`` (relative) and the default image size: resumed from another
    folder it names the absolute path to give, which is then the same data (a copy elsewhere is not)."""
    monkeypatch.chdir(nii.parent)
    run = tmp_path / "run"
    result = cli("pretrain", "--data", "nifti:nii", "--out", run, *VOLUME)
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["data"] == "nifti:nii" and info["config"]["image_size"] == 224
    assert info["optimization"]["channels_last"] is False  # the default for a 3D backbone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("pretrain", "--resume", run, "--max-steps", 2)
    assert _one_line(result) == (f"error: --resume: the run's data 'nifti:nii' is a path relative to the folder "
                                 f"the run was started in, not found from here; resume from that folder or give "
                                 f"--data nifti:{nii}")
    copy = shutil.copytree(nii, tmp_path / "copy" / "nii")
    result = cli("pretrain", "--resume", run, "--max-steps", 2, "--data", f"nifti:{copy}")
    assert _one_line(result) == (f"error: --resume continues the run exactly as it was configured: data was "
                                 f"'nifti:nii', not 'nifti:{copy}'; start a new run to change it")
    result = cli("pretrain", "--resume", run, "--max-steps", 2, "--data", f"nifti:{nii}/../nii")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["summary"]["steps"] == 2 and info["config"]["data"] == f"nifti:{nii}/../nii"
    monkeypatch.chdir(nii.parent)  # from where it started, the recorded relative path as before
    result = cli("pretrain", "--resume", run, "--max-steps", 3, "--data", "nifti:nii")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["summary"]["steps"] == 3
