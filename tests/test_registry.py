"""Registry lookups and helpful unknown-name errors (the registry-wide contracts: test_contract.py)."""

from __future__ import annotations

import pytest
import torch

from sslkit import registry
from sslkit.errors import UsageError
from sslkit.options import build_options, parse_pairs
from tests.conftest import make_images


def test_the_one_did_you_mean_helper():
    from sslkit.api import unknown_name_message

    names = [f"model{i:02d}" for i in range(50)]
    assert unknown_name_message("thing", "modl07", names) == (
        "unknown thing 'modl07' (did you mean 'model07'?); choose from: " + ", ".join(names[:40]) + ", ...")
    assert unknown_name_message("thing", "zzz", ["a", "b"], "; see the docs") == (
        "unknown thing 'zzz'; choose from: a, b; see the docs")
    three = unknown_name_message("timm model", "resnt18", ["resnet18", "resnet18d", "resnet50", "vit"], "; see X",
                                 suggestions=3, listed=0)
    assert three.startswith("unknown timm model 'resnt18' (did you mean 'resnet18', ") and three.endswith("?); see X")
    assert "vit" not in three and unknown_name_message("x", "y", []) == "unknown x 'y'; choose from: none installed"


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


def test_a_bare_path_of_many_patient_folders_is_detected(tmp_path, pydicom_dir):
    """300 patient folders at the root: the first 200 entries sniffed were all folders, and no
    source recognised the data ("cannot tell what kind of data")."""
    import shutil

    from PIL import Image

    ct = next(pydicom_dir.rglob("CT_small.dcm"))
    for i in range(300):
        (tmp_path / "dcm" / f"p{i:03d}").mkdir(parents=True)
        shutil.copy(ct, tmp_path / "dcm" / f"p{i:03d}" / "1.dcm")
        (tmp_path / "img" / f"p{i:03d}").mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / "img" / f"p{i:03d}" / "a.png")
    assert registry.resolve_data(str(tmp_path / "dcm"))[0] == "dicom"
    assert registry.resolve_data(str(tmp_path / "img"))[0] == "folder"


def test_task_options_are_typed_and_validated():
    cls = registry.get_task("mae").Options
    opts = build_options(cls, parse_pairs(["mask_ratio=0.6", "norm-pix-loss=false"], "--task-opt"), "task 'mae'")
    assert opts.mask_ratio == 0.6 and opts.norm_pix_loss is False
    with pytest.raises(UsageError, match="unknown option 'ratio' \\(did you mean 'mask_ratio'\\?\\)"):
        build_options(cls, {"ratio": "0.5"}, "task 'mae'")
    with pytest.raises(UsageError, match="expects float, got 'lots'"):
        build_options(cls, {"mask_ratio": "lots"}, "task 'mae'")
    with pytest.raises(UsageError, match="mask_ratio must be in"):
        build_options(cls, {"mask_ratio": "1.5"}, "task 'mae'")
    with pytest.raises(UsageError, match="key=value"):
        parse_pairs(["mask_ratio"], "--task-opt")


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


def test_options_without_fields_take_none_in_one_line():
    import dataclasses

    @dataclasses.dataclass
    class NoFields:
        pass

    with pytest.raises(UsageError, match=r"^task 'x' takes no options, got ratio$"):
        build_options(NoFields, {"ratio": "1"}, "task 'x'")
    assert build_options(NoFields, {}, "task 'x'") == NoFields()
