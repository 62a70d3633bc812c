"""`sslkit export`: --fp16 without --with-preprocessing (CNN and ViT), --opset outside the
exporter's range, and the real-input note of --check-data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from plugins.exporters.onnx import supported_opsets
from sslkit.run import load_run
from tests.conftest import make_images, tiny_run
from tests.test_hardening_data import _one_line_error


SIZE = 32
VIT = ("--backbone", "timm:vit_tiny_patch16_224", "--backbone-opt", "patch_size=8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A gray image folder, another one, and 1-step runs of a CNN (resnet10t) and a ViT on the first."""
    root = tmp_path_factory.mktemp("export-precision")
    data = make_images(root / "gray", n_per_class=4, size=40, channels=1)
    other = make_images(root / "elsewhere-secret", n_per_class=4, size=40, channels=1, seed=7)
    return {"data": data, "other": other, "cnn": tiny_run(f"folder:{data}", root / "cnn", SIZE),
            "vit": tiny_run(f"folder:{data}", root / "vit", SIZE, *VIT)}


def _meta(path: Path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["sslkit"])


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_fp16_export_runs_and_matches_the_float32_encoder(trained, tmp_path, cli, kind):
    out = tmp_path / "e16.onnx"
    result = cli("export", trained[kind], "--out", out, "--fp16", "--check-data", "none", "--json")
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]  # conv / patch-embedding kernels
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert _meta(out)["precision"] == "float16"

    run = load_run(trained[kind])
    unit = np.random.default_rng(1).random((5, 1, SIZE, SIZE), dtype=np.float32)
    x = ((unit - np.float32(run.spec.mean[0])) / np.float32(run.spec.std[0])).astype(np.float32)
    with torch.no_grad():
        ref = run.build_encoder()(torch.from_numpy(x)).double().numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    # float16 keeps 11 significant bits (relative rounding 4.9e-4 per value): through a dozen layers
    # errors of ~1e-3 of the embedding's scale are expected; 1e-2 leaves margin, a wrong graph is far off
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    cos = np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999


def test_opset_outside_the_exporters_range_is_refused(trained, tmp_path, cli):
    low, high = supported_opsets()
    assert low == 18 and high >= 18
    for opset in (99, high + 1, 17):
        out = tmp_path / f"o{opset}.onnx"
        _one_line_error(cli("export", trained["cnn"], "--out", out, "--opset", opset),
                        f"--opset {opset}", f"opsets {low} to {high}")
        assert not out.exists()


def test_the_opset_asked_for_is_written_and_recorded(trained, tmp_path, cli):
    high = supported_opsets()[1]
    if high < 19:
        pytest.skip("this torch exports opset 18 only")
    out = tmp_path / "o19.onnx"
    result = cli("export", trained["cnn"], "--out", out, "--opset", 19, "--check-data", "none", "--json")
    assert result.exit_code == 0, result.output
    written = {o.domain: o.version for o in onnx.load(str(out)).opset_import}
    assert written[""] == 19 and _meta(out)["opset"] == 19 and json.loads(result.stdout)["opset"] == 19


def test_real_input_note_names_check_data_without_its_path(trained, tmp_path, cli):
    out = tmp_path / "e.onnx"
    result = cli("export", trained["cnn"], "--out", out, "--check-data", trained["other"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["real_inputs"] == "8 images of --check-data (folder source)"
    assert "elsewhere-secret" not in out.read_bytes().decode("latin-1")
    own = cli("export", trained["cnn"], "--out", tmp_path / "own.onnx", "--json")
    assert json.loads(own.stdout)["real_inputs"] == "8 images of the run's data"
