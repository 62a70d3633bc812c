"""``eval`` labels of DICOM data: class folders (the first folder below the root) for slices and
series, and a ``--labels`` CSV naming a series' folder or one of its slice files.

Trees are as deep as real exports: ``ROOT/<split>/<class>/<patient>/<study>/<series>/*.dcm``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from sslkit.eval.labels import assign_labels
from sslkit.registry import create_source
from tests.conftest import tiny_run
from tests.dicom_factory import write_dicom
from tests.test_series import write_slice


VOLUME_OPTS = ("--data-opt", "sample=volume", "--data-opt", "spacing=2", "--data-opt", "volume_size=8,8,8")
SERIES = {"train": [("a", "p0"), ("a", "p1"), ("b", "p2"), ("b", "p3")], "test": [("a", "p4"), ("b", "p5")]}


def series_dir(root: Path, split: str, cls: str, patient: str) -> Path:
    return root / split / cls / patient / "study" / "series"


def write_ct_series(folders: list[Path], rng: np.random.Generator, offset: int, n: int = 4) -> None:
    """One CT series of ``n`` 8 x 8 slices 2 mm apart; slice ``k`` goes to ``folders[k % len(folders)]``."""
    uid = generate_uid()
    for k in range(n):
        img = (rng.integers(0, 400, (8, 8)) + offset).astype(np.uint16)
        write_slice(folders[k % len(folders)] / f"{k}.dcm", img, uid, [0.0, 0.0, 2.0 * k], spacing=(2.0, 2.0))


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """CT series in class folders, and a one-step SimCLR run of a 3D ResNet on them (``ct / "run"``)."""
    from click.testing import CliRunner

    from sslkit.cli import main

    root = tmp_path_factory.mktemp("ct-labels")
    rng = np.random.default_rng(0)
    for split, series in SERIES.items():
        for cls, patient in series:
            write_ct_series([series_dir(root, split, cls, patient)], rng, 1000 * (cls == "b"))
    args = ["pretrain", "--task", "simclr", "--backbone", "monai:resnet10", "--data", f"dicom:{root / 'train'}",
            "--out", root / "run", *VOLUME_OPTS, "--max-steps", 1, "--batch-size", 2, "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


def knn(cli, run: Path, train: Path, test: Path, *extra) -> dict:
    result = cli("eval", "knn", run, "--train", f"dicom:{train}", "--test", f"dicom:{test}", "--k", "1",
                 "--no-baseline", "--json", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_2d_dicom_class_folders_label_slices(cli, tmp_path):
    root = tmp_path / "xr"
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("a", "b")):
            for i in range(n):
                img = (rng.integers(0, 500, (24, 24)) + 2000 * c).astype(np.uint16)
                write_dicom(series_dir(root, split, cls, f"p{i}") / "1.dcm", img, patient_id=f"{split}{cls}{i}")
    write_dicom(root / "train" / "loose.dcm", rng.integers(0, 500, (24, 24)), patient_id="loose")  # no class folder
    refs = create_source(f"dicom:{root / 'train'}", workers=1).index()
    assert sorted((Path(r.path).name, r.label) for r in refs) == [("1.dcm", "a")] * 3 + [("1.dcm", "b")] * 3 + [
        ("loose.dcm", None)]
    run = tiny_run(f"dicom:{root / 'train'}", tmp_path / "run", 32)
    rep = knn(cli, run, root / "train", root / "test")
    assert rep["class_counts"] == {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}}
    assert rep["data"]["train"]["unlabelled"] == 1 and rep["data"]["test"]["unlabelled"] == 0


def test_volumes_take_the_class_folder_of_their_slices(cli, ct):
    rep = knn(cli, ct / "run", ct / "train", ct / "test")
    assert rep["class_counts"] == {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}
    assert rep["data"]["train"]["unlabelled"] == 0
    # slabs are labelled by their series too
    refs = create_source(f"dicom:{ct / 'train'}", workers=1, sample="slab:3").index()
    assert len(refs) == 16 and sorted(r.label for r in refs) == ["a"] * 8 + ["b"] * 8


def _labels_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


def test_labels_csv_naming_series_folders(cli, ct, tmp_path):
    """Rows name the folder of each series (relative to the data's parent); the CSV, not the class
    folders, decides: classes ``lo``/``hi``, and the series of p1 has no row."""
    rows = [(f"{split}/{cls}/{p}/study/series", "hi" if cls == "b" else "lo")
            for split, series in SERIES.items() for cls, p in series if p != "p1"]
    csv = _labels_csv(tmp_path / "labels.csv", rows)
    rep = knn(cli, ct / "run", ct / "train", ct / "test", "--labels", csv)
    assert rep["classes"] == ["hi", "lo"]
    assert rep["class_counts"] == {"train": {"hi": 2, "lo": 1}, "test": {"hi": 1, "lo": 1}}
    assert rep["data"]["train"]["unlabelled"] == 1


def test_labels_csv_naming_one_slice_file_of_each_series(cli, ct, tmp_path):
    """A row naming any slice of a series (here the third, absolute, or as ``p0/study/series/2.dcm``) labels it."""
    rows = []
    for split, series in SERIES.items():
        for i, (cls, p) in enumerate(series):
            file = series_dir(ct, split, cls, p) / "2.dcm"
            rows.append((str(file) if i % 2 else f"{p}/study/series/2.dcm", cls.upper()))
    csv = _labels_csv(tmp_path / "labels.csv", rows)
    rep = knn(cli, ct / "run", ct / "train", ct / "test", "--labels", csv)
    assert rep["class_counts"] == {"train": {"A": 2, "B": 2}, "test": {"A": 1, "B": 1}}
    assert rep["data"]["train"]["unlabelled"] == 0 and rep["data"]["test"]["unlabelled"] == 0


def test_series_split_across_class_folders_has_no_label(cli, ct, tmp_path):
    train = tmp_path / "train"
    rng = np.random.default_rng(2)
    for cls, patient in SERIES["train"]:
        write_ct_series([series_dir(train, "", cls, patient)], rng, 1000 * (cls == "b"))
    write_ct_series([series_dir(train, "", "a", "p9"), series_dir(train, "", "b", "p9")], rng, 500)
    refs = create_source(f"dicom:{train}", workers=1, sample="volume", spacing="2", volume_size="8,8,8").index()
    assert len(refs) == 5 and sorted(r.label or "-" for r in refs) == ["-", "a", "a", "b", "b"]
    rep = knn(cli, ct / "run", train, ct / "test")
    assert rep["class_counts"]["train"] == {"a": 2, "b": 2} and rep["data"]["train"]["unlabelled"] == 1


def test_assign_labels_matches_extra_paths_and_drops_disagreeing_rows():
    table = {"s1": "x", "s2/1.dcm": "y", "s3/1.dcm": "x", "s3/2.dcm": "z", "a.png": "w"}
    ids = ["series:k1", "series:k2", "series:k3", "series:k4", "/d/a.png"]
    paths = [("/d/s1/1.dcm", "/d/s1"), ("/d/s2/1.dcm", "/d/s2"), ("/d/s3/1.dcm", "/d/s3/2.dcm", "/d/s3"),
             ("/d/s4/1.dcm", "/d/s4"), ()]
    assert assign_labels(ids, [None] * 5, table, paths) == ["x", "y", None, None, "w"]
    # without extra paths, ids alone (a 2D sample's path), as before
    assert assign_labels(["/d/s2/1.dcm", "/d/b.png"], [None, None], table) == ["y", None]
    assert assign_labels(ids, ["c"] * 5, None, paths) == ["c"] * 5


def test_grouped_folds_and_tsne_colours_of_volumes(cli, ct, tmp_path):
    """``--split group:K`` on volumes keys groups by the series' sample ids (it raised KeyError
    'series:...'), and t-SNE finds each volume's class folder and colour."""
    result = cli("eval", "knn", ct / "run", "--data", f"dicom:{ct / 'train'}", "--split", "group:2", "--k", "1",
                 "--group-by", "folder", "--no-baseline", "--json", "--quiet")  # groups from the slices' folders
    # the four series folders are one patient's (write_slice's): joined, so that patient cannot be on both
    # sides of a fold, which leaves one group, too few for 2 folds (the keys were found: no KeyError)
    assert result.exit_code == 2, result.output
    assert "--group-by folder: 4 groups joined into 1" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --split group:2 needs at least 2 groups")
    out = tmp_path / "tsne.png"
    # the series folders all belong to write_slice's one patient: that name is not shown
    for colour, classes in (("label", ["a", "b"]), ("folder", ["folder 1 (one patient)"])):
        result = cli("eval", "tsne", ct / "run", "--data", f"dicom:{ct / 'train'}", "--out", out, "--color-by", colour,
                     "--no-baseline", "--json", "--quiet", "--overwrite")
        assert result.exit_code == 0, result.output
        rep = json.loads(result.stdout)
        assert rep["classes"] == classes and rep["data"]["data"]["unlabelled"] == 0, rep


def test_tsne_notes_another_spacing_once(cli, ct, tmp_path):
    """A ``--spacing`` other than the run's is noted once: the map of the whole set noted it again when it
    indexed the data a second time to embed it."""
    result = cli("eval", "tsne", ct / "run", "--data", f"dicom:{ct / 'train'}", "--data-opt", "spacing=1",
                 "--out", tmp_path / "t.png", "--no-baseline", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("sslkit: note: --spacing 1,1,1 resamples to another voxel size") == 1, result.stderr
    assert json.loads(result.stdout)["data"]["data"]["plotted"] == 4


def test_patient_folders_are_not_taken_for_classes(tmp_path):
    """A plain export, ROOT/<patient>/<study>/..., was evaluated with one class per patient named
    after its folder; with every top folder holding exactly one patient of its own, no labels."""
    rng = np.random.default_rng(3)
    for i in range(3):
        write_dicom(tmp_path / "export" / f"DOE_{i}" / "study" / "1.dcm", rng.integers(0, 500, (24, 24)),
                    patient_id=f"pid{i}")
    refs = create_source(f"dicom:{tmp_path / 'export'}", workers=1).index()
    assert len(refs) == 3 and all(r.label is None for r in refs)
    for i in range(3):  # two patients in one top folder: class folders after all
        write_dicom(tmp_path / "export" / f"DOE_{i}" / "study" / "2.dcm", rng.integers(0, 500, (24, 24)),
                    patient_id=f"other{i}")
    refs = create_source(f"dicom:{tmp_path / 'export'}", workers=1).index()
    assert sorted(r.label for r in refs) == ["DOE_0", "DOE_0", "DOE_1", "DOE_1", "DOE_2", "DOE_2"]


def test_tsne_folder_colours_hide_folders_named_after_one_patient(cli, tmp_path):
    """``--color-by folder`` wrote patient-named folders (``dcm/<PatientName>/``) into the legend and
    the report's classes; a folder name that holds one patient only is now shown as ``folder K``."""
    rng = np.random.default_rng(5)
    for i, name in enumerate(("DOE_JOHN", "ROE_JANE", "POE_EDGAR")):
        for k in range(3):
            write_dicom(tmp_path / "dcm" / name / f"{k}.dcm", rng.integers(0, 500, (24, 24)), patient_id=f"pid{i}")
    for i in range(3):  # a folder name shared by three patients stays
        write_dicom(tmp_path / "dcm" / "ward" / f"{i}.dcm", rng.integers(0, 500, (24, 24)), patient_id=f"w{i}")
    run = tiny_run(f"dicom:{tmp_path / 'dcm'}", tmp_path / "run", 32)
    result = cli("eval", "tsne", run, "--data", f"dicom:{tmp_path / 'dcm'}", "--out", tmp_path / "t.png",
                 "--color-by", "folder", "--perplexity", "3", "--no-baseline", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["classes"] == ["folder 1 (one patient)", "folder 2 (one patient)", "folder 3 (one patient)", "ward"]
    assert "3 of 4 folder names hold one patient" in result.stderr
    text = json.dumps(rep) + Path(rep["report_file"]).read_text()
    assert not any(name in text for name in ("DOE", "ROE", "POE"))
