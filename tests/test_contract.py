"""Registry-wide contract, on the kit plugin authors use (:mod:`sslkit.testing`).

Parametrized over what the plugins registered, so a task, source, backbone or exporter
added by any plugin is checked for free: every task trains through ``sslkit pretrain``
with 1 and 3 channels (finite losses), exports to ONNX and resumes bit for bit; every
source indexes, loads [0, 1] pixels, reports a damaged file and pickles; every backbone
gives ``(B, D)`` for 1 and 3 channels; every exporter writes one file it verified.
"""

from __future__ import annotations

import numpy as np
import pytest

from sslkit import registry
from sslkit.testing import check_backbone, check_exporter, check_source, check_task
from tests.conftest import make_images

IMAGE_SIZE = {"jigsaw": 64}  # 3x3 tiles of >= 19 px


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("task", registry.list_tasks())
def test_task_contract(task, tmp_path):
    report = check_task(task, tmp_path=tmp_path, image_size=IMAGE_SIZE.get(task, 32))
    assert sorted(report["losses"]) == [1, 3] and len(report["losses"][1]) == 3
    assert "export" in report and "exactly" in report["resume"]


def sample_data(scheme: str, tmp_path) -> str | None:
    """A small valid dataset for each built-in source (None: unknown to this test)."""
    if scheme == "folder":
        return str(make_images(tmp_path / "f", 2, size=24))
    if scheme == "npz":
        imgs = (np.random.default_rng(0).random((5, 28, 28)) * 255).astype(np.uint8)
        np.savez(tmp_path / "d.npz", train_images=imgs, train_labels=np.arange(5))
        return str(tmp_path / "d.npz")
    if scheme == "dicom":
        from tests.dicom_factory import write_dicom

        for i in range(3):
            pixels = (np.random.default_rng(i).random((24, 20)) * 4000).astype(np.uint16)
            write_dicom(tmp_path / "dcm" / f"{i}.dcm", pixels, modality="CT", slope=1.0, intercept=-1024.0)
        return str(tmp_path / "dcm")
    if scheme == "nifti":
        nib = pytest.importorskip("nibabel")
        volume = np.random.default_rng(0).random((12, 10, 4)).astype(np.float32) * 100
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
        return str(tmp_path / "v.nii.gz")
    return None


@pytest.mark.parametrize("scheme", registry.list_sources())
def test_source_contract(scheme, tmp_path):
    location = sample_data(scheme, tmp_path)
    if location is None:
        pytest.skip(f"no sample data known for source {scheme!r}")
    report = check_source(scheme, location, tmp_path=tmp_path)
    assert report["loaded"] >= 1 and report["damaged"]


BACKBONE_MODELS = {"timm": [("resnet10t", {}), ("convnext_atto", {}),
                            ("vit_tiny_patch16_224", {"patch_size": 8, "depth": 2})]}


@pytest.mark.parametrize("prefix", registry.list_backbones())
def test_backbone_contract(prefix):
    if prefix not in BACKBONE_MODELS:
        pytest.skip(f"no sample model known for backbone prefix {prefix!r}")
    reports = [check_backbone(prefix, model, options=opts) for model, opts in BACKBONE_MODELS[prefix]]
    assert [r["token"] for r in reports] == [False, False, True]


@pytest.mark.parametrize("fmt", registry.list_exporters())
def test_exporter_contract(fmt, tmp_path):
    report = check_exporter(fmt, tmp_path=tmp_path)
    assert report["max_abs_diff"] <= 1e-4  # both built-ins verify their file against the encoder
