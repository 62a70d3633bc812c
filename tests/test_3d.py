"""3D: batched volume augmentations, MONAI backbones, MAE on cube patches, pairing refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sslkit_plugins.tasks.mae_volume import patchify3d

from sslkit.augment3d import (
    VolumeRecipe,
    adjust_gamma_3d,
    blur_3d,
    flip_3d,
    random_flips,
    resized_crop_3d,
    scale_shift,
)
from sslkit.cli import main
from sslkit.registry import create_backbone, create_task
from sslkit.spec import InputSpec
from tests.test_series import write_slice

TINY_VIT3D = dict(patch_size=8, hidden_size=48, num_heads=2, num_layers=1)


def volume_spec(size=(16, 16, 16), channels: int = 1) -> InputSpec:
    return InputSpec(channels, 224, (0.5,) * channels, (0.25,) * channels, "test",
                     {"sample": "volume", "volume_size": list(size), "spacing_mm": [2.0, 2.0, 2.0]})


# ---------------------------------------------------------------- augmentations


def test_resized_crop_3d_by_hand():
    x = torch.rand(2, 1, 8, 10, 12)
    whole = torch.tensor([[0.5, 0.5, 0.5, 1.0, 1.0, 1.0]] * 2)
    torch.testing.assert_close(resized_crop_3d(x, whole, (8, 10, 12)), x, atol=1e-5, rtol=0)
    # the first half along W, the last half along D, at their own resolution
    box = torch.tensor([[0.75, 0.5, 0.25, 0.5, 1.0, 0.5]] * 2)
    torch.testing.assert_close(resized_crop_3d(x, box, (4, 10, 6)), x[:, :, 4:, :, :6], atol=1e-5, rtol=0)


def test_flips_only_along_declared_axes():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(1, 1, 2, 3, 4, 5)[0]
    x = torch.cat([x, x])
    torch.testing.assert_close(flip_3d(x, torch.tensor([True, False]), 2)[0], x[0].flip(-1))
    torch.testing.assert_close(flip_3d(x, torch.tensor([True, False]), 2)[1], x[1])
    torch.manual_seed(0)
    for _ in range(10):  # W only: D and H never change order
        y = random_flips(x, axes=(2,), p=0.5)
        for b in range(2):
            assert torch.equal(y[b], x[b]) or torch.equal(y[b], x[b].flip(-1))


def test_intensity_ops_by_hand():
    x = torch.rand(2, 1, 4, 4, 4)
    torch.testing.assert_close(scale_shift(x, torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.1]))[1],
                               (x[1] * 0.5 + 0.1).clamp(0, 1))
    torch.testing.assert_close(adjust_gamma_3d(x, torch.tensor([1.0, 2.0]))[1], x[1] ** 2)
    torch.testing.assert_close(blur_3d(x, torch.tensor([1e-4, 1e-4])), x)
    const = torch.full((1, 1, 6, 6, 6), 0.3)
    torch.testing.assert_close(blur_3d(const, torch.tensor([1.5])), const)  # a blur keeps a constant


def test_volume_recipe_output_shape_and_range():
    torch.manual_seed(0)
    y = VolumeRecipe((8, 6, 4))(torch.rand(3, 2, 16, 16, 16))
    assert y.shape == (3, 2, 8, 6, 4) and y.min() >= 0 and y.max() <= 1


# ---------------------------------------------------------------- backbones and MAE


def test_monai_backbones_embed_volumes():
    x = torch.rand(2, 2, 16, 16, 16)
    resnet = create_backbone("monai:resnet10", 2, (16, 16, 16))
    assert resnet(x).shape == (2, resnet.num_features) and resnet.spatial_dims == 3
    vit = create_backbone("monai:vit", 2, (16, 16, 16), **TINY_VIT3D)
    assert vit(x).shape == (2, 48) and vit.patchify(x).shape == (2, 8, 48)
    from sslkit.errors import UsageError

    with pytest.raises(UsageError, match=r"^cannot build monai:vit with these --backbone-opt values: "
                                         r".*hidden_size should be divisible by num_heads"):  # not 'for 3 x (224...'
        create_backbone("monai:vit", 1, (16, 16, 16), **{**TINY_VIT3D, "num_heads": 5})


def test_patchify3d_matches_the_vit_cube_order():
    """Cube ``n`` of the target is the cube MONAI's patch embedding turns into token ``n``."""
    vit = create_backbone("monai:vit", 1, (16, 16, 16), **TINY_VIT3D)
    conv = vit.model.patch_embedding.patch_embeddings
    x = torch.rand(1, 1, 16, 16, 16)
    tokens = conv(x).flatten(2).transpose(1, 2)  # what patchify adds position embeddings to
    linear = patchify3d(x, 8) @ conv.weight.reshape(48, 1, 8, 8, 8).permute(0, 2, 3, 4, 1).reshape(48, -1).T
    torch.testing.assert_close(tokens, linear + conv.bias, atol=1e-4, rtol=1e-4)


def test_mae3d_encodes_visible_cubes_only_and_scores_masked_ones():
    spec = volume_spec()
    task = create_task("mae", create_backbone("monai:vit", 1, spec.volume_size, **TINY_VIT3D), spec,
                       decoder_dim=48, decoder_depth=1, decoder_heads=2)
    assert type(task).__name__ == "MAE3D" and task.num_patches == 8
    x = torch.rand(2, 1, 16, 16, 16)
    latent, mask, _ = task.forward_encoder(x)
    assert latent.shape == (2, 2, 48) and mask.sum(1).tolist() == [6.0, 6.0]  # 75 % of 8 cubes masked
    target = patchify3d(x, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    wrong_where_visible = torch.where(mask.bool()[..., None], target, target + 5)
    assert task.forward_loss(x, wrong_where_visible, mask).item() == pytest.approx(0.0, abs=1e-6)
    (view,) = task.views(spec)(x)
    assert view.shape == x.shape
    assert task(( view,))["loss"].isfinite()


# ---------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def ct_volumes(tmp_path_factory) -> Path:
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("ct3d")
    rng = np.random.default_rng(0)
    for s in range(2):
        uid = generate_uid()
        for k in range(12):
            img = rng.integers(0, 2000, (16, 16)).astype(np.uint16)
            write_slice(root / f"s{s}" / f"{k}.dcm", img, uid, [0.0, 0.0, 2.0 * k], spacing=(2.0, 2.0))
    return root


def pretrain_volume(data: Path, out: Path, *extra: str):
    """``sslkit pretrain`` on volumes, in-process (a subprocess only added ~5 s of imports)."""
    args = ["pretrain", "--data", f"dicom:{data}", "--out", out, "--data-opt", "sample=volume",
            "--data-opt", "spacing=2", "--data-opt", "volume_size=16,16,16", "--max-steps", 2,
            "--batch-size", 2, "--quiet", *extra]
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_mae_pretrains_on_ct_volumes(ct_volumes, tmp_path):
    args = [a for k, v in TINY_VIT3D.items() for a in ("--backbone-opt", f"{k}={v}")]
    proc = pretrain_volume(ct_volumes, tmp_path / "run", "--task", "mae", "--backbone", "monai:vit", *args,
                           "--task-opt", "decoder_dim=48", "--task-opt", "decoder_heads=2")
    assert proc.exit_code == 0, proc.stderr
    spec = json.loads((tmp_path / "run" / "run.json").read_text())["input_spec"]
    assert spec["sample"] == "volume" and spec["volume_size"] == [16, 16, 16] and spec["spacing"] == [2.0, 2.0, 2.0]
    # export: parity-checked ONNX whose metadata states the sample mode, spacing and size
    onnx_file = tmp_path / "enc.onnx"
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(onnx_file)])
    assert result.exit_code == 0, result.output
    assert "parity real   batch 8 16x16x16" in result.output
    from sslkit.embed import read_onnx_metadata

    meta = read_onnx_metadata(onnx_file)["input"]
    assert (meta["sample"], meta["layout"], meta["shape"]) == ("volume", "NCDHW", ["batch", 1, 16, 16, 16])
    assert meta["spacing_mm"] == [2.0, 2.0, 2.0] and meta["volume_size"] == [16, 16, 16]
    # embed: one row per series, named by a salted key (no UID, no path)
    result = CliRunner().invoke(main, ["embed", str(onnx_file), "--data", f"dicom:{ct_volumes}",
                                       "--out", str(tmp_path / "emb.npz")])
    assert result.exit_code == 0, result.output
    z = np.load(tmp_path / "emb.npz")
    assert z["embeddings"].shape == (2, 48) and all(i.startswith("series:") and len(i) == 23 for i in z["ids"])
    assert len(set(z["ids"])) == 2
    _assert_no_series_identifier(ct_volumes, sorted(z["ids"]), [*(tmp_path / "run").rglob("*"), onnx_file])


def _assert_no_series_identifier(data: Path, ids: list[str], files: list[Path]) -> None:
    """ids are keyed hashes of the series UIDs; no UID, old constant-salt hash, key or secret in ``files``."""
    import hashlib
    import os

    from pydicom import dcmread
    from sslkit_plugins.sources.dicom_series import series_key

    uids = sorted({str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in data.rglob("*.dcm")})
    assert ids == sorted(f"series:{series_key(u)}" for u in uids)
    secret = os.environ["SSLKIT_KEY"].encode()  # the session's secret (tests/conftest.py)
    needles = [secret, secret.hex().encode()]
    for uid in uids:
        needles += [uid.encode(), hashlib.sha256(b"sslkit-series-v1" + uid.encode()).hexdigest()[:16].encode(),
                    series_key(uid).encode()]
    for f in files:
        if f.is_file():
            blob = f.read_bytes()
            assert not [n for n in needles if n in blob], f"{f.name} holds a series identifier or the secret"


def test_3d_data_with_a_2d_backbone_is_refused_before_decoding(ct_volumes, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    proc = cli("pretrain", "--data", f"dicom:{ct_volumes}", "--out", tmp_path / "run", "--task", "mae",
               "--backbone", "timm:vit_tiny_patch16_224", "--data-opt", "sample=volume",
               "--data-opt", "volume_size=16,16,16", "--max-steps", 1)
    assert proc.exit_code == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "2D backbone" in proc.stderr and "monai:vit" in proc.stderr
    assert not list((tmp_path / "cache").glob("*/pixels.npy")) and not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("task,backbone,sample,needle", [
    ("rotation", "monai:resnet10", "volume", "tasks that do: byol, mae, simclr, vicreg"),
    ("simclr", "monai:resnet10", "slab:3", "takes --sample volume only"),
    # a bad volume option is named as such, not as a 2D sample (the mode could not be read, so 'slice')
    ("simclr", "monai:resnet10", "volume --volume-size 16,16", "--volume-size '16,16' is not D,H,W"),
    ("simclr", "monai:resnet10", "volum", "--sample 'volum' is not slice, slab:K"),
])
def test_impossible_pairings_name_what_works(cli, ct_volumes, tmp_path, task, backbone, sample, needle):
    sample, *given = sample.split()
    extra = given or (("--data-opt", "volume_size=16,16,16") if sample == "volume" else ())
    result = CliRunner().invoke(main, ["pretrain", "--data", f"dicom:{ct_volumes}", "--out", str(tmp_path / "run"),
                                       "--task", task, "--backbone", backbone, "--data-opt", f"sample={sample}",
                                       "--max-steps", "1", *extra])
    assert result.exit_code == 2 and needle in result.output, result.output


@pytest.mark.parametrize("task", ["simclr", "vicreg", "byol"])
def test_two_view_tasks_train_on_volumes(task):
    """Two 3D views of each volume through a 3D ResNet: a finite loss, and a step lowers it on a fixed batch."""
    torch.manual_seed(0)
    spec = volume_spec((8, 8, 8))
    model = create_task(task, create_backbone("monai:resnet10", 1, spec.volume_size), spec, proj_dim=32,
                        **({"proj_hidden_dim": 64} if task != "vicreg" else {}),
                        **({"pred_hidden_dim": 64} if task == "byol" else {}))
    views = model.views(spec)(torch.rand(4, 1, 12, 12, 12))
    assert len(views) == 2 and views[0].shape == (4, 1, 8, 8, 8) and not torch.equal(views[0], views[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(views)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_dicom_series_as_volumes_pass_the_source_kit(ct_volumes, tmp_path):
    """The kit on ``--sample volume``: each series a (1, 16, 16, 16) volume, a truncated slice reported."""
    from sslkit.testing import check_source

    report = check_source("dicom", str(ct_volumes), tmp_path=tmp_path,
                          options={"sample": "volume", "spacing": "2", "volume_size": "16,16,16"})
    assert report["samples"] == 2 and report["channels"] == [1]
    assert report["damaged"].startswith(("load raises", "a source on the damaged file"))
