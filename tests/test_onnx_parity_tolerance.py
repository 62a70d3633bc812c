"""The ONNX export's float32 parity rule: max abs difference <= 1e-4 x max(1, max |embedding|).

float32 rounding grows with the values: an encoder whose embeddings reach ~1000 differs from
onnxruntime by ~1e-4 relative to nothing but rounding, and an absolute 1e-4 refused it (the
audit's run: max |embedding| ~300, abs diff 3.7e-4, cosine 1.000000, nothing exported). A graph
that computes something else must still be refused, at any scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from plugins.exporters.onnx import GraphModule, _torch_export, export_onnx, verify
from sslkit.api import CheckFailed, InputSpec, raw_input_for


SPEC = InputSpec(channels=1, image_size=16, mean=(0.5,), std=(0.25,))


class _Tiny(nn.Module):
    """conv -> ReLU -> mean pool -> linear, its output times ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc, self.scale = nn.Conv2d(1, 16, 3, padding=1), nn.Linear(16, 8), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * self.scale


class _Off(nn.Module):
    """``module``'s output times ``factor`` plus ``shift``: a reference the graph does not quite compute."""

    def __init__(self, module: nn.Module, factor: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.module, self.factor, self.shift = module, factor, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) * self.factor + self.shift


def _graph(tmp_path: Path, scale: float):
    """The exported graph of ``_Tiny(scale)`` in a file, and the module it was made from."""
    import onnx

    raw, _ = raw_input_for(SPEC, False, None)
    module = GraphModule(_Tiny(scale).eval(), raw, SPEC).eval()
    model, _ = _torch_export(module, raw, SPEC, 18, True)
    path = tmp_path / f"tiny-{scale:g}.onnx"
    onnx.save_model(model, str(path))
    return path, module, raw


def _check(path, module, raw):
    return verify(path, module, raw, SPEC, [(16, 16)], None, 1e-4, None, lambda line: None)


def test_a_large_embedding_passes_on_rounding_alone_and_a_wrong_graph_still_fails(tmp_path):
    path, module, raw = _graph(tmp_path, 1000.0)
    with torch.no_grad():
        peak = float(module(torch.randn(8, 1, 16, 16)).abs().max())
    assert peak > 100  # large embeddings, as the audit's run
    # a relative 4e-7 (float32 rounding of values this size): above an absolute 1e-4, within 1e-4 x the scale
    checks = _check(path, _Off(module, 1 + 4e-7), raw)
    worst = max(c["max_abs_diff"] for c in checks)
    assert 1e-4 < worst < 1e-4 * peak and min(c["min_cosine"] for c in checks) > 0.999999
    # a graph off by a relative 1e-3 is refused, and the message says the limit and how it scales
    with pytest.raises(CheckFailed, match=r"parity failed on random inputs at batch 1, 16x16: max abs diff "
                                          r"\S+ > \S+ \(0\.0001 x max\(1, max \|embedding\| \S+\)\)"):
        _check(path, _Off(module, 1 + 1e-3), raw)


def test_small_embeddings_keep_the_absolute_floor(tmp_path):
    path, module, raw = _graph(tmp_path, 0.01)
    # within [-1, 1] the limit is 1e-4 itself (not 1e-4 x a small scale): 5e-5 passes, 2e-4 fails
    assert max(c["max_abs_diff"] for c in _check(path, _Off(module, shift=5e-5), raw)) < 1e-4
    with pytest.raises(CheckFailed, match=r"max abs diff 0\.0002\d* > 0\.0001 "):
        _check(path, _Off(module, shift=2e-4), raw)


def test_export_of_a_large_embedding_encoder_writes_the_file_with_its_rule(tmp_path):
    import json

    import onnx
    import onnxruntime as ort

    out = tmp_path / "big.onnx"
    report = export_onnx(_Tiny(1e6).eval(), SPEC, {"backbone": "tiny", "embedding_dim": 8}, out)
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["sslkit"])
    assert meta["verification"]["float32"]["rule"] == "max abs diff <= tolerance x max(1, max |embedding|)"
    assert meta["verification"]["float32"]["tolerance"] == 1e-4 == report["tolerance"]
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16), np.float32)  # normalised pixels: the graph's input
    got = ort.InferenceSession(str(out)).run(["embedding"], {"pixels": x})[0]
    with torch.no_grad():
        ref = _Tiny(1e6).eval()(torch.from_numpy(x)).numpy()
    assert np.abs(ref).max() > 1e5 and np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert report["max_abs_diff"] > 1e-4  # what an absolute 1e-4 refused
