"""slab:K runs with a fixed window export a window graph: each window on each of the K slices."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydicom.uid import generate_uid

from sslkit.raw_input import RawInput, raw_input_for
from sslkit.registry import create_source
from sslkit.run import load_run
from sslkit.spec import InputSpec
from tests.conftest import run_sslkit, tiny_run
from tests.test_onnx_inference import EXAMPLE
from tests.test_series import write_slice

GP = {"kind": "window", "window": [{"lower": 0.0, "upper": 1000.0}, {"lower": -500.0, "upper": 1500.0}],
      "client": "modality values", "options": ["window"]}


def test_slab_window_contract_by_hand():
    spec = InputSpec(6, 32, (0.5,) * 6, (0.25,) * 6, "dicom", {"sample": "slab:3"}, graph_preprocessing=GP)
    raw, note = raw_input_for(spec, True)
    assert raw == RawInput("window", 3, (0.0, 0.0, 0.0, -500.0, -500.0, -500.0), (1000.0,) * 3 + (1500.0,) * 3)
    assert "3 slices' values as 3 channels" in note
    values = np.array([100.0, 500.0, 2000.0], np.float32).reshape(1, 3, 1, 1)  # one pixel of 3 slices
    unit = raw.to_unit(values)[0, :, 0, 0]  # channel c*3 + k: window c on slice k
    np.testing.assert_allclose(unit, [0.1, 0.5, 1.0, 0.3, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(raw.to_unit(raw.from_unit(raw.to_unit(values))), raw.to_unit(values), atol=1e-6)
    assert raw.from_unit(raw.to_unit(values))[0, :2, 0, 0].tolist() == pytest.approx([100.0, 500.0])
    bad = InputSpec(4, 32, (0.5,) * 4, (0.25,) * 4, "dicom", {"sample": "slab:3"}, graph_preprocessing=GP)
    with pytest.raises(Exception, match="2 windows do not match its 4 channels"):
        raw_input_for(bad, True)


def write_ct(folder, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    uid = generate_uid()
    for k in range(6):  # values 0..2000: the window W 1000, L 500 clips the top half
        write_slice(folder / f"{k}.dcm", rng.integers(0, 2000, (size, size)).astype(np.uint16), uid, [0.0, 0.0, 2.5 * k])


def slabs(folder) -> tuple[np.ndarray, np.ndarray]:
    """(modality values, decoded [0, 1]) of every slab:3 sample, ``(6, 3, S, S)`` each."""
    src = create_source(f"dicom:{folder}", workers=1, sample="slab:3", window="1000,500")
    refs = src.index()
    return np.stack([src.load_raw(r) for r in refs]), np.stack([src.load(r) for r in refs])


def test_slab_window_graph_module_on_values_equals_encoder_on_decoded(tmp_path):
    """What the exported graph computes (the exporter's GraphModule, which export checks against
    onnxruntime) on the slabs' modality values == the encoder on the decoded, normalised slabs."""
    from sslkit_plugins.exporters.onnx import GraphModule

    write_ct(tmp_path, 8)
    values, unit = slabs(tmp_path)
    assert values.shape == unit.shape == (6, 3, 8, 8) and (values > 1000).any()
    gp = {**GP, "window": GP["window"][:1]}
    spec = InputSpec(3, 8, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "dicom", {"sample": "slab:3"}, graph_preprocessing=gp)
    raw, _ = raw_input_for(spec, True)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    with torch.no_grad():
        got = GraphModule(enc, raw, spec)(torch.from_numpy(values))
        ref = enc((torch.from_numpy(unit) - mean) / std)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(raw.to_unit(values), unit, atol=1e-6)


@pytest.mark.slow
def test_slab_run_exports_a_window_graph_with_parity(tmp_path):
    write_ct(tmp_path / "ct")
    opts = ("--data-opt", "sample=slab:3", "--data-opt", "window=1000,500")
    run = tiny_run(f"dicom:{tmp_path / 'ct'}", tmp_path / "run", 32, *opts)
    proc = run_sslkit("export", run, "--out", tmp_path / "slab.onnx", "--with-preprocessing", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["input_kind"] == "window" and {c["inputs"] for c in report["checks"]} == {"random", "real"}
    # the graph on the slabs' modality values == the PyTorch encoder on the decoded, normalised slabs
    raw, unit = slabs(tmp_path / "ct")
    got = ort.InferenceSession(str(tmp_path / "slab.onnx")).run(["embedding"], {"pixels": raw})[0]
    loaded = load_run(run)
    mean = np.asarray(loaded.spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(loaded.spec.std, np.float32).reshape(1, -1, 1, 1)
    with torch.no_grad():
        ref = loaded.build_encoder()(torch.from_numpy((unit - mean) / std)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # sslkit embed with the ONNX file and with the run directory: the same rows
    for model, out in ((run, tmp_path / "run.npz"), (tmp_path / "slab.onnx", tmp_path / "onnx.npz")):
        proc = run_sslkit("embed", model, "--data", f"dicom:{tmp_path / 'ct'}", "--out", out, "--quiet")
        assert proc.returncode == 0, proc.stderr
    a, b = np.load(tmp_path / "run.npz"), np.load(tmp_path / "onnx.npz")
    assert a["embeddings"].shape[0] == 6 and list(a["ids"]) == list(b["ids"])
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-4)
    # the torch-free example client reads single images: it refuses a slab encoder in one line, before any work
    proc = subprocess.run([sys.executable, str(EXAMPLE), tmp_path / "slab.onnx", tmp_path / "ct", "--out",
                           tmp_path / "client.npz"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "slab:3 samples" in proc.stderr and "sslkit embed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "client.npz").exists()
