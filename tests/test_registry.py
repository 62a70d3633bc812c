"""Registry lookups, helpful unknown-name errors, and registry-wide backbone/source contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslkit import registry
from sslkit.data.source import Source
from sslkit.errors import UsageError
from sslkit.options import build_options, parse_pairs
from tests.conftest import make_images


def test_unknown_task_lists_valid_names_and_closest():
    with pytest.raises(UsageError) as info:
        registry.get_task("simclrr")
    msg = str(info.value)
    assert "unknown task 'simclrr'" in msg and "did you mean 'simclr'" in msg and "mae" in msg
    assert "\n" not in msg


def test_unknown_backbone_prefix_and_model():
    with pytest.raises(UsageError, match="unknown backbone prefix 'tim'.*did you mean 'timm'"):
        registry.create_backbone("tim:resnet18", in_chans=1, image_size=32)
    with pytest.raises(UsageError, match="unknown timm model 'resnet181'.*resnet18"):
        registry.create_backbone("timm:resnet181", in_chans=1, image_size=32)
    with pytest.raises(UsageError, match="prefix:model"):
        registry.create_backbone("resnet18", in_chans=1, image_size=32)


def test_unknown_source_scheme_and_detection(tmp_path, pydicom_dir):
    with pytest.raises(UsageError, match="unknown data source 'dicon'.*did you mean 'dicom'"):
        registry.create_source("dicon:/scans")
    assert registry.resolve_data(str(pydicom_dir))[0] == "dicom"
    assert registry.resolve_data(str(make_images(tmp_path / "imgs", 1)))[0] == "folder"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="cannot tell what kind of data"):
        registry.resolve_data(str(tmp_path / "empty"))


def test_task_options_are_typed_and_validated():
    cls = registry.get_task("mae").Options
    opts = build_options(cls, parse_pairs(["mask_ratio=0.6", "norm-pix-loss=false"], "--task-opt"), "task 'mae'")
    assert opts.mask_ratio == 0.6 and opts.norm_pix_loss is False
    with pytest.raises(UsageError, match="no option 'ratio'.*mask_ratio"):
        build_options(cls, {"ratio": "0.5"}, "task 'mae'")
    with pytest.raises(UsageError, match="expects float, got 'lots'"):
        build_options(cls, {"mask_ratio": "lots"}, "task 'mae'")
    with pytest.raises(UsageError, match="mask_ratio must be in"):
        build_options(cls, {"mask_ratio": "1.5"}, "task 'mae'")
    with pytest.raises(UsageError, match="key=value"):
        parse_pairs(["mask_ratio"], "--task-opt")


@pytest.mark.parametrize("model", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_backbone_gives_batch_by_dim_features(model, channels):
    for prefix in registry.list_backbones():
        if prefix != "timm":
            pytest.skip(f"no sample model known for backbone prefix {prefix!r}")
    net = registry.create_backbone(f"timm:{model}", in_chans=channels, image_size=32).eval()
    with torch.no_grad():
        out = net(torch.randn(3, channels, 32, 32))
    assert out.shape == (3, net.num_features) and net.in_chans == channels
    assert torch.isfinite(out).all()


def test_vit_token_interface_matches_full_forward():
    """Encoding all patch tokens through the token interface equals the ViT's own forward."""
    net = registry.create_backbone("timm:vit_tiny_patch16_224", in_chans=1, image_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        tokens = net.encode_tokens(net.patchify(x))
        assert torch.allclose(tokens, net.model.forward_features(x), atol=1e-5)
        assert torch.allclose(tokens[:, 0], net(x), atol=1e-5)


def test_vit_patch_embedding_as_matmul_equals_the_convolution(monkeypatch):
    """The matrix-product patch embedding gives timm's convolution's values and gradients."""
    net = registry.create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=48, patch_size=8)
    x = torch.randn(2, 3, 48, 48)
    calls = []
    monkeypatch.setattr(net.model.patch_embed.proj, "forward", lambda t: calls.append(t) or None)
    fast = net.embed_patches(x)
    assert not calls  # the convolution was not called
    monkeypatch.undo()
    ref = net.model.patch_embed(x)
    assert fast.shape == ref.shape == (2, 36, net.embed_dim)
    assert torch.allclose(fast, ref, atol=1e-5)
    w = net.model.patch_embed.proj.weight
    g_fast, = torch.autograd.grad(fast.square().sum(), w)
    g_ref, = torch.autograd.grad(ref.square().sum(), w)
    assert torch.allclose(g_fast, g_ref, rtol=1e-4, atol=1e-4)


def _sample_data(scheme: str, tmp_path, pydicom_dir) -> str | None:
    if scheme == "folder":
        return str(make_images(tmp_path / "f", 2))
    if scheme == "dicom":
        return str(pydicom_dir)
    if scheme == "npz":
        imgs = (np.random.default_rng(0).random((5, 28, 28)) * 255).astype(np.uint8)
        np.savez(tmp_path / "d.npz", train_images=imgs, train_labels=np.arange(5))
        return str(tmp_path / "d.npz")
    if scheme == "synthetic":
        return "4"
    return None


@pytest.mark.parametrize("scheme", registry.list_sources())
def test_every_source_yields_declared_shape(scheme, tmp_path, pydicom_dir):
    location = _sample_data(scheme, tmp_path, pydicom_dir)
    if location is None:
        pytest.skip(f"no sample data known for source {scheme!r}")
    src = registry.create_source(f"{scheme}:{location}")
    assert isinstance(src, Source)
    refs = src.index()
    assert refs
    loaded = 0
    for ref in refs[:12]:
        try:
            x = src.load(ref)
        except Exception:
            continue  # undecodable samples are the pipeline's business (skipped, reported)
        assert x.dtype == np.float32 and x.ndim == 3 and x.shape[0] in (1, 3)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        declared = src.channels_of(ref)
        assert declared is None or declared == x.shape[0]
        loaded += 1
    assert loaded > 0
