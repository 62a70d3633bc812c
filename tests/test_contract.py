"""Registry-wide contract, on the kit plugin authors use (:mod:`sslkit.testing`).

Parametrized over what the plugins registered, so a task, source, backbone, exporter or
callback added by any plugin is checked for free: every task trains through ``sslkit pretrain``
with 1 and 3 channels (finite losses), exports to ONNX and resumes bit for bit; every
source indexes, loads [0, 1] pixels, reports a damaged file and pickles; every backbone
gives ``(B, D)`` for 1 and 3 channels; every exporter writes one file it verified; every
callback takes a run's events, a resumed run's and a failed run's without raising.
"""

from __future__ import annotations

import numpy as np
import pytest

from sslkit import registry
from sslkit.api import UsageError
from sslkit.testing import check_backbone, check_callback, check_exporter, check_source, check_task
from tests.conftest import make_images

IMAGE_SIZE = {"jigsaw": 64}  # 3x3 tiles of >= 19 px


@pytest.mark.parametrize("task", registry.list_tasks())
def test_task_contract(task, tmp_path):
    report = check_task(task, tmp_path=tmp_path, image_size=IMAGE_SIZE.get(task, 32))
    assert sorted(report["losses"]) == [1, 3] and len(report["losses"][1]) == 3
    assert "export" in report and "exactly" in report["resume"]


def volume_tasks() -> list[str]:
    from sslkit.sample_modes import task_modes

    return [t for t in registry.list_tasks() if "volume" in task_modes(registry.get_task(t))]


@pytest.mark.parametrize("task", volume_tasks())
def test_volume_task_contract(task, tmp_path):
    """Each task that trains on volumes: CT series through the dicom source, a tiny MONAI network,
    finite losses, a verified ONNX export and an exact resume."""
    pytest.importorskip("monai")
    report = check_task(task, tmp_path=tmp_path, volume=(16, 16, 16))
    assert report["backbone"].startswith("monai:") and sorted(report["losses"]) == [1]
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
    assert report["loaded"] >= 1 and report["damaged"] and report["graph"] in ("pixels", "unit", "window")


def test_source_contract_with_a_fixed_window_graph(tmp_path):
    """A DICOM lung window goes into the export graph: the kit checks that ``window`` graph."""
    report = check_source("dicom", sample_data("dicom", tmp_path), tmp_path=tmp_path, options={"window": "lung"})
    assert report["graph"] == "window"


@pytest.mark.parametrize("options", [{"sample": "volume", "volume_size": "8,6,6"}, {"sample": "slab:3"}])
def test_volumetric_source_contract(options, tmp_path):
    """NIfTI volumes as 3D samples and as slabs: the kit checks the shapes training stores, and
    that a truncated file, which a load by index never reads, fails in a source of its own."""
    report = check_source("nifti", sample_data("nifti", tmp_path), tmp_path=tmp_path, options=options)
    assert report["channels"] == ([1] if options["sample"] == "volume" else [3])
    assert report["damaged"] == "a source on the damaged file skips it"


#: per prefix: (model, options, is a token backbone, spatial dims), the input size, a module it needs
BACKBONE_MODELS = {
    "timm": ([("resnet10t", {}, False, 2), ("convnext_atto", {}, False, 2),
              ("vit_tiny_patch16_224", {"patch_size": 8, "depth": 2}, True, 2)], 32, None),
    "monai": ([("resnet10", {}, False, 3),
               ("vit", {"patch_size": 8, "hidden_size": 48, "num_layers": 1, "num_heads": 2}, True, 3)], 16, "monai"),
}


@pytest.mark.parametrize("prefix", registry.list_backbones())
def test_backbone_contract(prefix):
    if prefix not in BACKBONE_MODELS:
        pytest.skip(f"no sample model known for backbone prefix {prefix!r}")
    models, size, needs = BACKBONE_MODELS[prefix]
    if needs:
        pytest.importorskip(needs)
    reports = [check_backbone(prefix, model, options=opts, image_size=size) for model, opts, _, _ in models]
    assert [(r["token"], r["spatial_dims"]) for r in reports] == [(token, dims) for _, _, token, dims in models]


@pytest.mark.parametrize("fmt", registry.list_exporters())
def test_exporter_contract(fmt, tmp_path):
    report = check_exporter(fmt, tmp_path=tmp_path)
    assert report["max_abs_diff"] <= 1e-4  # both built-ins verify their file against the encoder


VOLUME_EXPORT = {"onnx": "exported", "safetensors": "refused"}  # safetensors writes timm checkpoints only


@pytest.mark.parametrize("fmt", registry.list_exporters())
def test_exporter_contract_on_volumes(fmt, tmp_path):
    """A 3D encoder of a ``--sample volume`` run: exported and verified on (B, C, D, H, W), or
    refused in one line (UsageError) before anything is written."""
    pytest.importorskip("monai")
    expected = VOLUME_EXPORT.get(fmt)
    try:
        report = check_exporter(fmt, tmp_path=tmp_path, volume=(16, 16, 16))
    except UsageError as exc:
        assert expected in (None, "refused"), f"{fmt} refused a 3D encoder: {exc}"
        assert "\n" not in str(exc) and "monai:resnet10" in str(exc)
        assert not any(p.is_file() for p in tmp_path.rglob("*")), "a refused export left a file behind"
        return
    assert expected in (None, "exported"), f"{fmt} exported a 3D encoder it should refuse"
    if fmt == "onnx":
        assert {c["size"][0] for c in report["checks"]} == {16} and report["max_abs_diff"] <= 1e-4
        assert {c["inputs"] for c in report["checks"]} == {"random", "real"}
        import json

        import onnx
        model = onnx.load(str(tmp_path / "export-onnx" / "encoder.out"))
        meta = json.loads({p.key: p.value for p in model.metadata_props}["sslkit"])["input"]
        assert meta["layout"] == "NCDHW" and meta["volume_size"] == [16, 16, 16] and meta["sample"] == "volume"


@pytest.mark.parametrize("name", registry.list_callbacks())
def test_callback_contract(name, tmp_path):
    if name == "tensorboard":
        pytest.importorskip("tensorboard")
    from sslkit.engine.events import handled_events
    from sslkit.plugins import get_plugins

    report = check_callback(name, tmp_path=tmp_path)
    every = {"on_run_start": 1, "on_step_end": 3, "on_checkpoint": 2, "on_run_end": 1}
    handled = handled_events(get_plugins().lookup("callbacks", name).obj())  # the kit counts these only
    assert handled and report["events"] == {e: every[e] for e in handled}
