"""Exporter ``onnx``: the encoder as ONNX, checked and compared against PyTorch.

Input ``pixels`` ``(batch, C, S, S)`` float32 with a symbolic batch dimension, output
``embedding`` ``(batch, D)``. The graph is checked with ``onnx.checker`` (full check),
then onnxruntime is compared with PyTorch at batch 1 and 8; above the tolerance the
export fails and no file is left behind. ``metadata_props["sslkit"]`` holds the JSON
preprocessing contract (input spec, task, backbone, embedding dim, versions).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sslkit
from sslkit.errors import CheckFailed
from sslkit.spec import InputSpec

TOLERANCE = 1e-4
INPUT, OUTPUT = "pixels", "embedding"


def export_onnx(encoder: torch.nn.Module, spec: InputSpec, metadata: dict[str, Any], out: Path,
                opset: int = 18, tolerance: float = TOLERANCE, **_: Any) -> dict[str, Any]:
    import onnx

    out = Path(out)
    encoder = encoder.eval().float()
    size, c = spec.image_size, spec.channels
    example = torch.randn(2, c, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                encoder, (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
                output_names=[OUTPUT], dynamic_shapes=({0: batch},), external_data=False, verbose=False,
            )
        model = program.model_proto
        entry = model.metadata_props.add()
        entry.key, entry.value = "sslkit", json.dumps(metadata, sort_keys=True)
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        report = parity(encoder, tmp, spec, tolerance)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def parity(encoder: torch.nn.Module, path: Path, spec: InputSpec, tolerance: float) -> dict[str, Any]:
    """onnxruntime vs PyTorch on random normalised inputs at batch 1 and 8."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    report: dict[str, Any] = {"tolerance": tolerance, "checks": []}
    for b in (1, 8):
        x = torch.randn(b, spec.channels, spec.image_size, spec.image_size, generator=gen)
        with torch.no_grad():
            ref = encoder(x).numpy()
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        diff = float(np.abs(ref - got).max())
        cos = float(np.min(np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)))
        report["checks"].append({"batch": b, "max_abs_diff": diff, "min_cosine": cos})
        if not diff <= tolerance:
            raise CheckFailed(f"ONNX parity failed at batch {b}: max abs diff {diff:.3g} > {tolerance:g}")
    report["max_abs_diff"] = max(c["max_abs_diff"] for c in report["checks"])
    return report


@sslkit.hookimpl
def register_exporters(register):
    register("onnx", export_onnx)
