"""Volume runs: user errors of the MONAI backbones, MAE on volumes and --init named by their cause,
and `data inspect --sample volume` counting volumes (4D files) and giving the size from the header."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sslkit_plugins.tasks.mae_volume import MAE3D

from sslkit.errors import UsageError
from sslkit.init import load_init
from sslkit.registry import create_backbone, create_source
from sslkit.spec import InputSpec

TINY = dict(patch_size=8, hidden_size=48, num_heads=2, num_layers=1)


def write_volumes(root: Path, four_d: bool = False) -> Path:
    """Two 3D files (20x18x12 voxels) in class folders, and with ``four_d`` a 10x10x6 file of 3 time points."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        data = rng.normal(0, 100, (20, 18, 12)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.2, 2.5, 1.0])), root / name / "vol.nii.gz")
    if four_d:
        data = rng.normal(size=(10, 10, 6, 3)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), root / "a" / "fmri.nii.gz")
    return root


def volume_spec(size) -> InputSpec:
    return InputSpec(1, 224, (0.5,), (0.25,), "test", {"sample": "volume", "volume_size": list(size)})


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ---------------------------------------------------------------- MAE on fewer than 4 cubes


def test_mae_on_a_volume_of_one_cube_is_refused_before_decoding(tmp_path, cli, monkeypatch):
    """Default 16-voxel cubes at --volume-size 16,16,16: one token, none left visible after masking;
    it trained to a NaN loss (0/0) and advised lowering --lr."""
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = write_volumes(tmp_path / "nii")
    result = cli("pretrain", "--task", "mae", "--backbone", "monai:vit", "--data", f"nifti:{data}", "--sample",
                 "volume", "--volume-size", "16,16,16", "--max-steps", 1, "--batch-size", 2, "--device", "cpu",
                 "--out", tmp_path / "run")
    assert one_line_error(result) == (
        "error: task 'mae' cannot run here: MAE at --volume-size 16,16,16 with 16-voxel cubes has 1 cube token(s), "
        "fewer than 4: use --volume-size 32,32,16 or more, or a smaller --backbone-opt patch_size")
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").rglob("*.npy"))


@pytest.mark.parametrize("size, tokens", [((16, 8, 8), 2), ((8, 8, 8), 1), ((16, 16, 8), 4), ((16, 16, 16), 8)])
def test_mae3d_needs_as_many_cubes_as_2d_mae_needs_patches(size, tokens):
    backbone = create_backbone("monai:vit", 1, size, **TINY)
    assert len(backbone.patchify(torch.zeros(1, 1, *size))[0]) == tokens
    why = MAE3D.check(backbone, volume_spec(size))
    if tokens >= 4:
        assert why is None
    else:
        assert why == (f"MAE at --volume-size {','.join(map(str, size))} with 8-voxel cubes has {tokens} cube "
                       f"token(s), fewer than 4: use --volume-size 16,16,8 or more, or a smaller --backbone-opt "
                       f"patch_size")


# ---------------------------------------------------------------- --backbone-opt a family does not use


RESNET_CHOICES = "conv1_t_size, conv1_t_stride, no_max_pool, shortcut_type, widen_factor, bias_downsample, act, norm"
VIT_CHOICES = ("patch_size, hidden_size, mlp_dim, num_layers, num_heads, proj_type, pos_embed_type, dropout_rate, "
               "qkv_bias, save_attn")


def test_a_resnet_refuses_vit_options_and_records_nothing(tmp_path, cli):
    """They were swallowed as named parameters: the run trained and run.json recorded them."""
    data = write_volumes(tmp_path / "nii")
    opts = [a for o in ("hidden_size=48", "patch_size=7", "num_layers=99") for a in ("--backbone-opt", o)]
    result = cli("pretrain", "--task", "simclr", "--backbone", "monai:resnet10", *opts, "--data", f"nifti:{data}",
                 "--sample", "volume", "--volume-size", "16,16,16", "--max-steps", 1, "--batch-size", 2,
                 "--device", "cpu", "--out", tmp_path / "run")
    assert one_line_error(result) == (
        f"error: unknown monai:resnet10 --backbone-opt 'hidden_size'; choose from: {RESNET_CHOICES}; "
        "hidden_size is a monai:vit option, not used by monai:resnet10")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, option, message", [
    ("resnet18", {"pretrained": True},  # would have downloaded MedicalNet weights
     f"unknown monai:resnet18 --backbone-opt 'pretrained'; choose from: {RESNET_CHOICES}"),
    ("resnet10", {"num_classes": 3},  # no classifier: it did nothing
     f"unknown monai:resnet10 --backbone-opt 'num_classes'; choose from: {RESNET_CHOICES}"),
    ("resnet34", {"widen_factr": 2},
     f"unknown monai:resnet34 --backbone-opt 'widen_factr' (did you mean 'widen_factor'?); choose from: "
     f"{RESNET_CHOICES}"),
    ("vit", {"widen_factor": 2},
     f"unknown monai:vit --backbone-opt 'widen_factor'; choose from: {VIT_CHOICES}; widen_factor is a "
     "monai:resnet* option, not used by monai:vit"),
    ("vit", {"num_classes": 3},  # only a classifying ViT reads it
     f"unknown monai:vit --backbone-opt 'num_classes' (did you mean 'num_layers'?); choose from: {VIT_CHOICES}"),
    ("vit", {"patch_size": 0}, "monai:vit --backbone-opt patch_size must be a positive integer; got 0"),
    ("vit", {"hidden_size": "wide"}, "monai:vit --backbone-opt hidden_size must be a positive integer; got 'wide'"),
])
def test_an_option_the_family_does_not_use_is_named_with_the_backbone(model, option, message):
    with pytest.raises(UsageError) as info:
        create_backbone(f"monai:{model}", 1, (16, 16, 16), **option)
    assert str(info.value) == message


def test_options_the_family_uses_still_build():
    resnet = create_backbone("monai:resnet10", 1, (16, 16, 16), widen_factor=0.5, no_max_pool=True)
    assert resnet.num_features == 256 and resnet(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 256)
    vit = create_backbone("monai:vit", 1, (16, 16, 16), qkv_bias=True, **TINY)
    assert vit.model.blocks[0].attn.qkv.bias is not None and vit(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 48)


# ---------------------------------------------------------------- --init at another volume size


def test_init_from_another_volume_size_names_the_volume_size(tmp_path):
    """It said "--backbone names the architecture", though the architecture was the same."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    made = create_backbone("monai:vit", 1, (16, 16, 16), **TINY)
    weights = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in made.state_dict().items()}, weights)
    other = create_backbone("monai:vit", 1, (16, 16, 8), **TINY)
    with pytest.raises(UsageError) as info:
        load_init(str(weights), other)
    assert str(info.value) == (
        "--init weights hold 3D position embeddings for 8 cubes and this backbone's 2x2x1 cube grid has 4; 3D "
        "position embeddings are not resampled: give the --volume-size (and --backbone-opt patch_size) of the run "
        "the weights were made by")
    same = create_backbone("monai:vit", 1, (16, 16, 16), **TINY)
    record = load_init(str(weights), same)
    assert record["adapted"] == [] and record["missing"] == [] and record["loaded"] == len(made.state_dict())
    for key, value in made.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key


def test_init_at_another_volume_size_through_the_cli(tmp_path, cli):
    data = write_volumes(tmp_path / "nii")
    opts = [a for k, v in TINY.items() for a in ("--backbone-opt", f"{k}={v}")]
    base = ["pretrain", "--task", "mae", "--backbone", "monai:vit", *opts, "--data", f"nifti:{data}", "--sample",
            "volume", "--max-steps", 1, "--batch-size", 2, "--device", "cpu", "--quiet"]
    assert cli(*base, "--volume-size", "16,16,16", "--out", tmp_path / "a").exit_code == 0
    result = cli(*base, "--volume-size", "16,16,8", "--out", tmp_path / "b", "--init", tmp_path / "a")
    message = one_line_error(result)
    assert "--init weights hold 3D position embeddings for 8 cubes" in message and "--volume-size" in message
    assert "--backbone names the architecture" not in message and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- data inspect --sample volume


def inspect_json(cli, data: Path, *extra: str) -> dict:
    result = cli("data", "inspect", f"nifti:{data}", "--sample", "volume", "--volume-size", "16,16,16", "--json",
                 *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_counts_the_volumes_of_a_4d_file_and_sizes_from_the_header(tmp_path, cli):
    """It said "3 of 3 volumes decode" having decoded the first volume of each file (5 in all), and
    "unknown at full resolution": the source gave no size."""
    data = write_volumes(tmp_path / "nii", four_d=True)
    report = inspect_json(cli, data)
    assert (report["images"], report["files"], report["decoded_ok"]) == (5, 3, 3)
    assert report["decode_checked"] == {"of": 3, "what": "files"}
    assert report["counts"]["size"] == {"20x18": 2, "10x10": 1}
    assert report["counts"]["depth"] == {"12": 2, "6": 1} and report["counts"]["time_points"] == {"1": 2, "3": 1}
    full = 2 * 20 * 18 * 12 * 4 + 3 * 10 * 10 * 6 * 4  # every volume as float32, as stored
    assert report["estimated_bytes"]["decoded_full_resolution_float32"] == full
    every = inspect_json(cli, data, "--every-sample")
    assert every["decoded_ok"] == 5 and every["decode_checked"] == {"of": 5, "what": "volumes"}
    text = cli("data", "inspect", f"nifti:{data}", "--sample", "volume", "--volume-size", "16,16,16").stdout
    assert "decode check: 3 of 3 files decode (the first volume of each; --every-sample decodes all 5)" in text
    assert "; 40.8 KiB at full resolution (float32)" in text, text  # 41,760 bytes
    text = cli("data", "inspect", f"nifti:{data}", "--sample", "volume", "--volume-size", "16,16,16",
               "--every-sample").stdout
    assert "decode check: 5 of 5 volumes decode\n" in text, text


def test_inspect_of_3d_files_checks_every_volume(tmp_path, cli):
    report = inspect_json(cli, write_volumes(tmp_path / "nii"))
    assert report["decoded_ok"] == 2 and report["decode_checked"] == {"of": 2, "what": "volumes"}


def test_the_size_is_that_of_the_slices_as_loaded_and_reads_no_voxel(tmp_path, monkeypatch):
    """Stored with x and y swapped (first array axis anterior-posterior): the size is W x H of the
    loaded, RAS+ slice, taken from the header at index time."""
    data = np.arange(18 * 20 * 4, dtype=np.int16).reshape(18, 20, 4)  # array axes: (y, x, z)
    affine = np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "swapped.nii")
    from nibabel.arrayproxy import ArrayProxy

    read = []
    for name in ("__array__", "__getitem__"):
        original = getattr(ArrayProxy, name)
        monkeypatch.setattr(ArrayProxy, name, lambda self, *a, _o=original, **k: read.append(self) or _o(self, *a, **k))
    src = create_source(f"nifti:{tmp_path / 'swapped.nii'}")
    refs = src.index()
    assert [src.properties(r) for r in refs[:1]] == [{"size": "20x18", "depth": 4, "time_points": 1}]
    assert not read
    assert src.load(refs[0]).shape == (1, 18, 20)  # (1, H, W)
