"""Volume runs in `sslkit eval` and `sslkit embed`: fine-tuning a 3D encoder, `eval attention` refused in
one line, and the sample mode (`--sample`, `--volume-size`) carried to or checked against data of another
volumetric source before any decoding."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sslkit.augment import Normalize
from sslkit.eval.finetune import augment
from sslkit.spec import InputSpec
from tests.conftest import make_images, tiny_run
from tests.test_series import write_slice


VOLUME_FLAGS = "--sample volume --volume-size 16,16,16"


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def write_nifti(root: Path) -> Path:
    """Three 20x18x12 int16 volumes in each of the class folders a and b."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            data = rng.normal(0, 100, (20, 18, 12)).astype(np.int16)
            nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.2, 2.5, 1.0])), root / name / f"vol{i}.nii.gz")
    return root


def write_dicom(root: Path) -> Path:
    """Two axial CT series of 6 slices (12x12 px) in each of the class folders healthy and sick."""
    rng = np.random.default_rng(1)
    for name in ("healthy", "sick"):
        for s in range(2):
            uid = f"1.2.826.0.1.3680043.8.498.{len(name)}{s}"
            for k in range(6):
                px = rng.integers(0, 2000, (12, 12)).astype(np.uint16)
                write_slice(root / name / f"s{s}" / f"{k}.dcm", px, uid, (0, 0, 2.0 * k), instance=k + 1)
    return root


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory) -> dict[str, Path]:
    """A one-step SimCLR run of monai:resnet10 on 16x16x16 NIfTI volumes, and DICOM series beside it."""
    from click.testing import CliRunner

    from sslkit.cli import main

    root = tmp_path_factory.mktemp("volrun")
    nii, dcm = write_nifti(root / "nii"), write_dicom(root / "dcm")
    args = ["pretrain", "--task", "simclr", "--backbone", "monai:resnet10", "--data", f"nifti:{nii}",
            *VOLUME_FLAGS.split(), "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--quiet",
            "--out", str(root / "run")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"root": root, "nii": nii, "dcm": dcm, "run": root / "run"}


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if embed reaches the data path (refusals come before any decoding)."""
    import sslkit.embed

    def refuse(*args, **kwargs):
        raise AssertionError("data was decoded")

    monkeypatch.setattr(sslkit.embed, "load_data", refuse)


# ---------------------------------------------------------------- fine-tuning a volume run


def test_volume_run_fine_tunes_over_group_folds(volume_run, cli):
    result = cli("eval", "linear", volume_run["run"], "--data", f"nifti:{volume_run['nii']}", "--split", "group:3",
                 "--finetune", "--finetune-epochs", 1, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    for enc in ("pretrained", "random"):
        ft = report["results"][enc]["finetune"]
        top1 = [fold["top1"] for fold in ft["folds"]]
        assert ft["epochs"] == 1 and len(top1) == 3 and [f["n"] for f in ft["folds"]] == [2, 2, 2], ft
        assert all(np.isfinite(v) and 0 <= v <= 1 for v in top1)
        assert ft["top1"] == pytest.approx(np.mean(top1)) and np.isfinite(ft["auroc"])


def test_volume_augment_crops_back_to_the_size_and_flips_left_right_only():
    """A ramp along D, H and W: after the 3D crop (volume fraction 0.5-1) and flip, D and H stay
    ascending in every sample; W is descending in some samples (flipped) and ascending in others."""
    d, h, w = 8, 6, 10
    ramp = (torch.arange(d).view(d, 1, 1) * 100 + torch.arange(h).view(1, h, 1) * 10
            + torch.arange(w).view(1, 1, w)).float() / 1000
    x = ramp.expand(64, 1, d, h, w).contiguous()
    torch.manual_seed(0)
    y = augment(x, InputSpec(1, 224, (0.5,), (0.25,), sample="volume", volume_size=(d, h, w)))
    assert y.shape == x.shape
    assert (y.diff(dim=2) >= -1e-6).all() and (y.diff(dim=3) >= -1e-6).all()
    along_w = y.diff(dim=4).mean((1, 2, 3, 4))
    assert 10 < int((along_w < 0).sum()) < 54 and int((along_w > 0).sum()) == 64 - int((along_w < 0).sum())
    # a volume fraction >= 0.5 stretched by 3/4..4/3: each crop spans >= 0.5^(1/3) * (3/4)^(4/3) = 0.54 of an
    # axis, so its first to last W voxel covers > 4.8 of the ramp's 9 steps of 0.001 (> 3)
    assert float((y[..., -1] - y[..., 0]).abs().amin()) > 0.003


def test_normalize_acts_per_channel_on_volumes_and_images():
    """One per-channel normaliser for images and volumes (it lined channels up with D on 5-D batches)."""
    norm = Normalize((0.1, 0.2), (0.5, 0.25))
    out = norm(torch.zeros(1, 2, 2, 3, 4))
    assert torch.allclose(out[:, 0], torch.full((1, 2, 3, 4), -0.2))
    assert torch.allclose(out[:, 1], torch.full((1, 2, 3, 4), -0.8))
    assert torch.equal(norm(torch.zeros(1, 2, 3, 4)), out[:, :, 0])


# ---------------------------------------------------------------- eval attention


def test_attention_on_a_volume_run_is_refused_in_one_line(volume_run, cli, tmp_path):
    out = tmp_path / "a.png"
    result = cli("eval", "attention", volume_run["run"], "--data", f"nifti:{volume_run['nii']}", "--out", out)
    assert one_line_error(result) == (
        f"error: sslkit eval attention draws maps for 2D image encoders; {str(volume_run['run'])!r} is a volume run "
        f"(sample=volume, a 3D encoder): try sslkit eval linear, knn or tsne on it instead")
    assert not out.exists() and not list((volume_run["run"] / "eval").glob("attention-*"))


# ---------------------------------------------------------------- the sample mode across sources


def test_volume_run_embeds_dicom_series_with_its_sample_mode(volume_run, cli, tmp_path):
    """The run's --sample volume --volume-size 16,16,16 (nifti) carry to dicom: one 16^3 volume per series."""
    out = tmp_path / "e.npz"
    result = cli("embed", volume_run["run"], "--data", f"dicom:{volume_run['dcm']}", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "embedded 4 images (512-d, torch)" in result.stdout
    saved = np.load(out)
    assert saved["embeddings"].shape == (4, 512) and np.isfinite(saved["embeddings"]).all()
    assert sorted(saved["labels"]) == ["healthy", "healthy", "sick", "sick"]
    assert all(i.startswith("series:") for i in saved["ids"])


@pytest.mark.parametrize("opts, asked", [(["--sample", "slice"], "--sample slice"),
                                         (["--volume-size", "8,8,8"], "--sample volume --volume-size 8,8,8"),
                                         (["--sample", "slab:3"], "--sample slab:3")])
def test_other_sample_mode_is_refused_before_decoding(volume_run, cli, tmp_path, no_decoding, opts, asked):
    out = tmp_path / "e.npz"
    for data in (f"dicom:{volume_run['dcm']}", f"nifti:{volume_run['nii']}"):
        result = cli("embed", volume_run["run"], "--data", data, "--out", out, *opts)
        assert one_line_error(result) == (
            f"error: the model takes samples made with {VOLUME_FLAGS}, these source options ask for {asked}; "
            f"pass the model's ({VOLUME_FLAGS}) or leave them unset")
    assert not out.exists()


def test_volume_run_on_2d_images_is_refused_before_decoding(volume_run, cli, tmp_path, no_decoding):
    images = make_images(tmp_path / "img", n_per_class=2, size=20, channels=1)
    result = cli("embed", volume_run["run"], "--data", f"folder:{images}", "--out", tmp_path / "e.npz")
    assert one_line_error(result) == (
        f"error: the model takes samples made with {VOLUME_FLAGS}, and source 'folder' makes 2D images only; "
        f"give data of a source that takes {VOLUME_FLAGS}")


def test_eval_shares_the_check(volume_run, cli):
    result = cli("eval", "knn", volume_run["run"], "--data", f"dicom:{volume_run['dcm']}", "--volume-size", "8")
    assert one_line_error(result) == (
        f"error: the model takes samples made with {VOLUME_FLAGS}, these source options ask for --sample volume "
        f"--volume-size 8,8,8; pass the model's ({VOLUME_FLAGS}) or leave them unset")


def test_2d_run_on_volumes_is_refused_before_decoding(volume_run, cli, tmp_path, no_decoding):
    images = make_images(tmp_path / "img", n_per_class=2, size=20, channels=1)
    run = tiny_run(f"folder:{images}", tmp_path / "run2d")
    result = cli("embed", run, "--data", f"nifti:{volume_run['nii']}", "--out", tmp_path / "e.npz",
                 "--sample", "volume", "--volume-size", "8,8,8")
    assert one_line_error(result) == (
        "error: the model takes samples made with --sample slice, these source options ask for --sample volume "
        "--volume-size 8,8,8; pass the model's (--sample slice) or leave them unset")
