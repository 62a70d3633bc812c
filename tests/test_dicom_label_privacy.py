"""DICOM class folders that hold one patient, and skip reasons, carry no patient's name.

A first folder below a DICOM root that holds exactly one patient is not a class a user chose (it may be the
patient's own folder, ``DOE^JOHN/``): it keeps its class under an alias, ``folder K (one patient)``, that
cannot carry the name, decided per folder whatever the number of folders. Three or more such folders and
nothing else are a plain export: no labels at all, as before. A skip reason drops any word of the message
that is a value of the file's identifying header elements (PatientName, PatientID...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sslkit.registry import create_source
from tests.conftest import tiny_run
from tests.dicom_factory import write_dicom


MARK = "ZQXPAT"


def tree(root: Path, folders: dict[str, list[str]], seed: int = 0) -> Path:
    """``root/<folder>/<patient>_<k>.dcm``: two images of each patient ID; headers anonymised (no name)."""
    rng = np.random.default_rng(seed)
    for folder, patients in folders.items():
        for pid in patients:
            for k in range(2):
                write_dicom(root / folder / f"{pid}_{k}.dcm", rng.integers(0, 500, (24, 24)), patient_id=pid)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-step run on a plain class-folder set (its classes are not what is checked)."""
    root = tmp_path_factory.mktemp("dicom-label-run")
    data = tree(root / "data", {"a": ["p1", "p2"], "b": ["p3", "p4"]})
    return tiny_run(f"dicom:{data}", root / "run", 32)


def tsne(cli, run: Path, data: Path, out: Path) -> dict:
    result = cli("eval", "tsne", run, "--data", f"dicom:{data}", "--out", out, "--perplexity", "2",
                 "--no-baseline", "--json", "--quiet", "--overwrite")
    assert result.exit_code == 0, result.output
    assert MARK not in result.stderr
    rep = json.loads(result.stdout)
    assert MARK not in json.dumps(rep) and MARK not in Path(rep["report_file"]).read_text()
    return rep


def test_two_patient_folders_become_aliased_classes(cli, run, tmp_path):
    """Two first folders, one patient each (``DOE^ZQXPATA/``, ``ROE^ZQXPATB/``): their names were the classes
    of every eval output; now aliases, the same in two runs."""
    data = tree(tmp_path / "two", {f"DOE^{MARK}A": ["anon1"], f"ROE^{MARK}B": ["anon2"]})
    first = tsne(cli, run, data, tmp_path / "t1.png")
    assert first["classes"] == ["folder 1 (one patient)", "folder 2 (one patient)"]
    assert first["class_counts"]["plotted"] == {"folder 1 (one patient)": 2, "folder 2 (one patient)": 2}
    again = tsne(cli, run, data, tmp_path / "t2.png")
    assert again["classes"] == first["classes"] and again["class_counts"] == first["class_counts"]


def test_one_patient_folders_beside_a_real_class_are_aliased(cli, run, tmp_path):
    """Three first folders, one of them holding two patients: the two single-patient folders kept their
    names (the rule was all or nothing); now only they are aliased, numbered in sorted order of their names."""
    data = tree(tmp_path / "three", {f"DOE^{MARK}A": ["anon1"], "MIXED": ["anon3", "anon4"],
                                     f"ROE^{MARK}B": ["anon2"]})
    rep = tsne(cli, run, data, tmp_path / "t.png")
    assert rep["classes"] == ["MIXED", "folder 1 (one patient)", "folder 2 (one patient)"]
    assert rep["class_counts"]["plotted"] == {"MIXED": 4, "folder 1 (one patient)": 2, "folder 2 (one patient)": 2}
    # which folder is which alias: the sorted order of the hidden names (DOE^... before ROE^...)
    labels = {Path(r.path).parent.name: r.label for r in create_source(f"dicom:{data}", workers=1).index()}
    assert labels == {f"DOE^{MARK}A": "folder 1 (one patient)", "MIXED": "MIXED",
                      f"ROE^{MARK}B": "folder 2 (one patient)"}


def test_a_plain_export_of_three_patients_still_has_no_labels(tmp_path):
    """Three or more first folders, each one patient of its own and nothing else: no labels, as before."""
    data = tree(tmp_path / "export", {f"DOE^{MARK}{i}": [f"anon{i}"] for i in range(3)})
    refs = create_source(f"dicom:{data}", workers=1).index()
    assert len(refs) == 6 and [r.label for r in refs] == [None] * 6


def test_folders_sharing_their_one_patient_keep_their_names(tmp_path):
    """One patient's images sorted into class folders (a phantom): no folder holds a patient of its own,
    so the names stay; a third folder holding a patient of its own beside them is aliased."""
    data = tree(tmp_path / "phantom", {"a": ["p1"], "b": ["p1"]})
    assert sorted(r.label for r in create_source(f"dicom:{data}", workers=1).index()) == ["a"] * 2 + ["b"] * 2
    tree(data, {f"DOE^{MARK}C": ["p2"]}, seed=1)
    labels = {Path(r.path).parent.name: r.label for r in create_source(f"dicom:{data}", workers=1).index()}
    assert labels == {"a": "a", "b": "b", f"DOE^{MARK}C": "folder 1 (one patient)"}


def test_a_folder_named_in_the_header_loses_its_label(tmp_path):
    """The header's PatientName in a folder's name: no label, alias or not (the existing rule)."""
    rng = np.random.default_rng(1)
    data = tree(tmp_path / "named", {"a": ["p1", "p2"]})
    write_dicom(data / "SMITH_JANE" / "1.dcm", rng.integers(0, 500, (24, 24)), patient_id="p9",
                patient_name="SMITH^JANE")
    labels = {Path(r.path).parent.name: r.label for r in create_source(f"dicom:{data}", workers=1).index()}
    assert labels == {"a": "a", "SMITH_JANE": None}


def identified(path: Path) -> Path:
    return write_dicom(path, np.zeros((8, 8), np.uint16), patient_id="ZQXID042", patient_name="ZQX3^JOHN",
                       birth_date="19610303")


def test_reason_drops_header_values_of_the_file(tmp_path):
    """F7: the message of an error can quote a value without quotes ("Invalid value ZQX3^JOHN for PN"): with
    the data set at hand, each word that is one of its identifying values is dropped; a codec's message stays."""
    import pydicom

    from sslkit_plugins.sources.dicom_reasons import failure_reason, safe_reason

    ds = pydicom.dcmread(identified(tmp_path / "x.dcm"))
    for message in ("Invalid value ZQX3^JOHN for PN", "bad ID ZQXID042, born 19610303", "Invalid value JOHN"):
        reason = safe_reason(ValueError(message), ds)
        assert not any(v in reason for v in ("ZQX", "JOHN", "19610303")), reason
        assert reason.startswith("ValueError: ")
    assert safe_reason(ValueError("Invalid value ZQX3^JOHN for PN"), ds) == "ValueError: Invalid value … for PN"
    assert failure_reason(ValueError("bad ID ZQXID042"), "cannot decode", ds) == "cannot decode: ValueError: bad ID …"
    codec = RuntimeError("Unable to decode the pixel data: the JPEG 2000 plugin is missing (install pylibjpeg)")
    assert safe_reason(codec, ds) == f"RuntimeError: {codec}"
    # no data set at hand: a person's name written the DICOM way (with ^) is still dropped
    assert safe_reason(ValueError("Invalid value ZQX3^JOHN for PN")) == "ValueError: Invalid value … for PN"


def test_reasons_of_the_source_drop_header_values(tmp_path, monkeypatch):
    """The source passes the file's data set to its reasons: a header value in the message of an error while
    reading the header, or while decoding, is not in the skip reason."""
    from sslkit.api import Undecodable
    from sslkit_plugins.sources import dicom

    path = identified(tmp_path / "data" / "a" / "x.dcm")

    def boom(*args, **kwargs):
        raise ValueError("Invalid value ZQX3^JOHN / ZQXID042 for PN")

    monkeypatch.setattr(dicom, "geometry", boom)
    reason = dicom.read_header(str(path))["reason"]
    assert reason == "bad header value: ValueError: Invalid value … / … for PN", reason
    monkeypatch.undo()
    source = create_source(f"dicom:{tmp_path / 'data'}", workers=1)
    ref = source.index()[0]
    monkeypatch.setattr(dicom, "decode_located", lambda *a, **k: None)
    monkeypatch.setattr(dicom, "decode", boom)
    with pytest.raises(Undecodable) as err:
        source.load(ref)
    assert "ZQX" not in str(err.value) and str(err.value).endswith("Invalid value … / … for PN"), str(err.value)


def test_a_test_class_of_one_patient_is_refused_with_the_way_out(cli, run, tmp_path):
    """--train/--test: a class holding one patient in the test root alone is aliased there, so it is not one of
    the training classes: the one-line refusal says why and what to give (--labels), not only the names."""
    train = tree(tmp_path / "train", {"a": ["p1", "p2"], "b": ["p3", "p4"]})
    test = tree(tmp_path / "test", {"a": ["p5"], "b": ["p6", "p7"]}, seed=1)
    result = cli("eval", "knn", run, "--train", f"dicom:{train}", "--test", f"dicom:{test}", "--no-baseline",
                 "--quiet")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: test classes 'folder 1 (one patient)' do not occur in the training set (training classes: a, b); "
        "a class folder holding one patient is named by an alias, not its name (which may be the patient's): "
        "give the classes with --labels FILE.csv"]
