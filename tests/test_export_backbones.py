"""The onnx exporter across backbone families (random-init encoders, no training needed).

Every built-in family must export with the dynamo exporter, pass the full checker and
onnxruntime parity at batch 1 and 8, with a symbolic batch dimension; CNNs also with
symbolic height/width (checked at a second size), ViTs at their fixed grid.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sslkit.registry import create_backbone
from sslkit.registry import get_exporter
from sslkit.spec import InputSpec

# (backbone, options, image size, dynamic H/W). A ViT runs by default (a CNN with dynamic
# H/W is exported from a trained run in test_export.py); the rest are slow.
CASES = [
    pytest.param("timm:resnet18", {}, 32, True, marks=pytest.mark.slow),
    ("timm:vit_tiny_patch16_224", {"patch_size": 8}, 32, False),
    pytest.param("timm:convnext_atto", {}, 32, True, marks=pytest.mark.slow),
    pytest.param("timm:efficientnet_b0", {}, 32, True, marks=pytest.mark.slow),
    pytest.param("timm:vit_tiny_patch16_224", {}, 48, False, marks=pytest.mark.slow),
    pytest.param("timm:vit_tiny_patch16_224", {"dynamic_img_size": True}, 32, True, marks=pytest.mark.slow),
    pytest.param("timm:resnet18", {"cifar_stem": True}, 32, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,options,size,dynamic", CASES)
def test_backbone_exports_and_matches(tmp_path, name, options, size, dynamic):
    torch.manual_seed(0)
    channels = 3
    encoder = create_backbone(name, in_chans=channels, image_size=size, **options).eval()
    spec = InputSpec(channels, size, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "folder", {})
    samples = np.random.default_rng(0).random((5, channels, size, size), dtype=np.float32)
    out = tmp_path / "e.onnx"
    metadata = {"task": "test", "backbone": name, "embedding_dim": encoder.num_features}
    report = get_exporter("onnx")(encoder, spec, metadata, out, samples=samples, samples_note=None)

    assert report["dynamic_hw"] is dynamic
    sizes = {tuple(c["size"]) for c in report["checks"]}
    assert sizes == ({(size, size), (size + 32, size + 16), (size + 32, size + 32)} if dynamic else {(size, size)})
    assert {c["batch"] for c in report["checks"]} == {1, 8}
    assert {c["inputs"] for c in report["checks"]} == {"random", "real"}
    assert report["max_abs_diff"] <= 1e-4

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == (["batch", 3, "height", "width"] if dynamic else ["batch", 3, size, size])
    meta = json.loads({p.key: p.value for p in model.metadata_props}["sslkit"])
    assert meta["input"]["shape"] == dims and meta["output"]["shape"] == ["batch", encoder.num_features]

    # batch 3 is neither checked batch: the batch dimension is really symbolic
    x = np.random.default_rng(1).standard_normal((3, 3, size, size)).astype(np.float32)
    got = ort.InferenceSession(str(out)).run(["embedding"], {"pixels": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, encoder(torch.from_numpy(x)).numpy(), atol=1e-4)
