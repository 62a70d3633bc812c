"""`--format safetensors`: timm loads the weights for fine-tuning, offline, as the README says."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from torch import nn

from sslkit.registry import create_backbone, get_exporter
from sslkit.spec import InputSpec


def _export(tmp_path, name, options, size, channels=1, **opts):
    torch.manual_seed(0)
    encoder = create_backbone(f"timm:{name}", in_chans=channels, image_size=size, **options).eval()
    spec = InputSpec(channels, size, (0.3,) * channels, (0.2,) * channels, "folder", {})
    metadata = {"task": "simclr", "backbone": f"timm:{name}", "backbone_options": options,
                "embedding_dim": encoder.num_features, "run_id": "abc"}
    out = tmp_path / "encoder.safetensors"
    report = get_exporter("safetensors")(encoder, spec, metadata, out, **opts)
    return encoder, out, report


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("name,options,size", [
    ("resnet10t", {}, 32),
    ("vit_tiny_patch16_224", {"patch_size": 8}, 32),
    pytest.param("convnext_atto", {}, 32, marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", {}, 32, marks=pytest.mark.slow),
])
def test_timm_loads_the_weights(tmp_path, monkeypatch, name, options, size):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail
    encoder, out, report = _export(tmp_path, name, options, size)
    assert report["max_abs_diff"] == 0.0 and "pretrained_cfg_overlay" in report["verified_by"]

    # the README's call, for fine-tuning with 5 classes
    extra = {"img_size": size} if "vit" in name else {}
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), in_chans=1,
                              num_classes=5, **options, **extra).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        assert torch.equal(_features(model, x), encoder(x))
        assert model(x).shape == (2, 5)

    with safe_open(str(out), "pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    assert not any(k.startswith("model.") for k in keys)  # timm's own names
    assert keys == set(timm.create_model(name, num_classes=0, in_chans=1, **options, **extra).state_dict())
    assert header["format"] == "sslkit.timm-weights/2" and header["timm_model"] == name
    cfg = json.loads(header["pretrained_cfg"])
    assert cfg["input_size"] == [1, size, size] and cfg["mean"] == [0.3] and cfg["crop_pct"] == 1.0
    assert tuple(report["data_config"]["input_size"]) == (1, size, size) and tuple(report["data_config"]["std"]) == (0.2,)
    assert json.loads(header["sslkit"])["run_id"] == "abc"


def test_cifar_stem_recipe_and_fp16(tmp_path):
    encoder, out, report = _export(tmp_path, "resnet18", {"cifar_stem": True}, 32, channels=3, fp16=True)
    assert "cifar stem" in report["verified_by"]
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("conv1.weight").dtype == torch.float16
        assert json.loads(f.metadata()["cifar_stem"]) is True

    # README recipe: build, change the stem as the run did, load (only the new head is missing)
    from safetensors.torch import load_file

    model = timm.create_model("resnet18", num_classes=10, in_chans=3)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    missing, unexpected = model.load_state_dict(load_file(str(out)), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, ref = _features(model.eval(), x), encoder(x)
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_init_from_an_exported_file_builds_the_architecture_its_header_records(tmp_path):
    """``--init encoder.safetensors`` of sslkit's own export builds the run's backbone (named in the file's
    header), as ``--init RUN_DIR`` does, not the task's default; another safetensors file names none."""
    from safetensors.torch import save_file

    from sslkit.config_backbone import init_backbone

    _, out, _ = _export(tmp_path, "vit_tiny_patch16_224", {"patch_size": 8, "depth": 2}, 32)
    assert init_backbone(str(out)) == ("timm:vit_tiny_patch16_224", {"patch_size": 8, "depth": 2})
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert init_backbone(str(tmp_path / "plain.safetensors")) is None
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 5)
    assert init_backbone(str(tmp_path / "broken.safetensors")) is None
