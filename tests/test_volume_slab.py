"""``--data-opt sample=slab:3``: every 2D task trains unchanged on CT series (slabs are C=3 images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_series import write_series
from tests.test_tasks import ALL_TASKS, SMALL_HEADS, TINY_VIT, VIT_TASKS


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    for i in range(2):
        write_series(root / f"s{i}", n=5, seed=i)
    return root


def pretrain_on_slabs(cli, data: Path, out: Path, task: str):
    vit = task in VIT_TASKS
    size = 64 if task == "jigsaw" else 32
    args = ["pretrain", "--task", task, "--data", f"dicom:{data}", "--out", out, "--image-size", size,
            "--batch-size", 4, "--max-steps", 1, "--quiet", "--data-opt", "sample=slab:3",
            "--data-opt", "window=1000,500", "--backbone", "timm:vit_tiny_patch16_224" if vit else "timm:resnet10t"]
    for k, v in (TINY_VIT if vit else {}).items():
        args += ["--backbone-opt", f"{k}={v}"]
    for k, v in SMALL_HEADS[task].items():
        args += ["--task-opt", f"{k}={v}"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("task", ["simclr", "mae"])
def test_slab3_trains_a_2d_task_on_ct_series(cli, ct_series, tmp_path, task):
    info = pretrain_on_slabs(cli, ct_series, tmp_path / "run", task)
    spec = info["input_spec"]
    assert spec["channels"] == 3 and spec["sample"] == "slab:3" and spec["orientation"]
    assert info["summary"]["steps"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("task", ALL_TASKS)
def test_slab3_trains_every_2d_task_on_ct_series(cli, ct_series, tmp_path, task):
    info = pretrain_on_slabs(cli, ct_series, tmp_path / "run", task)
    assert info["input_spec"]["sample"] == "slab:3" and info["summary"]["steps"] == 1


def test_nifti_trains_in_slab_and_volume_modes(cli, tmp_path):
    """nifti: the same sample modes through pretrain (slice is the default 2D path)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(2):
        nib.save(nib.Nifti1Image(rng.normal(0, 100, (16, 16, 12)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
                 tmp_path / f"v{i}.nii.gz")
    common = ["pretrain", "--data", f"nifti:{tmp_path}", "--max-steps", 1, "--batch-size", 2, "--quiet"]
    result = cli(*common, "--out", tmp_path / "slab", "--task", "simclr", "--backbone", "timm:resnet10t",
                 "--image-size", 32, "--sample", "slab:3", "--task-opt", "proj_hidden_dim=64", "--task-opt", "proj_dim=32")
    assert result.exit_code == 0, result.output
    result = cli(*common, "--out", tmp_path / "vol", "--task", "vicreg", "--backbone", "monai:resnet10",
                 "--sample", "volume", "--spacing", "2", "--volume-size", "8,8,8", "--task-opt", "proj_dim=32")
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "vol" / "run.json").read_text())["input_spec"]
    assert spec["sample"] == "volume" and spec["volume_size"] == [8, 8, 8] and spec["source"] == "nifti"
