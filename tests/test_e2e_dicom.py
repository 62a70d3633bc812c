"""The walking skeleton: DICOM folder -> pretrain MAE -> export ONNX -> same embeddings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch

from sslkit.data.pipeline import load_data
from sslkit.run import load_run
from tests.conftest import run_sslkit


def test_pydicom_files_to_checked_onnx(pydicom_dir, tmp_path, cli):
    """Pretrain through the real executable; export in-process (the same CLI, one interpreter less)."""
    run_dir, onnx_path = tmp_path / "mae", tmp_path / "encoder.onnx"
    proc = run_sslkit("pretrain", "--task", "mae", "--data", f"dicom:{pydicom_dir}", "--out", run_dir,
                      "--epochs", "1", "--batch-size", "16", "--image-size", "32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "done:" in proc.stdout
    for name in ("run.json", "metrics.csv", "data_report.json", "encoder.safetensors"):
        assert (run_dir / name).exists(), name
    info = json.loads((run_dir / "run.json").read_text())
    assert info["task"] == "mae" and info["backbone"].startswith("timm:vit_")
    fitted = info["config"]["backbone_options"]  # the default ViT fitted to 32-px images, exported as built
    assert (fitted["patch_size"], fitted["depth"]) == (8, 6), fitted
    assert info["input_spec"]["channels"] == 1 and info["input_spec"]["image_size"] == 32
    assert info["environment"]["torch"] == torch.__version__
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["samples"] > 50 and report["skipped"] >= 1  # pydicom ships broken files on purpose

    result = cli("export", run_dir, "--out", onnx_path, "--json")
    assert result.exit_code == 0, result.output
    parity = json.loads(result.stdout)
    assert {(c["inputs"], c["batch"]) for c in parity["checks"]} == {
        ("random", 1), ("random", 8), ("real", 1), ("real", 8)} and parity["max_abs_diff"] <= 1e-4

    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == ["pixels"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    meta = json.loads({p.key: p.value for p in model.metadata_props}["sslkit"])
    assert meta["input"]["channels"] == 1 and meta["task"] == "mae" and meta["embedding_dim"] == 192

    # Real DICOM pixels, preprocessed as the run says: onnxruntime equals torch.
    run = load_run(run_dir)
    spec = run.spec
    pixels = load_data(f"dicom:{pydicom_dir}", spec.image_size, spec.channels, progress=False).prepared.pixels
    x = np.asarray(pixels[:8], dtype=np.float32) / 65535.0
    x = (x - np.array(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)) / np.array(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    with torch.no_grad():
        expected = run.build_encoder()(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(onnx_path)).run(["embedding"], {"pixels": x})[0]
    assert got.shape == (8, 192)
    np.testing.assert_allclose(got, expected, atol=1e-4)
