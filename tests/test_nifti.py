"""The ``nifti`` source: canonical axes, header scaling, the three sample modes, user errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslkit.errors import UsageError
from sslkit.pseudonym import file_key
from sslkit.registry import create_source

X, Y, Z = 5, 4, 3


def grid() -> np.ndarray:
    """``data[x, y, z] = 100 z + 10 y + x`` (hand-checkable)."""
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    return (100 * z + 10 * y + x).astype(np.int16)


def displayed(data: np.ndarray) -> np.ndarray:
    """RAS+ ``(x, y, z)`` -> ``(D, H, W)``: z up, y anterior to posterior, x right to left."""
    return data.transpose(2, 1, 0)[:, ::-1, ::-1].astype(np.float32)


def write(path: Path, data: np.ndarray, zooms=(2.0, 3.0, 4.0), flip_xy: bool = False, slope: float = 1.0) -> Path:
    affine = np.diag([*zooms, 1.0])
    if flip_xy:  # stored LPS-like: x and y axes reversed, same anatomy
        affine[0, 0], affine[1, 1] = -zooms[0], -zooms[1]
        affine[0, 3], affine[1, 3] = (X - 1) * zooms[0], (Y - 1) * zooms[1]
        data = data[::-1, ::-1]
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_slope_inter(slope, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def test_volume_mode_is_canonical_and_hand_checkable(tmp_path):
    write(tmp_path / "ras.nii.gz", grid())
    write(tmp_path / "lps.nii", grid(), flip_xy=True)
    for name in ("ras.nii.gz", "lps.nii"):
        src = create_source(f"nifti:{tmp_path / name}", sample="volume", volume_size=f"{Z},{Y},{X}")
        refs = src.index()
        assert len(refs) == 1
        np.testing.assert_array_equal(src.load_raw(refs[0])[0], displayed(grid()))
        x = src.load(refs[0])
        np.testing.assert_allclose(x[0], displayed(grid()) / 234.0, atol=1e-6)  # min-max over the volume (0..234)


def test_header_scaling_reaches_raw_values(tmp_path):
    write(tmp_path / "a.nii", grid(), slope=2.0)
    src = create_source(f"nifti:{tmp_path / 'a.nii'}", sample="volume", volume_size=f"{Z},{Y},{X}")
    np.testing.assert_array_equal(src.load_raw(src.index()[0])[0], 2 * displayed(grid()))


def test_slice_and_slab_modes(tmp_path):
    write(tmp_path / "d" / "a.nii.gz", grid())
    src = create_source(f"nifti:{tmp_path / 'd'}", window="400,200")  # (v - 200) / 400 + 0.5 = v / 400
    refs = src.index()
    assert len(refs) == Z and src.load(refs[1]).shape == (1, Y, X)
    np.testing.assert_allclose(src.load(refs[1])[0], displayed(grid())[1] / 400.0, atol=1e-6)
    src = create_source(f"nifti:{tmp_path / 'd'}", window="400,200", sample="slab:3")
    refs = src.index()
    assert src.channels_of(refs[0]) == 3
    np.testing.assert_allclose(src.load(refs[0]), displayed(grid())[[0, 0, 1]] / 400.0, atol=1e-6)
    np.testing.assert_allclose(src.load(refs[2]), displayed(grid())[[1, 2, 2]] / 400.0, atol=1e-6)


def test_volume_mode_resamples_to_the_spacing(tmp_path):
    write(tmp_path / "a.nii", grid())  # 5 x 4 x 3 voxels of 2 x 3 x 4 mm: 10 x 12 x 12 mm
    src = create_source(f"nifti:{tmp_path / 'a.nii'}", sample="volume", spacing="1,2,6", volume_size="2,6,10")
    assert src.load(src.index()[0]).shape == (1, 2, 6, 10)
    assert src.describe()["spacing_mm"] == [6.0, 2.0, 1.0]


def test_4d_image_is_one_volume_per_time_point(tmp_path):
    data = np.stack([grid(), grid() + 1000], axis=-1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "t.nii")
    src = create_source(f"nifti:{tmp_path / 't.nii'}", sample="volume", volume_size=f"{Z},{Y},{X}")
    refs = src.index()
    assert len(refs) == 2
    np.testing.assert_array_equal(src.load_raw(refs[1])[0], displayed(grid()) + 1000)


def test_bad_options_are_usage_errors(tmp_path):
    write(tmp_path / "a.nii", grid())
    with pytest.raises(UsageError, match="slab:K"):
        create_source(f"nifti:{tmp_path / 'a.nii'}", sample="slab:2")
    with pytest.raises(UsageError, match="--volume-size"):
        create_source(f"nifti:{tmp_path / 'a.nii'}", sample="volume")
    with pytest.raises(UsageError, match="window"):
        create_source(f"nifti:{tmp_path / 'a.nii'}", window="wide")


def test_cli_refuses_a_bad_sample_mode_in_one_line(tmp_path, cli):
    write(tmp_path / "a.nii", grid())
    proc = cli("pretrain", "--task", "simclr", "--data", f"nifti:{tmp_path / 'a.nii'}", "--out", tmp_path / "run",
               "--data-opt", "sample=cube", "--max-steps", 1)
    assert proc.exit_code == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "slab:K" in proc.stderr and not (tmp_path / "run").exists()


def test_index_reads_headers_only_and_agrees_with_the_canonical_image(tmp_path):
    from sslkit_plugins.sources.nifti import canonical_geometry

    data = np.zeros((5, 4, 3), np.int16)
    affine = np.array([[0, 0, 4.0, 0], [-2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])  # axes permuted, one flipped
    img = nib.Nifti1Image(data, affine)
    canon = nib.as_closest_canonical(img)
    shape, zooms = canonical_geometry(img)
    assert shape == canon.shape and zooms == tuple(float(z) for z in canon.header.get_zooms())


def crafted(path: Path, shape: tuple[int, ...], payload: int, gz: bool = False) -> Path:
    """A NIfTI header declaring ``shape`` (int16) followed by only ``payload`` zero bytes."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * (352 - len(header.binaryblock) + payload)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_a_header_the_file_cannot_hold_is_skipped_at_index_before_any_voxel_is_read(tmp_path, monkeypatch):
    """A 1 KB file declaring gigabytes (a crafted header, or a truncated copy) is named with the
    reason and skipped from the header and the file size; nothing tries to allocate its voxels."""
    write(tmp_path / "ok.nii.gz", grid())
    crafted(tmp_path / "bomb.nii", (512, 512, 20000), 1000)
    crafted(tmp_path / "bomb.nii.gz", (512, 512, 20000), 100_000, gz=True)
    good = write(tmp_path / "whole.nii", grid())
    (tmp_path / "cut.nii").write_bytes(good.read_bytes()[:-10])  # a copy cut short by 10 bytes
    from nibabel.arrayproxy import ArrayProxy

    read = []
    for name in ("__array__", "__getitem__"):  # every way nibabel reads voxels from a file
        original = getattr(ArrayProxy, name)
        monkeypatch.setattr(ArrayProxy, name, lambda self, *a, _o=original, **k: read.append(self) or _o(self, *a, **k))
    src = create_source(f"nifti:{tmp_path}")
    refs = src.index()
    assert not read and sorted({r.path for r in refs}) == [str(tmp_path / "ok.nii.gz"), str(good)]
    why = {Path(p).name: reason for p, reason in src.skipped}
    assert set(why) == {"bomb.nii", "bomb.nii.gz", "cut.nii"}
    assert why["bomb.nii"] == ("truncated: the header declares 10,485,760,000 bytes of voxels (512x512x20000) "
                               "from byte 352; the file has 1,352")
    assert why["cut.nii"].startswith("truncated: the header declares 120 bytes of voxels (5x4x3)")
    size = (tmp_path / "bomb.nii.gz").stat().st_size
    assert why["bomb.nii.gz"] == ("the header declares 10,485,760,000 bytes of voxels (512x512x20000); a "
                                  f"{size:,}-byte gzip file expands to at most {size * 1032:,}")


def test_slices_over_max_pixels_are_skipped_from_the_header(tmp_path, cli):
    write(tmp_path / "ok.nii.gz", grid())
    crafted(tmp_path / "wide.nii", (3000, 3000, 2), 3000 * 3000 * 2 * 2)  # holds its voxels: only too wide
    crafted(tmp_path / "bomb.nii", (512, 512, 20000), 1000)  # a crafted header: named through the CLI too
    r = cli("data", "inspect", f"nifti:{tmp_path}", "--max-pixels", "1000000", "--json")
    assert r.exit_code == 0, r.output
    assert "bomb.nii" in r.output and "truncated: the header declares 10,485,760,000 bytes of voxels" in r.output
    assert "wide.nii" in r.output
    assert "too many pixels: 3000x3000 = 9,000,000 exceeds the limit of 1,000,000" in r.output
    r = cli("data", "inspect", f"nifti:{tmp_path}", "--max-pixels", "0", "--json")
    assert r.exit_code == 0 and "too many pixels" not in r.output


def test_dump_meta_states_the_canonical_orientation_the_arrays_have(tmp_path, cli):
    """Slices and volumes of a file stored LPS-like are dumped turned to RAS+; ``__meta__`` says so, not 'as stored'."""
    import json

    write(tmp_path / "lps.nii", grid(), flip_xy=True)
    for mode, extra in (("slice", ()), ("volume", ("--volume-size", f"{Z},{Y},{X}"))):
        out = tmp_path / f"{mode}.npz"
        r = cli("data", "dump", f"nifti:{tmp_path / 'lps.nii'}", "--out", out, "--raw", "--sample", mode, *extra)
        assert r.exit_code == 0, r.output
        z = np.load(out)
        first = z[file_key("lps.nii") + "#0"][0] if mode == "slice" else z[file_key("lps.nii")][0]
        np.testing.assert_array_equal(first, displayed(grid())[0] if mode == "slice" else displayed(grid()))
        orientation = json.loads(str(z["__meta__"]))["orientation"]
        assert "as stored (" not in orientation and "canonical RAS+" in orientation, orientation
        assert "H anterior to posterior, W right to left" in orientation
        assert ("D inferior to superior" in orientation) == (mode == "volume")


def test_a_volume_runs_input_spec_and_export_state_the_canonical_layout(tmp_path):
    """The audit's case: the spec (and so an export's metadata) gave DICOM's 'H: image rows, W: image
    columns' for NIfTI volumes, which are turned to RAS+ (H and W flipped against the stored axes)."""
    from sslkit.api import ORIENTATION
    from sslkit.raw_input import VOLUME_STEPS
    from sslkit.spec import InputSpec

    write(tmp_path / "lps.nii", grid(), flip_xy=True)
    src = create_source(f"nifti:{tmp_path / 'lps.nii'}", sample="volume", volume_size=f"{Z},{Y},{X}")
    spec = InputSpec(1, 224, (0.5,), (0.25,), "nifti", src.describe())
    assert "canonical RAS+" in spec.orientation and "D inferior to superior" in spec.orientation
    assert "input.orientation" in VOLUME_STEPS and "RAS+" in VOLUME_STEPS and spec.orientation != ORIENTATION


def test_the_first_folder_below_the_root_is_the_class_however_deep_the_file(tmp_path):
    """``<class>/<patient>/scan.nii.gz``: the label is the class, never the patient's folder (as image folders)."""
    write(tmp_path / "d" / "tumour" / "patient7" / "scan.nii.gz", grid())
    write(tmp_path / "d" / "healthy" / "b.nii", grid())
    write(tmp_path / "d" / "root.nii", grid())
    src = create_source(f"nifti:{tmp_path / 'd'}", sample="volume", volume_size=f"{Z},{Y},{X}")
    labels = {Path(r.path).name: r.label for r in src.index()}
    assert labels == {"scan.nii.gz": "tumour", "b.nii": "healthy", "root.nii": None}
