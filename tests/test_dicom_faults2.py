"""Faults found by a DICOM audit: an oversized volume refused before a model is built, a mosaic
slice count that contradicts its image, image files beside DICOM files, one file reached by two
paths, skip reasons that are only an exception's name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from sslkit.pseudonym import file_key
from sslkit.registry import create_source
from tests.dicom_factory import write_dicom
from tests.test_series import AXIAL, MR_STORAGE, _base, mosaic_pixels, write_series


def _one_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1: the memory of one sample, first


def test_oversized_volume_is_refused_before_any_model_is_built(tmp_path, cli, monkeypatch):
    write_series(tmp_path / "s", n=4)
    import sslkit.data.room as room
    import sslkit.engine.model_setup as model_setup

    def no_model(*args, **kwargs):
        raise AssertionError("a backbone was built before the memory check")

    monkeypatch.setattr(room, "available_memory", lambda: 50 * 2**20)  # 50 MiB free
    monkeypatch.setattr(model_setup, "build_backbone", no_model)
    result = cli("pretrain", "--task", "mae", "--backbone", "monai:vit", "--data", f"dicom:{tmp_path / 's'}",
                 "--sample", "volume", "--volume-size", "256,256,256", "--out", tmp_path / "r", "--max-steps", 1,
                 "--batch-size", 2, "--quiet", "--no-cache")
    line = _one_line(result, "--volume-size 256,256,256", "1x256x256x256", "lower --volume-size")
    assert "--image-size" not in line
    assert not (tmp_path / "r").exists()


def test_image_size_message_names_image_size(monkeypatch):
    import sslkit.data.room as room
    from sslkit.errors import UsageError

    monkeypatch.setattr(room, "available_memory", lambda: 2**20)
    with pytest.raises(UsageError, match=r"^--image-size 4096: .*lower --image-size"):
        room.check_sample_room(1, 4096)
    room.check_sample_room(1, 64)  # 320 KiB: fits


# ---------------------------------------------------------------- 2: a mosaic count against its image


def write_mosaic_count(path: Path, tiles: np.ndarray, count: int | None, matrix: bool = True) -> Path:
    """``tiles (n, h, w)`` on the square grid of ``n``; (0019,xx0A) says ``count`` (None: absent)."""
    n, h, w = tiles.shape
    mosaic = mosaic_pixels(tiles)
    attrs = dict(ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"], ImagePositionPatient=[0.0, 0.0, 0.0],
                 ImageOrientationPatient=list(AXIAL), PixelSpacing=[3.0, 3.0], SliceThickness=4.0)
    if matrix:
        attrs["AcquisitionMatrix"] = [h, 0, 0, w]
    ds = _base(MR_STORAGE, mosaic, generate_uid(), **attrs)
    if count is not None:
        ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
        ds.add_new((0x0019, 0x100A), "US", count)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _tiles(n: int = 10) -> np.ndarray:
    return np.arange(1, n * 4 * 5 + 1).reshape(n, 4, 5).astype(np.uint16)


@pytest.mark.parametrize("count", [17, 65535])
def test_mosaic_count_that_does_not_fit_falls_back_to_the_acquisition_matrix(tmp_path, count):
    tiles = _tiles()  # 10 tiles of 4x5 on a 4x4 grid: a 16x20 mosaic
    write_mosaic_count(tmp_path / "epi.dcm", tiles, count)
    src = create_source(f"dicom:{tmp_path}", workers=1, sample="volume", volume_size="16,4,5")
    refs = src.index()
    assert len(refs) == 1 and not src.skipped
    vol = src.sampler.volume_of(refs[0])
    assert (vol.depth, vol.rows, vol.columns) == (16, 4, 5)
    assert any(f"NumberOfImagesInMosaic {count}" in i for i in vol.issues), vol.issues
    assert f"NumberOfImagesInMosaic {count}" in src.properties(refs[0])["volume_issues"]
    assert [n for _, n in src.notes() if f"NumberOfImagesInMosaic {count}" in n]  # in the run's data report
    raw = src.sampler.load(refs[0], raw=True)[0]
    np.testing.assert_array_equal(raw[:10], tiles.astype(np.float32))  # whole tiles, none mixed
    assert not raw[10:].any()


@pytest.mark.parametrize("count", [17, 65535])
def test_mosaic_count_that_does_not_fit_without_a_matrix_is_skipped(tmp_path, count):
    write_mosaic_count(tmp_path / "epi.dcm", _tiles(), count, matrix=False)
    write_series(tmp_path / "ct", n=3)
    src = create_source(f"dicom:{tmp_path}", workers=1, sample="slab:1")
    refs = src.index()
    assert len(refs) == 3  # the CT series only
    (path, reason), = src.skipped
    assert path.endswith("epi.dcm") and f"NumberOfImagesInMosaic {count}" in reason and "\n" not in reason
    assert "Error" not in reason
    src = create_source(f"dicom:{tmp_path}", workers=1)  # slice mode: the mosaic is one 2D image
    assert len(src.index()) == 4 and not src.skipped


def test_mosaic_with_a_count_that_fits_is_unchanged(tmp_path):
    tiles = _tiles(7)
    write_mosaic_count(tmp_path / "epi.dcm", tiles, 7)
    src = create_source(f"dicom:{tmp_path}", workers=1, sample="volume", volume_size="7,4,5")
    refs = src.index()
    vol = src.sampler.volume_of(refs[0])
    assert vol.depth == 7 and not vol.issues
    np.testing.assert_array_equal(src.sampler.load(refs[0], raw=True)[0], tiles.astype(np.float32))


# ---------------------------------------------------------------- 3: image files beside DICOM files


def test_image_files_in_a_dicom_folder_are_reported_not_ignored(tmp_path, cli):
    data = tmp_path / "d"
    write_dicom(data / "one.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "b.JPG", format="JPEG")
    (data / "notes.txt").write_text("not an image")
    (data / "meta.json").write_text("{}")
    src = create_source(str(data))  # a bare path: the dicom source (its sniff scores higher)
    assert src.scheme == "dicom"
    assert len(src.index()) == 1
    skipped = {os.path.basename(p): r for p, r in src.skipped}
    assert set(skipped) == {"a.png", "b.JPG"}, skipped
    assert all(r.startswith("not DICOM") and "folder:" in r for r in skipped.values())
    result = cli("data", "inspect", str(data))
    assert result.exit_code == 0, result.output
    assert "a.png" in result.output and "not DICOM" in result.output


# ---------------------------------------------------------------- 4: one file through two paths


def test_a_file_reached_through_two_paths_is_walked_once(tmp_path):
    from sslkit.data.walk import walk_files

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"x")
    (root / "b.png").write_bytes(b"b")
    os.symlink(root / "a" / "x.png", root / "link.png")  # to a file under the root: the same file twice
    os.link(root / "b.png", root / "hard.png")  # a hard link is the same file too
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"o")
    os.symlink(outside, root / "out.png")  # to a file outside the root: read, as before
    found = [str(p.relative_to(root)) for p in walk_files(root, lambda p: True)]
    assert found == ["b.png", "out.png", os.path.join("a", "x.png")], found


def test_a_dicom_file_linked_twice_is_one_sample(tmp_path):
    data = tmp_path / "d"
    write_dicom(data / "p1" / "one.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    os.symlink(data / "p1" / "one.dcm", data / "p1" / "same.dcm")
    src = create_source(f"dicom:{data}")
    refs = src.index()
    assert [os.path.basename(r.path) for r in refs] == ["one.dcm"] and not src.skipped


# ---------------------------------------------------------------- 5: skip reasons in words


def test_decode_skip_reasons_say_what_was_wrong(tmp_path):
    from sslkit.data.pipeline import load_data, summary_line

    data = tmp_path / "d"
    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    for i in range(2):
        write_dicom(data / f"ok{i}.dcm", pixels)
    cut = write_dicom(data / "cut.dcm", pixels)
    cut.write_bytes(cut.read_bytes()[:-100])  # pixel data shorter than Rows x Columns
    bad = write_dicom(data / "badwindow.dcm", pixels, window=(100.0, 123456.7))
    bad.write_bytes(bad.read_bytes().replace(b"123456.7", b"QZBADVAL"))  # WindowCenter not a number
    loaded = load_data(f"dicom:{data}", 16, cache_dir=False, progress=False, workers=1)
    reasons = {os.path.basename(p): r for p, r in loaded.prepared.skipped}
    assert reasons["cut.dcm"].startswith("unreadable pixel data: ValueError: "), reasons
    assert reasons["badwindow.dcm"].startswith("bad header value: ValueError: "), reasons
    assert "QZBADVAL" not in reasons["badwindow.dcm"]
    line = summary_line(len(loaded.prepared), loaded.prepared.skipped)
    assert "x ValueError" not in line and "1 x unreadable pixel data" in line, line


def test_raw_values_of_a_palette_colour_image_are_refused_like_rgb(tmp_path, cli, pydicom_dir):
    """Its stored values index a colour table: dumped as 'modality values' they meant nothing."""
    import shutil

    for name in ("examples_palette.dcm", "CT_small.dcm"):
        shutil.copy(Path(pydicom_dir) / name, tmp_path / name)
    r = cli("data", "dump", f"dicom:{tmp_path}", "--out", tmp_path / "raw.npz", "--raw")
    assert r.exit_code == 0 and "1 undecodable" in r.output, r.output
    assert sorted(k for k in np.load(tmp_path / "raw.npz") if k != "__meta__") == [file_key("CT_small.dcm")]


def test_client_steps_say_a_window_stack_has_no_monochrome1_reflection(tmp_path):
    """The README says so; the export's metadata told clients to reflect in 'the window' anyway."""
    from sslkit.raw_input import legacy_graph_preprocessing
    from sslkit.registry import create_source

    write_series(tmp_path / "s", n=2)
    one = create_source(f"dicom:{tmp_path / 's'}", window="lung").graph_preprocessing()
    stack = create_source(f"dicom:{tmp_path / 's'}", window="lung,mediastinum,bone").graph_preprocessing()
    assert "reflect them in the window first" in one.client and len(stack.lower) == 3
    assert "MONOCHROME1 and colour files cannot use this graph" in stack.client and "reflect them" not in stack.client
    old = legacy_graph_preprocessing({"window": ["W 1500, L -600", "W 400, L 40"]})  # a run.json of before
    assert "cannot use this graph" in old.client


def _patient_folders(root: Path, sub: str = "study") -> None:
    """The audit's export: one folder per patient, named after them; SMITH has no PatientID (two
    studies: two groups), JONES two IDs (two groups), BROWN one."""
    from tests.dicom_factory import write_dicom

    px = np.arange(64, dtype=np.uint16).reshape(8, 8)
    for folder, name, ids in (("SMITH_ALICE", "SMITH^ALICE", ["", ""]), ("JONES_BOB", "JONES^BOB", ["MRN777", "ACC-88"]),
                              ("BROWN_CAROL", "BROWN^CAROL", ["P3", "P3"])):
        for i, pid in enumerate(ids):
            write_dicom(root / folder / sub / f"im{i}.dcm", px + i, patient_id=pid, patient_name=name)


def test_folders_named_after_their_patients_are_never_classes_nor_legend_entries(tmp_path, capsys):
    """The audit's case: SMITH_ALICE, JONES_BOB, BROWN_CAROL became eval classes (and t-SNE legend
    entries) because two of them held two split groups each."""
    from sslkit.eval.tsne import folder_values
    from sslkit.registry import create_source

    _patient_folders(tmp_path / "scans", sub="")  # scans/SMITH_ALICE/im0.dcm: the files' own folders
    src = create_source(f"dicom:{tmp_path / 'scans'}")
    refs = src.index()
    assert len(refs) == 6 and {r.label for r in refs} == {None}
    shown = set(folder_values(src, refs).values())
    assert shown == {"folder 1 (names a patient)", "folder 2 (names a patient)", "folder 3 (names a patient)"}
    assert "carry a patient's name or ID" in capsys.readouterr().err
    # class folders above patient folders stay classes; the patients' own folders are the ones hidden
    _patient_folders(tmp_path / "cls" / "NORMAL")
    (tmp_path / "cls" / "NORMAL" / "JONES_BOB").rename(tmp_path / "cls" / "NORMAL" / "X")
    _patient_folders(tmp_path / "cls" / "PNEUMONIA")
    src = create_source(f"dicom:{tmp_path / 'cls'}")
    refs = src.index()
    assert {r.label for r in refs} == {"NORMAL", "PNEUMONIA"}
    assert src.patient_folders(next(r for r in refs if "SMITH_ALICE" in r.path)) == (2,)  # SMITH_ALICE/study/im
    assert src.patient_folders(next(r for r in refs if "/X/" in r.path)) == ()


@pytest.mark.parametrize("extra,why", [(["--sample", "slab:3", "--window", "400,40"], "slices of a slab:3 sample"),
                                       (["--window", "lung,mediastinum,bone"], "stacked windows")])
def test_channels_that_are_not_colour_planes_are_never_mixed_into_one(tmp_path, cli, extra, why):
    """The audit's case: --channels 1 on a slab:3 (or three windows) mixed the slices with RGB's luma
    weights, 0.30 / 0.59 / 0.11, and trained on that with exit 0."""
    write_series(tmp_path / "s", n=6)
    result = cli("pretrain", "--task", "simclr", "--data", f"dicom:{tmp_path / 's'}", *extra, "--channels", 1,
                 "--image-size", 16, "--batch-size", 2, "--max-steps", 1, "--out", tmp_path / "r", "--quiet",
                 "--no-cache")
    line = _one_line(result, f"--channels 1: the data gives 3 channels ({why}, not colour planes to mix)")
    assert "leave --channels out" in line and not (tmp_path / "r" / "checkpoints").exists()
