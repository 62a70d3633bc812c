"""``sslkit data preview``: which samples get a row, and what their row labels show."""

from __future__ import annotations

import numpy as np
import pytest

import sslkit.data.preview as preview
from tests.conftest import make_images
from tests.dicom_factory import write_dicom


def preview_labels(monkeypatch, src, out, samples, ids="path"):
    """The row labels of the sheet ``data preview`` draws of ``src`` (``ids="path"``: with file names, so the
    folders' aliases and the shortening show; the default keys are tests/test_output_paths_privacy.py's)."""
    figs = []
    real = preview.save_png
    monkeypatch.setattr(preview, "save_png", lambda fig, *a, **k: figs.append(fig) or real(fig, *a, **k))
    preview.preview(src, out, samples=samples, image_size=16, ids=ids)
    return [row[0].get_ylabel() for row in np.asarray(figs[0].axes).reshape(samples, -1)]


def test_rows_spread_over_all_classes_and_reach_the_last_sample(tmp_path, monkeypatch):
    data = make_images(tmp_path / "xr", n_per_class=6, size=8, classes=("NORMAL", "PNEUMONIA"))
    for p in sorted((data / "PNEUMONIA").iterdir())[:1]:
        p.unlink()  # 6 NORMAL + 5 PNEUMONIA: a stride of 11 // 6 = 1 showed NORMAL only
    labels = preview_labels(monkeypatch, f"folder:{data}", tmp_path / "p.png", 6)
    assert sum(lab.startswith("NORMAL/") for lab in labels) == 3
    assert sum(lab.startswith("PNEUMONIA/") for lab in labels) == 3
    assert labels[-1] == "PNEUMONIA/5.png"  # the last sample is reached


def test_row_label_keeps_the_class_folder_and_file_name(tmp_path, monkeypatch):
    deep = tmp_path / "d" / "NORMAL" / "a_rather_long_site_folder_name" / "scanner_2019_export"
    make_images(deep, n_per_class=2, size=8, classes=("series_0001_reconstructed",))
    labels = preview_labels(monkeypatch, f"folder:{tmp_path / 'd'}", tmp_path / "p.png", 2)
    assert labels == ["NORMAL/…/0.png", "NORMAL/…/1.png"]  # the last 28 characters lost NORMAL


def test_dicom_row_labels_do_not_show_patient_named_folders(tmp_path, monkeypatch):
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
    for name, pid in (("Brambleworth^Cassius", "BC1"), ("Quixotebottom^Zebulon", "QZ2")):
        for i in range(2):
            write_dicom(tmp_path / "dcm" / "CHEST" / name.replace("^", "_").upper() / f"img{i}.dcm", pixels + i,
                        patient_name=name, patient_id=pid)
    labels = preview_labels(monkeypatch, f"dicom:{tmp_path / 'dcm'}", tmp_path / "p.png", 4, ids="key")
    assert len(labels) == 4 and all(lab.startswith("CHEST/") for lab in labels)
    for lab in labels:
        assert "BRAMBLEWORTH" not in lab.upper() and "QUIXOTEBOTTOM" not in lab.upper(), lab


def test_row_labels_hide_every_folder_below_the_class_folder(tmp_path, monkeypatch):
    """``DIR/<class>/<patientID>/img``: a patient's folder of two images was shown by name (only one-image
    folders were hidden); now every folder below the first level is, at every level, with ``eval tsne``'s
    aliases (sorted names, numbered)."""
    from sslkit.eval.tsne import folder_aliases
    from sslkit.registry import create_source

    for cls, patient in (("NORMAL", "person1000"), ("NORMAL", "person1001"), ("PNEUMONIA", "person2002")):
        make_images(tmp_path / "xr" / cls, n_per_class=2, size=8, classes=(patient,))
    make_images(tmp_path / "xr", n_per_class=2, size=8, classes=("PNEUMONIA",))  # a class folder's own files
    make_images(tmp_path / "xr" / "CT" / "person3003", n_per_class=2, size=8, classes=("study",))  # two levels
    labels = preview_labels(monkeypatch, f"folder:{tmp_path / 'xr'}", tmp_path / "p.png", 10)
    # was NORMAL/person1000/0.png; NORMAL/folder 1 (may name a patient)/0.png is over 40 characters: the
    # first folder, "…", the file
    assert labels == ["CT/…/0.png", "CT/…/1.png"] + ["NORMAL/…/0.png", "NORMAL/…/1.png"] * 2 + [
        "PNEUMONIA/0.png", "PNEUMONIA/1.png", "PNEUMONIA/…/0.png", "PNEUMONIA/…/1.png"]
    monkeypatch.setattr(preview, "LABEL_CHARS", 200)  # the whole labels
    full = preview_labels(monkeypatch, f"folder:{tmp_path / 'xr'}", tmp_path / "p2.png", 10)
    # numbered in sorted order, the files' own folders (--color-by folder's colours) before those above them
    alias = {n: f"folder {k} (may name a patient)"
             for k, n in enumerate(("person1000", "person1001", "person2002", "study", "person3003"), 1)}
    assert full[:4] == [f"CT/{alias['person3003']}/{alias['study']}/{i}.png" for i in (0, 1)] + [
        f"NORMAL/{alias['person1000']}/{i}.png" for i in (0, 1)]
    assert full[-4:] == ["PNEUMONIA/0.png", "PNEUMONIA/1.png"] + [f"PNEUMONIA/{alias['person2002']}/{i}.png"
                                                                  for i in (0, 1)]
    src = create_source(f"folder:{tmp_path / 'xr'}")
    assert folder_aliases(src, src.index()) == alias


def test_row_labels_hide_a_folder_name_that_is_not_utf8(tmp_path, monkeypatch):
    """``NORMAL/M\\xdcLLER_HANS/0.png`` (a latin-1 folder name): the key writes the byte as ``\\xdc``, the
    relative path kept it as a surrogate, so the two never matched and the patient's folder was shown by
    name while its sibling ``SMITH_JOHN`` was hidden. ``eval tsne --color-by folder`` hides both too."""
    import os

    from sslkit.eval.tsne import folder_aliases, folder_values
    from sslkit.registry import create_source

    muller = os.fsdecode(b"M\xdcLLER_HANS")  # as os.listdir gives it: the byte as a surrogate
    cafe = os.fsdecode(b"CAF\xc9")  # a class folder: a label the user chose, shown as the key writes it
    try:
        make_images(tmp_path / "xr" / "NORMAL", n_per_class=2, size=8, classes=(muller, "SMITH_JOHN"))
        make_images(tmp_path / "xr", n_per_class=2, size=8, classes=(cafe,))
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses a folder name that is not UTF-8")
    monkeypatch.setattr(preview, "LABEL_CHARS", 200)  # the whole labels
    labels = preview_labels(monkeypatch, f"folder:{tmp_path / 'xr'}", tmp_path / "p.png", 6)
    hidden = ["folder 1 (may name a patient)", "folder 2 (may name a patient)"]  # sorted: M\udcdc... < SMITH
    assert labels == ["CAF\\xc9/0.png", "CAF\\xc9/1.png"] + [f"NORMAL/{h}/{i}.png" for h in hidden for i in (0, 1)]
    src = create_source(f"folder:{tmp_path / 'xr'}")
    refs = src.index()
    assert folder_aliases(src, refs) == dict(zip((muller, "SMITH_JOHN"), hidden))
    assert sorted(folder_values(src, refs).values()) == [cafe] * 2 + [h for h in hidden for _ in (0, 1)]
