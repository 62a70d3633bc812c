"""DICOM series assembly: spatial order, gaps, duplicates, tilt, mosaics, enhanced multi-frame.

Every series here is written with pydicom, slice by slice, with pixel values that say
where they come from (``100 * slice + column``), so each expected volume is checked by hand.
"""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from sslkit.pseudonym import file_key
from sslkit.registry import create_source
from sslkit_plugins.sources.dicom_series import (assemble, check_spacing, cut_mosaic, gantry_tilt, order_slices,
                                                 slice_normal)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
WINDOW = "1000,500"  # W 1000, L 500 (LINEAR_EXACT): stored value v -> v / 1000


def _base(sop_class: str, pixels: np.ndarray, series_uid: str, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "P1", "1.2.3", series_uid
    ds.Modality = "CT" if sop_class != MR_STORAGE else "MR"
    ds.set_pixel_data(np.ascontiguousarray(pixels, dtype=np.uint16), "MONOCHROME2", 16, generate_instance_uid=False)
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def write_slice(path: Path, pixels: np.ndarray, series_uid: str, position, orientation=AXIAL,
                spacing=(0.5, 0.5), instance: int = 1) -> Path:
    """One single-frame CT slice with its geometry."""
    ds = _base(CT_STORAGE, pixels, series_uid, ImagePositionPatient=[float(v) for v in position],
               ImageOrientationPatient=list(orientation), PixelSpacing=list(spacing), InstanceNumber=instance,
               SliceThickness=2.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def slice_pixels(k: int, rows: int = 6, cols: int = 5) -> np.ndarray:
    """Slice ``k``: value ``100 * k + column`` (hand-checkable)."""
    return np.tile(100 * k + np.arange(cols, dtype=np.uint16), (rows, 1))


def write_series(folder: Path, n: int = 5, step: float = 2.5, orientation=AXIAL, skip=(), seed: int = 0,
                 shift=(0.0, 0.0, 0.0)) -> list[Path]:
    """``n`` slices ``k * step`` apart along the normal; files and instance numbers shuffled."""
    uid = generate_uid()
    normal = slice_normal(orientation)
    ks = [k for k in range(n) if k not in skip]
    names = list(range(len(ks)))
    random.Random(seed).shuffle(names)
    out = []
    for k, name in zip(ks, names):
        pos = np.array([10.0, -20.0, 30.0]) + k * step * normal + k * np.array(shift)
        out.append(write_slice(folder / f"f{name:03d}.dcm", slice_pixels(k), uid, pos, orientation, instance=name + 1))
    return out


def volume_source(folder: Path, **opts):
    src = create_source(f"dicom:{folder}", workers=1, window=WINDOW, **opts)
    return src, src.index()


# ---------------------------------------------------------------- pure geometry


def test_order_and_spacing_checks_by_hand():
    order, d = order_slices(np.array([[0, 0, 5.0], [0, 0, 0.0], [0, 0, 2.5]]), AXIAL)
    assert list(order) == [1, 2, 0] and list(d) == [0.0, 2.5, 5.0]
    report = check_spacing(np.array([0.0, 2.5, 5.0, 12.5, 15.0]))  # 7.5 and 10 are missing
    assert report.step == 2.5 and report.missing == 2 and not report.non_uniform and not report.duplicates
    report = check_spacing(np.array([0.0, 2.5, 2.5, 5.0]))
    assert report.duplicates == [2] and report.missing == 0
    assert check_spacing(np.array([0.0, 2.5, 5.0, 8.0, 10.5])).non_uniform


def test_gantry_tilt_angle():
    # slices stepping 1 mm along y for every 1 mm along z: a 45 degree tilt
    positions = np.array([[0, k, k] for k in range(4)], float)
    assert gantry_tilt(positions, AXIAL) == pytest.approx(45.0)
    assert gantry_tilt(np.array([[0, 0, k] for k in range(4)], float), AXIAL) == 0.0


def test_cut_mosaic_row_major():
    tiles = np.arange(7 * 2 * 3).reshape(7, 2, 3)
    mosaic = np.zeros((6, 9), int)  # 3 x 3 grid of 2 x 3 tiles, the last two empty
    for i in range(7):
        r, c = divmod(i, 3)
        mosaic[r * 2 : r * 2 + 2, c * 3 : c * 3 + 3] = tiles[i]
    np.testing.assert_array_equal(cut_mosaic(mosaic, 7), tiles)
    assert cut_mosaic(mosaic, -9, (2, 3)).shape == (9, 2, 3)


# ---------------------------------------------------------------- series through the source


def expected_volume(ks) -> np.ndarray:
    return np.stack([slice_pixels(k) for k in ks])[None].astype(np.float32) / 1000.0


def test_shuffled_files_give_the_same_ordered_volume(tmp_path):
    write_series(tmp_path / "a", seed=1)
    write_series(tmp_path / "b", seed=2)
    vols = []
    for name in ("a", "b"):
        src, refs = volume_source(tmp_path / name, sample="volume", volume_size="5,6,5")
        assert len(refs) == 1
        vols.append(src.load(refs[0]))
        assert src.sampler.volume_of(refs[0]).spacing == (2.5, 0.5, 0.5)
        assert src.sampler.volume_of(refs[0]).issues == []
    np.testing.assert_allclose(vols[0], expected_volume(range(5)), atol=1e-6)
    np.testing.assert_array_equal(vols[0], vols[1])


def test_missing_slice_is_reported(tmp_path):
    write_series(tmp_path, n=6, skip=(3,))
    src, refs = volume_source(tmp_path, sample="volume", volume_size="5,6,5")
    vol = src.sampler.volume_of(refs[0])
    assert vol.depth == 5 and vol.spacing[0] == 2.5
    assert any("1 missing slices" in issue for issue in vol.issues)
    assert "missing" in src.properties(refs[0])["volume_issues"]


def test_duplicate_positions_kept_once_and_reported(tmp_path):
    paths = write_series(tmp_path, n=3)
    uid = str(__import__("pydicom").dcmread(paths[0]).SeriesInstanceUID)
    write_slice(tmp_path / "dup.dcm", slice_pixels(9), uid, [10.0, -20.0, 30.0], instance=99)
    src, refs = volume_source(tmp_path, sample="volume", volume_size="3,6,5")
    vol = src.sampler.volume_of(refs[0])
    assert vol.depth == 3 and any("duplicate" in i for i in vol.issues)
    # the file left out is named, with the one used in its place by its key ("dup.dcm" sorts before "f00N.dcm")
    first = next(p for p in paths if __import__("pydicom").dcmread(p).ImagePositionPatient[2] == 30.0)
    assert [(Path(f).name, r) for f, r in src.skipped] == [
        (first.name, f"slice position repeated in its series: {file_key('dup.dcm')}'s is used")]
    assert str(tmp_path / "dup.dcm") in [s[0] for s in vol.slices]
    src, refs = volume_source(tmp_path, sample="slab:3")
    assert len(refs) == 3 and [Path(f).name for f, _ in src.skipped] == [first.name]


def test_oblique_series_orders_along_its_normal_and_tilt_is_reported(tmp_path):
    a = math.radians(30)
    oblique = (1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a))
    write_series(tmp_path / "oblique", orientation=oblique, seed=3)
    src, refs = volume_source(tmp_path / "oblique", sample="volume", volume_size="5,6,5")
    np.testing.assert_allclose(src.load(refs[0]), expected_volume(range(5)), atol=1e-6)
    assert src.sampler.volume_of(refs[0]).issues == []
    # stepping 2.5 mm along y per slice on top of the normal step: tilt atan(2.5 / 2.5) = 45 degrees
    write_series(tmp_path / "tilted", shift=(0.0, 2.5, 0.0))
    src, refs = volume_source(tmp_path / "tilted", sample="volume", volume_size="5,6,5")
    assert any("gantry tilt 45.0" in i for i in src.sampler.volume_of(refs[0]).issues)


def test_mixed_series_is_split_and_reported(tmp_path):
    paths = write_series(tmp_path, n=3)
    uid = str(__import__("pydicom").dcmread(paths[0]).SeriesInstanceUID)
    for k in range(2):
        write_slice(tmp_path / f"big{k}.dcm", np.zeros((8, 8), np.uint16), uid, [0, 0, 50.0 + k])
    src, refs = volume_source(tmp_path, sample="volume", volume_size="3,6,5")
    vols = [src.sampler.volume_of(r) for r in refs]
    assert sorted(v.depth for v in vols) == [2, 3]
    assert all(any("split into 2 volumes" in i for i in v.issues) for v in vols)


def test_slab_mode_stacks_neighbours_edge_padded(tmp_path):
    write_series(tmp_path, n=4, seed=5)
    src, refs = volume_source(tmp_path, sample="slab:3")
    assert len(refs) == 4 and src.channels_of(refs[0]) == 3
    slabs = [src.load(r) for r in refs]
    expected = [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    for slab, ks in zip(slabs, expected):
        np.testing.assert_allclose(slab, expected_volume(ks)[0], atol=1e-6)
    assert src.describe()["sample"] == "slab:3"


def test_volume_mode_resamples_to_spacing(tmp_path):
    write_series(tmp_path, n=4)  # 4 x 6 x 5 voxels of 2.5 x 0.5 x 0.5 mm
    src, refs = volume_source(tmp_path, sample="volume", spacing="1,1,5", volume_size="2,3,3")
    x = src.load(refs[0])
    assert x.shape == (1, 2, 3, 3)  # z 10 mm / 5, y 3 mm / 1, x 2.5 mm / 1 -> 2 x 3 x 2 (padded to 3)
    assert src.describe()["spacing_mm"] == [5.0, 1.0, 1.0]


def test_radiograph_is_not_a_volume(tmp_path):
    from tests.dicom_factory import write_dicom

    write_dicom(tmp_path / "cr.dcm", np.zeros((8, 8), np.uint16))
    write_series(tmp_path / "ct", n=3)
    src, refs = volume_source(tmp_path, sample="volume", volume_size="3,6,5")
    assert len(refs) == 1 and any("no slice geometry" in r for _, r in src.skipped)
    src, refs = volume_source(tmp_path, sample="slab:3")
    assert len(refs) == 4  # in slab mode a 2D image is a slab of itself


# ---------------------------------------------------------------- mosaics


def csa2(tags: dict[str, tuple[str, str]]) -> bytes:
    """A minimal Siemens CSA2 header: ``{name: (vr, text value)}`` (the layout nibabel reads)."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, (vr, value) in tags.items():
        data = value.encode() + b"\0"
        out += struct.pack("<64si4s3i", name.encode(), 1, vr.encode(), 3, 1, 77)
        out += struct.pack("<4i", len(data), len(data), 77, len(data)) + data + b"\0" * (-len(data) % 4)
    return out


def mosaic_pixels(tiles: np.ndarray) -> np.ndarray:
    """``tiles (n, h, w)`` laid row-major on the square grid of ``n`` tiles, as a Siemens mosaic."""
    n, h, w = tiles.shape
    side = math.ceil(math.sqrt(n))
    mosaic = np.zeros((side * h, side * w), np.uint16)
    for i in range(n):
        r, c = divmod(i, side)
        mosaic[r * h : (r + 1) * h, c * w : (c + 1) * w] = tiles[i]
    return mosaic


def write_mosaic(path: Path, tiles: np.ndarray, how: str) -> Path:
    """``tiles (n, h, w)`` on a square grid; the count given by ``how``: private, csa or matrix."""
    n, h, w = tiles.shape
    mosaic = mosaic_pixels(tiles)
    ds = _base(MR_STORAGE, mosaic, generate_uid(), ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"],
               ImagePositionPatient=[0.0, 0.0, 0.0], ImageOrientationPatient=list(AXIAL), PixelSpacing=[3.0, 3.0],
               SliceThickness=4.0, AcquisitionMatrix=[h, 0, 0, w])
    if how == "private":
        ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
        ds.add_new((0x0019, 0x100A), "US", n)
    elif how == "csa":
        ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
        ds.add_new((0x0029, 0x1010), "OB", csa2({"NumberOfImagesInMosaic": ("US", str(n))}))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("how", ["private", "csa"])
def test_mosaic_gives_its_slices_with_the_stored_values(tmp_path, how):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 4000, (7, 4, 5)).astype(np.uint16)
    write_mosaic(tmp_path / "epi.dcm", tiles, how)
    src, refs = volume_source(tmp_path, sample="volume", volume_size="7,4,5")
    vol = src.sampler.volume_of(refs[0])
    assert (vol.depth, vol.rows, vol.columns, vol.spacing) == (7, 4, 5, (4.0, 3.0, 3.0))
    np.testing.assert_array_equal(src.sampler.load(refs[0], raw=True)[0], tiles.astype(np.float32))
    src, refs = volume_source(tmp_path, sample="slab:1")
    assert len(refs) == 7
    np.testing.assert_array_equal(src.sampler.load(refs[3], raw=True)[0], tiles[3].astype(np.float32))


def test_mosaic_without_count_uses_the_acquisition_matrix(tmp_path):
    tiles = np.arange(1, 8 * 4 * 5 + 1).reshape(8, 4, 5).astype(np.uint16)
    write_mosaic(tmp_path / "epi.dcm", tiles, "matrix")
    src, refs = volume_source(tmp_path, sample="volume", volume_size="9,4,5")
    vol = src.sampler.volume_of(refs[0])
    assert vol.depth == 9 and any("every tile" in i for i in vol.issues)
    raw = src.sampler.load(refs[0], raw=True)[0]
    np.testing.assert_array_equal(raw[:8], tiles.astype(np.float32))
    assert not raw[8].any()


# ---------------------------------------------------------------- enhanced multi-frame


def write_enhanced(path: Path, frames: np.ndarray, z: list[float]) -> Path:
    """An enhanced CT file whose frames sit at ``z`` (in any order), orientation shared."""
    ds = _base(ENHANCED_CT, frames, generate_uid(), NumberOfFrames=len(frames))
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = list(AXIAL)
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.7], 2.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for zi in z:
        group, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, float(zi)]
        group.PlanePositionSequence = Sequence([pos])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multiframe_is_one_volume_in_spatial_order(tmp_path):
    z = [4.0, 0.0, 6.0, 2.0]
    frames = np.stack([slice_pixels(int(zi)) for zi in z])
    write_enhanced(tmp_path / "enh.dcm", frames, z)
    src, refs = volume_source(tmp_path, sample="volume", volume_size="4,6,5")
    vol = src.sampler.volume_of(refs[0])
    assert vol.spacing == (2.0, 0.7, 0.7) and vol.issues == []
    np.testing.assert_allclose(src.load(refs[0]), expected_volume([0, 2, 4, 6]), atol=1e-6)


def test_assemble_keeps_no_identifier(tmp_path):
    write_series(tmp_path, n=2)
    src, refs = volume_source(tmp_path, sample="volume", volume_size="2,6,5")
    text = repr(assemble(src.headers)) + repr(src.headers)
    assert "P1" not in text.replace(str(tmp_path), "") and "1.2.3" not in text


def test_editing_any_slice_of_a_volume_changes_its_cache_key(tmp_path):
    import os

    from sslkit.data.cache import cache_key

    paths = write_series(tmp_path, n=4)
    src, refs = volume_source(tmp_path, sample="volume", volume_size="4,6,5")
    before = cache_key(src, refs, 1, (4, 6, 5))
    last = max(paths, key=lambda p: src.sampler.volume_of(refs[0]).slices.index((str(p), None, None)))
    assert str(last) != refs[0].path  # not the file the ref is named after
    st = os.stat(last)
    os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(src, refs, 1, (4, 6, 5)) != before


@pytest.mark.parametrize("shape,spacing,target,size", [
    ((48, 40, 36), (2.5, 0.8, 0.8), (2.0, 2.0, 2.0), (16, 8, 12)),  # crop in-plane, pad along z
    ((9, 16, 20), (1.0, 1.0, 1.0), None, (4, 30, 7)),  # no resampling: crop and pad only
    ((30, 7, 33), (0.5, 3.0, 0.7), (1.0, 1.5, 0.6), (5, 20, 3)),
])
def test_volume_fit_computes_exactly_the_kept_part(shape, spacing, target, size):
    from sslkit.api import SampleMode, crop_or_pad, resample, volume_fit

    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    fit = volume_fit(shape, spacing, SampleMode("volume", 1, target, size))
    whole = crop_or_pad(resample(x, spacing, target), size)
    np.testing.assert_array_equal(fit.apply(x[(slice(None), *fit.region)]), whole)  # bit for bit
    if target is not None and shape[0] * spacing[0] / target[0] > size[0]:
        assert fit.region[0].stop - fit.region[0].start < shape[0]  # fewer slices than the series has


def test_a_cropped_volume_reads_only_its_kept_slices(tmp_path, monkeypatch):
    from sslkit_plugins.sources import dicom_pixels

    write_series(tmp_path, n=30, step=1.0)  # 30 slices 1 mm apart; the sample keeps the middle 6 mm
    src = create_source(f"dicom:{tmp_path}", workers=1, window="4000,2000", sample="volume", spacing="0.5,0.5,1",
                        volume_size="6,12,10")
    refs = src.index()
    read = []
    real = dicom_pixels._pixel_bytes
    monkeypatch.setattr(dicom_pixels, "_pixel_bytes", lambda path, *a: read.append(path) or real(path, *a))
    x = src.load(refs[0])
    assert len(read) == 6 and x.shape == (1, 6, 12, 10)
    ks = np.asarray(x)[0, :, 3, 2] * 40  # the padded 6 x 5 slice's first voxel: 100 * k windowed to k / 40
    assert ks.round().tolist() == [12, 13, 14, 15, 16, 17]  # slices 12..17, in order
