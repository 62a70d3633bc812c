"""NIfTI files that are easy to get wrong: a corrupt gzip stream, an empty dimension, qform and
sform that disagree, class sub-folders of volumes for eval, names that are not UTF-8, and an embed
asked for another volume size than the run's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from sslkit.pseudonym import file_key
from sslkit.registry import create_source
from tests.test_nifti import X, Y, Z, displayed, grid, write


def test_a_corrupt_gzip_stream_is_skipped_with_its_reason_not_trained_on(tmp_path, cli):
    """nibabel reads only the bytes it needs: a damaged stream (here its CRC) in a file larger than
    the header gave whatever voxels came out, trained on; its index (the header) reads fine."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    volume = rng.integers(-1000, 1000, (48, 48, 24)).astype(np.int16)  # ~100 KB compressed: beyond the header
    nib.save(nib.Nifti1Image(volume, np.eye(4)), data / "good.nii.gz")
    damaged = bytearray((data / "good.nii.gz").read_bytes())
    damaged[-8] ^= 0xFF  # the trailer's CRC-32 only: every voxel decompresses, the check fails
    (data / "crc.nii.gz").write_bytes(bytes(damaged))
    args = ("--sample", "volume", "--volume-size", "24,48,48", "--json")
    report = json.loads(cli("data", "inspect", f"nifti:{data}", *args).output)
    assert report["images"] == 2 and report["decoded_ok"] == 1  # both headers read; one stream is bad
    assert [(u["path"], u["reason"].split(":")[0]) for u in report["undecodable"]] == [("crc.nii.gz", "BadGzipFile")]
    src = create_source(f"nifti:{data / 'good.nii.gz'}", sample="volume", volume_size="24,48,48")
    np.testing.assert_array_equal(src.load_raw(src.index()[0])[0], displayed(volume))


def test_an_image_with_an_empty_dimension_is_reported(tmp_path):
    write(tmp_path / "ok.nii", grid())
    for name, shape in (("no-slices.nii", (X, Y, 0)), ("no-time.nii", (X, Y, Z, 0))):
        nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), tmp_path / name)
    src = create_source(f"nifti:{tmp_path}")
    assert len(src.index()) == Z  # the slices of ok.nii
    assert sorted((Path(f).name, why) for f, why in src.skipped) == [
        ("no-slices.nii", f"empty image: shape {X}x{Y}x0"), ("no-time.nii", f"empty image: shape {X}x{Y}x{Z}x0")]


def test_spacing_comes_from_the_affine_whatever_the_orientation(tmp_path):
    """The sform says 1 x 1 x 2 mm, the qform / pixdim 1 x 1 x 5: the voxels are laid out by the sform.
    A file stored RAS used to get 5 mm (pixdim), the same file stored with x and y flipped 2 mm."""
    for name, flip in (("ras.nii", False), ("lps.nii", True)):
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        data = grid()
        if flip:
            affine[0, 0] = affine[1, 1] = -1.0
            data = data[::-1, ::-1]
        img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        img.set_qform(np.diag([1.0, 1.0, 5.0, 1.0]) @ np.diag([-1.0, -1.0, 1.0, 1.0]) if flip else
                      np.diag([1.0, 1.0, 5.0, 1.0]), code=1)
        img.set_sform(affine, code=2)
        nib.save(img, tmp_path / name)
        src = create_source(f"nifti:{tmp_path / name}", sample="volume", volume_size=f"{Z},{Y},{X}")
        ref = src.index()[0]
        assert src.spacing_of(ref) == [2.0, 1.0, 1.0], name
        np.testing.assert_array_equal(src.load_raw(ref)[0], displayed(grid()))


def test_class_sub_folders_of_volumes_label_them_for_eval(tmp_path, cli):
    for split, n, shift in (("train", 3, 0), ("test", 2, 50)):
        for c, offset in (("a", 0), ("b", 500)):
            for i in range(n):
                write(tmp_path / split / c / f"v{i}.nii.gz", grid() + offset + shift + i)
    args = ("--sample", "volume", "--volume-size", "4,8,8")
    r = cli("pretrain", "--task", "simclr", "--data", f"nifti:{tmp_path / 'train'}", "--out", tmp_path / "run",
            "--backbone", "monai:resnet10", "--batch-size", 2, "--max-steps", 1, *args, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("eval", "knn", tmp_path / "run", "--train", f"nifti:{tmp_path / 'train'}", "--test",
            f"nifti:{tmp_path / 'test'}", "--k", 3, "--json", "--quiet", "--no-baseline")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["classes"] == ["a", "b"] and report["class_counts"]["test"] == {"a": 2, "b": 2}
    # the run's volume size is the model's: another one is one line, not a torch traceback
    r = cli("embed", tmp_path / "run", "--data", f"nifti:{tmp_path / 'test'}", "--out", tmp_path / "e.npz",
            "--data-opt", "volume_size=2,4,4", "--quiet")
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: the model takes samples made with --sample volume --volume-size 4,8,8, these source options ask for "
        "--sample volume --volume-size 2,4,4; pass the model's (--sample volume --volume-size 4,8,8) or leave them "
        "unset") and not (tmp_path / "e.npz").exists()  # before decoding: checked on the options


def test_dump_keys_of_names_that_are_not_utf8(tmp_path, cli):
    good = write(tmp_path / "data" / "good.nii", grid())
    shutil.copy(good, os.fsdecode(os.fsencode(tmp_path / "data") + b"/na\xefve.nii"))
    r = cli("data", "dump", f"nifti:{tmp_path / 'data'}", "--out", tmp_path / "d.npz", "--raw", "--ids", "path")
    assert r.exit_code == 0, r.output
    keys = set(np.load(tmp_path / "d.npz").files) - {"__meta__"}
    assert keys == {f"{name}#{z}" for name in ("good.nii", "na\\xefve.nii") for z in range(Z)}
    r = cli("data", "dump", f"nifti:{tmp_path / 'data'}", "--out", tmp_path / "k.npz", "--raw")  # file keys
    assert r.exit_code == 0, r.output
    keys = set(np.load(tmp_path / "k.npz").files) - {"__meta__"}
    assert keys == {f"{file_key(name)}#{z}" for name in ("good.nii", os.fsdecode(b"na\xefve.nii")) for z in range(Z)}


def test_complex_and_all_non_finite_volumes_are_reported_not_trained_on(tmp_path, cli):
    """A complex image lost its imaginary part with a raw numpy warning on stderr, and an all-inf one
    became an all-zero sample: both are reported; NaN voxels in a finite image keep mapping to 0."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(size=(8, 8, 8)).astype(np.float32), np.eye(4)), data / "good.nii")
    nib.save(nib.Nifti1Image((rng.normal(size=(8, 8, 8)) * 1j).astype(np.complex64), np.eye(4)), data / "complex.nii")
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.inf, np.float32), np.eye(4)), data / "allinf.nii")
    r = cli("data", "inspect", f"nifti:{data}", "--sample", "volume", "--volume-size", "8,8,8", "--json")
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output
    report = json.loads(r.stdout)
    assert report["decoded_ok"] == 1 and sorted((u["path"], u["reason"]) for u in report["undecodable"]) == [
        ("allinf.nii", "ValueError: no finite voxel value (all NaN or inf)"),
        ("complex.nii", "ValueError: complex voxel values: not an image (save the magnitude)")]
