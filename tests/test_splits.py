"""Patient-level splits: no group on both sides, stable, exact-ish fraction."""

from __future__ import annotations

import numpy as np
import pytest

from sslkit.data.source import SampleRef
from sslkit.data.splits import split_refs
from sslkit.errors import UsageError
from sslkit.registry import create_source
from tests.dicom_factory import write_dicom


def _refs(n_groups=40, per=(1, 5), seed=0):
    rng = np.random.default_rng(seed)
    return [SampleRef(f"/d/{g}/{i}.dcm", group=f"g{g}") for g in range(n_groups) for i in range(rng.integers(*per))]


def test_no_group_on_both_sides_and_fraction_close():
    refs = _refs()
    train, val = split_refs(refs, 0.2, seed=3)
    assert {r.group for r in train}.isdisjoint({r.group for r in val})
    assert len(train) + len(val) == len(refs) and set(train) | set(val) == set(refs)
    assert abs(len(val) - 0.2 * len(refs)) <= 4  # at most one group (<= 4 samples) over


def test_split_is_stable_and_seeded():
    refs = _refs()
    a = split_refs(refs, 0.25, seed=1)[1]
    b = split_refs(list(reversed(refs)), 0.25, seed=1)[1]
    assert {r.group for r in a} == {r.group for r in b}  # independent of file order
    c = split_refs(refs, 0.25, seed=2)[1]
    assert {r.group for r in a} != {r.group for r in c}


def test_zero_fraction_and_bad_values():
    refs = _refs(5)
    assert split_refs(refs, 0.0) == (refs, [])
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(UsageError):
            split_refs(refs, bad)
    with pytest.raises(UsageError, match="one patient"):
        split_refs([SampleRef("/a", group="same"), SampleRef("/b", group="same")], 0.5)


def test_dicom_patients_and_multiframe_files_stay_together(tmp_path):
    rng = np.random.default_rng(0)
    for p in range(6):
        for s in range(2):  # two studies per patient: split by patient first
            write_dicom(tmp_path / f"p{p}s{s}.dcm", (rng.random((3, 16, 16)) * 999).astype(np.uint16),
                        patient_id=f"PAT{p}")
    write_dicom(tmp_path / "anon.dcm", (rng.random((4, 16, 16)) * 999).astype(np.uint16))  # no PatientID
    src = create_source(f"dicom:{tmp_path}", workers=1)
    refs = src.index()
    assert len(refs) == 12 * 3 + 4
    train, val = split_refs(refs, 0.3, seed=0)
    by_patient = lambda side: {r.path.split("/")[-1].split("s")[0] for r in side if "anon" not in r.path}  # noqa: E731
    assert by_patient(train).isdisjoint(by_patient(val))
    for side in (train, val):
        frames = {}
        for r in side:
            frames.setdefault(r.path, []).append(r.frame)
        other = val if side is train else train
        assert not set(frames) & {r.path for r in other}  # no file's frames straddle the split


def test_folder_group_regex(tmp_path):
    from PIL import Image

    for p in range(5):
        for i in range(3):
            (tmp_path / f"patient{p}").mkdir(exist_ok=True)
            Image.fromarray(np.full((8, 8), p * 40 + i, np.uint8)).save(tmp_path / f"patient{p}" / f"scan_{p}_{i}.png")
    src = create_source(f"folder:{tmp_path}", group=r"^(patient\d+)/")
    refs = src.index()
    assert len({r.group for r in refs}) == 5
    train, val = split_refs(refs, 0.4, seed=0)
    assert len(val) == 6 and {r.group for r in train}.isdisjoint({r.group for r in val})
    # the same regex on the file name: scan_<patient>_<i>
    assert len({r.group for r in create_source(f"folder:{tmp_path}", group=r"scan_(\d+)_").index()}) == 5
    with pytest.raises(UsageError, match="regular expression"):
        create_source(f"folder:{tmp_path}", group="(")


def test_a_held_out_part_far_from_the_fraction_is_noted(tmp_path, capsys):
    """Two patients of 41 and 21 images: --val-fraction 0.3 can only hold out a whole patient, and
    held out 66 % without a word."""
    from PIL import Image

    from sslkit.data.pipeline import load_data

    for p, n in (("a", 41), ("b", 21)):
        (tmp_path / p).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / p / f"{i}.png")

    def held(fraction, seed):
        loaded = load_data(f"folder:{tmp_path}", 8, cache_dir="", val_fraction=fraction, seed=seed, progress=False,
                           source_options={"group": r"^(\w)/"})
        return loaded.split["val_samples"], capsys.readouterr().err

    runs = {n: err for n, err in (held(0.3, seed) for seed in range(8))}
    assert set(runs) == {41, 21}  # the seed picks which patient is held out
    assert "note: --val-fraction 0.3 held out 66% of the samples (41 of 62, 1 of 2 groups): patients (groups) " \
           "are never split" in runs[41]
    assert "note" not in runs[21]  # 34 % for 30 %
