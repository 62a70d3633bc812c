"""Multi-echo and dynamic series split per echo / time point; mosaic slices at their own positions.

Pixel values say where they come from (``100 * slice + 1000 * echo (+ column)``) and
positions are hand-computed, so every expected volume is checked by hand.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from sslkit_plugins.sources.dicom_mosaic import mosaic_positions
from tests.test_series import AXIAL, CT_STORAGE, MR_STORAGE, _base, slice_pixels, volume_source


def write_repeated(folder: Path, n: int, **per_volume: list) -> None:
    """``n`` slices 2.5 mm apart for every combination of the given per-volume values, one series.

    ``per_volume``: DICOM keyword -> values (e.g. ``EchoNumbers=[1, 2]``); the pixels of
    slice ``k`` of combination ``c`` are ``slice_pixels(k) + 1000 * c``.
    """
    uid = generate_uid()
    names = list(per_volume)
    combos = [()]
    for name in names:
        combos = [c + (v,) for c in combos for v in per_volume[name]]
    i = 0
    for c, combo in enumerate(combos):
        for k in reversed(range(n)):  # written top-down: order must come from the positions
            ds = _base(CT_STORAGE, slice_pixels(k) + 1000 * c, uid, ImagePositionPatient=[0.0, 0.0, 2.5 * k],
                       ImageOrientationPatient=list(AXIAL), PixelSpacing=[0.5, 0.5], SliceThickness=2.5,
                       InstanceNumber=i + 1, AcquisitionNumber=i + 1)  # a new acquisition number every slice
            for name, value in zip(names, combo):
                setattr(ds, name, value)
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
            i += 1


def raw_volumes(folder: Path, depth: int):
    src, refs = volume_source(folder, sample="volume", volume_size=f"{depth},6,5")
    return src, refs, [src.sampler.load(r, raw=True)[0] for r in refs], [src.sampler.volume_of(r) for r in refs]


def test_two_echo_series_gives_one_volume_per_echo(tmp_path):
    write_repeated(tmp_path, 4, EchoNumbers=[1, 2])
    src, refs, raws, vols = raw_volumes(tmp_path, 4)
    assert len(refs) == 2 and [v.depth for v in vols] == [4, 4]
    for c, (raw, vol) in enumerate(zip(raws, vols)):  # echo 1 then echo 2, slices bottom-up
        np.testing.assert_array_equal(raw, np.stack([slice_pixels(k) + 1000 * c for k in range(4)]))
        assert vol.spacing == (2.5, 0.5, 0.5) and [p[2] for p in vol.positions] == [0.0, 2.5, 5.0, 7.5]
        assert not any("duplicate" in i for i in vol.issues)
        assert vol.issues == [f"echo {c + 1}: one of 2 volumes of a series split by echo (positions repeat)"]
    ids = [src.sample_id(r) for r in refs]
    assert ids[0].endswith(".e1") and ids[1].endswith(".e2") and ids[0][:-3] == ids[1][:-3]
    # the index report says so (sslkit data inspect counts these)
    assert "split by echo" in src.properties(refs[0])["volume_issues"]
    # slab mode: 2 x 4 slabs, each from one echo only
    src, refs = volume_source(tmp_path, sample="slab:3")
    assert len(refs) == 8
    np.testing.assert_array_equal(src.sampler.load(refs[4], raw=True),
                                  np.stack([slice_pixels(k) + 1000 for k in (0, 0, 1)]))


def test_dynamic_multi_echo_series_splits_by_echo_and_time_point(tmp_path):
    write_repeated(tmp_path, 3, EchoNumbers=[1, 2], TemporalPositionIdentifier=[1, 2])
    src, refs, raws, vols = raw_volumes(tmp_path, 3)
    assert len(refs) == 4
    suffixes = [src.sample_id(r).split(".", 1)[1] for r in refs]
    assert suffixes == ["e1.t1", "e1.t2", "e2.t1", "e2.t2"]  # the per-slice AcquisitionNumber is not used
    for c, (raw, vol) in enumerate(zip(raws, vols)):
        np.testing.assert_array_equal(raw, np.stack([slice_pixels(k) + 1000 * c for k in range(3)]))
        assert "split by echo and time point" in vol.issues[0]
    assert vols[1].issues[0].startswith("echo 1, time point 2:")


def test_cardiac_phases_split_by_trigger_time_and_unexplained_repeats_stay_duplicates(tmp_path):
    write_repeated(tmp_path / "cine", 3, TriggerTime=[0.0, 412.5])
    src, refs, raws, vols = raw_volumes(tmp_path / "cine", 3)
    assert [src.sample_id(r).split(".", 1)[1] for r in refs] == ["tt0", "tt412.5"]
    assert vols[1].issues[0].startswith("trigger time 412.5:")
    # repeats that no echo / time fact explains: one volume, duplicates reported as before
    write_repeated(tmp_path / "dup", 3, SeriesDescription=["a", "b"])
    src, refs, raws, vols = raw_volumes(tmp_path / "dup", 3)
    assert len(refs) == 1 and vols[0].depth == 3 and any("3 duplicate" in i for i in vols[0].issues)


# ---------------------------------------------------------------- mosaic positions


def csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A minimal Siemens CSA2 header ``{name: (vr, [item texts])}`` (the layout nibabel reads)."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, (vr, values) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 3, len(values), 77)
        for value in values:
            data = value.encode() + b"\0"
            out += struct.pack("<4i", len(data), len(data), 77, len(data)) + data + b"\0" * (-len(data) % 4)
    return out


def write_mosaic(path: Path, tiles: np.ndarray, orientation, normal=None) -> Path:
    """``tiles (n, 4, 5)`` on a 2 x 2 grid (8 x 10 mosaic), IPP (-100, -50, 20), PixelSpacing 2 x 3,
    SpacingBetweenSlices 5; the count (and ``normal``) in the CSA header."""
    n, h, w = tiles.shape
    mosaic = np.zeros((2 * h, 2 * w), np.uint16)
    for i in range(n):
        r, c = divmod(i, 2)
        mosaic[r * h:(r + 1) * h, c * w:(c + 1) * w] = tiles[i]
    ds = _base(MR_STORAGE, mosaic, generate_uid(), ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"],
               ImagePositionPatient=[-100.0, -50.0, 20.0], ImageOrientationPatient=list(orientation),
               PixelSpacing=[2.0, 3.0], SliceThickness=4.0, SpacingBetweenSlices=5.0, AcquisitionMatrix=[h, 0, 0, w])
    tags = {"NumberOfImagesInMosaic": ("US", [str(n)])}
    if normal is not None:
        tags["SliceNormalVector"] = ("FD", [f"{v:.8f}" for v in normal])
    ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
    ds.add_new((0x0029, 0x1010), "OB", csa2(tags))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_mosaic_positions_by_hand():
    # slice 1: IPP + col (0,1,0) * 2 mm * (8-4)/2 + row (1,0,0) * 3 mm * (10-5)/2 = (-92.5, -46, 20)
    pos = mosaic_positions([-100, -50, 20], AXIAL, [2, 3], (8, 10), (4, 5), 3, 5.0)
    np.testing.assert_allclose(pos, [[-92.5, -46, 20], [-92.5, -46, 25], [-92.5, -46, 30]])
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows along +y, columns along -z: normal -x
    pos = mosaic_positions([-100, -50, 20], sagittal, [2, 3], (8, 10), (4, 5), 2, 5.0)
    np.testing.assert_allclose(pos, [[-100, -42.5, 16], [-105, -42.5, 16]])


@pytest.mark.parametrize("normal,order,z", [
    (None, [0, 1, 2, 3], [20, 25, 30, 35]),  # the cross product: stored bottom-up
    ((0.0, 0.0, 1.0), [0, 1, 2, 3], [20, 25, 30, 35]),
    ((0.0, 0.0, -1.0), [3, 2, 1, 0], [5, 10, 15, 20]),  # CSA normal against it: stored top-down
])
def test_mosaic_slices_ordered_by_their_positions(tmp_path, normal, order, z):
    tiles = np.arange(1, 4 * 4 * 5 + 1).reshape(4, 4, 5).astype(np.uint16)
    write_mosaic(tmp_path / "epi.dcm", tiles, AXIAL, normal)
    src, refs = volume_source(tmp_path, sample="volume", volume_size="4,4,5")
    vol = src.sampler.volume_of(refs[0])
    assert (vol.depth, vol.rows, vol.columns, vol.spacing, vol.issues) == (4, 4, 5, (5.0, 2.0, 3.0), [])
    np.testing.assert_allclose(vol.positions, [[-92.5, -46.0, zi] for zi in z])
    np.testing.assert_array_equal(src.sampler.load(refs[0], raw=True)[0], tiles[order].astype(np.float32))
    src, refs = volume_source(tmp_path, sample="slab:1")  # slices in the same spatial order
    np.testing.assert_array_equal(src.sampler.load(refs[0], raw=True)[0], tiles[order[0]].astype(np.float32))


def test_enhanced_two_echo_file_gives_one_volume_per_echo(tmp_path):
    """An enhanced MR file, 2 echoes x 3 positions, frames interleaved: per-frame MR Echo groups split it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from tests.test_series import ENHANCED_CT

    z, echo_time = [5.0, 0.0, 5.0, 2.5, 0.0, 2.5], [30.0, 30.0, 10.0, 30.0, 10.0, 10.0]
    echo = [1 if t == 10.0 else 2 for t in echo_time]  # the shorter echo time is echo 1
    frames = np.stack([slice_pixels(int(zi / 2.5)) + 1000 * (e - 1) for zi, e in zip(z, echo)])
    ds = _base(ENHANCED_CT, frames, generate_uid(), NumberOfFrames=len(frames))
    shared, orient, measures = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = list(AXIAL)
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.7], 2.5
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for zi, t in zip(z, echo_time):
        group, pos, mr_echo = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, zi]
        mr_echo.EffectiveEchoTime = t
        group.PlanePositionSequence, group.MREchoSequence = Sequence([pos]), Sequence([mr_echo])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(tmp_path / "enh.dcm", enforce_file_format=True)
    src, refs, raws, vols = raw_volumes(tmp_path, 3)
    assert len(refs) == 2 and [src.sample_id(r)[-3:] for r in refs] == [".e1", ".e2"]
    for e, (raw, vol) in enumerate(zip(raws, vols)):
        np.testing.assert_array_equal(raw, np.stack([slice_pixels(k) + 1000 * e for k in range(3)]))
        assert vol.spacing == (2.5, 0.7, 0.7) and [p[2] for p in vol.positions] == [0.0, 2.5, 5.0]
        assert vol.issues == [f"echo {e + 1}: one of 2 volumes of a file split by echo (positions repeat)"]
