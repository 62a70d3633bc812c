"""``sslkit embed``, ``data dump`` and ``data preview`` name a sample by its keyed file key, not its path: folder
and file names below the data root (and the root itself) can carry patient names. ``--ids path`` opts in to paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import sslkit.data.preview as preview
from sslkit.pseudonym import file_key
from tests.conftest import tiny_run
from tests.dicom_factory import write_dicom


MARKER = "ZQX"
#: the samples below the data root, as paths (``#frame``: a frame of the multi-frame file)
PATHS = [f"CHEST/DOE^ZQX/IM_ZQX_{i}.dcm" for i in range(6)] + [f"CHEST/DOE^ZQX/MF_ZQX.dcm#{f}" for f in (0, 1)]


def key_of(path: str) -> str:
    """The reference key of a path from :data:`PATHS`: the file's key, its ``#frame`` after it."""
    file, _, frame = path.partition("#")
    return file_key(file) + (f"#{frame}" if frame else "")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A patient-named DICOM export (the root, the folder and the file names carry the marker) and a 1-step run."""
    root = tmp_path_factory.mktemp("out") / "ZQXROOT"
    pixels = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16)
    for i in range(6):
        write_dicom(root / "CHEST" / "DOE^ZQX" / f"IM_ZQX_{i}.dcm", np.roll(pixels, 3 * i, 1), patient_id="P1",
                    patient_name="Doe^Zqx")
    write_dicom(root / "CHEST" / "DOE^ZQX" / "MF_ZQX.dcm", np.stack([pixels[::-1], pixels[:, ::-1]]),
                patient_id="P1", patient_name="Doe^Zqx")
    return {"root": root, "run": tiny_run(f"dicom:{root}", root.parent / "run")}


def assert_no_marker(npz_path) -> None:
    """No marker in the archive's names, in any string array (numpy stores them as UTF-32), nor in its bytes."""
    with np.load(npz_path) as z:
        texts = list(z.files) + [str(s) for name in z.files if z[name].dtype.kind in "US" for s in z[name].ravel()]
    assert texts and not [t for t in texts if MARKER in t.upper()]
    raw = npz_path.read_bytes()
    for encoding in ("utf-8", "utf-32-le", "utf-16-le"):
        assert MARKER.encode(encoding) not in raw, encoding


def test_embed_ids_are_file_keys_and_paths_only_when_asked(data, tmp_path, cli):
    r = cli("embed", data["run"], "--data", f"dicom:{data['root']}", "--out", tmp_path / "e.npz", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert_no_marker(tmp_path / "e.npz")
    keyed = np.load(tmp_path / "e.npz")
    assert sorted(keyed["ids"]) == sorted(key_of(p) for p in PATHS)
    r = cli("embed", data["run"], "--data", f"dicom:{data['root']}", "--out", tmp_path / "p.npz", "--quiet",
            "--ids", "path")
    assert r.exit_code == 0, r.stderr
    paths = np.load(tmp_path / "p.npz")
    assert sorted(paths["ids"]) == sorted(f"{data['root']}/{p}" for p in PATHS)  # as before: the paths found
    # the same samples in the same order, named two ways
    assert [key_of(i[len(str(data["root"])) + 1:]) for i in paths["ids"]] == list(keyed["ids"])
    np.testing.assert_array_equal(paths["embeddings"], keyed["embeddings"])
    r = cli("embed", data["run"], "--data", f"dicom:{data['root']}", "--out", tmp_path / "x.npz", "--ids", "name")
    assert r.exit_code == 2 and "'name' is not one of 'key', 'path'" in r.stderr and not (tmp_path / "x.npz").exists()


def test_dump_keys_are_file_keys_and_paths_only_when_asked(data, tmp_path, cli):
    r = cli("data", "dump", f"dicom:{data['root']}", "--out", tmp_path / "d.npz")
    assert r.exit_code == 0, r.stderr
    assert_no_marker(tmp_path / "d.npz")
    r = cli("data", "dump", f"dicom:{data['root']}", "--out", tmp_path / "p.npz", "--ids", "path")
    assert r.exit_code == 0, r.stderr
    with np.load(tmp_path / "d.npz") as keyed, np.load(tmp_path / "p.npz") as paths:
        assert sorted(k for k in keyed.files if k != "__meta__") == sorted(key_of(p) for p in PATHS)
        assert sorted(k for k in paths.files if k != "__meta__") == sorted(PATHS)
        for p in PATHS:  # each key names the array its path does
            np.testing.assert_array_equal(keyed[key_of(p)], paths[p])
        assert len({keyed[key_of(p)].tobytes() for p in PATHS}) == len(PATHS)
        named_by = [json.loads(str(z["__meta__"]))["samples_named_by"] for z in (keyed, paths)]
    assert named_by[0].startswith("file: and a keyed hash") and named_by[1].startswith("the path below the data root")


def sheet_texts(monkeypatch, cli, *args):
    """Every text of the sheet ``data preview`` draws, and its row labels."""
    figs = []
    real = preview.save_png
    monkeypatch.setattr(preview, "save_png", lambda fig, *a, **k: figs.append(fig) or real(fig, *a, **k))
    r = cli("data", "preview", *args, "--samples", len(PATHS), "--image-size", 16)
    assert r.exit_code == 0, r.stderr
    from matplotlib.text import Text

    labels = [ax.get_ylabel() for ax in figs[-1].axes if ax.get_ylabel()]
    return [t.get_text() for t in figs[-1].findobj(Text)], labels


def test_preview_rows_show_file_keys_and_file_names_only_when_asked(data, tmp_path, cli, monkeypatch):
    out = tmp_path / "p.png"
    monkeypatch.setattr(preview, "LABEL_CHARS", 200)  # the whole labels
    texts, labels = sheet_texts(monkeypatch, cli, f"dicom:{data['root']}", "--out", out)
    assert texts and not [t for t in texts if MARKER in t.upper()]
    assert sorted(lab.split("/")[-1] for lab in labels) == sorted(key_of(p) for p in PATHS)
    folders = {lab.rsplit("/", 1)[0] for lab in labels}
    assert len(folders) == 1 and folders.pop().split("/")[1].startswith("folder 1 (")  # the folder aliases stay
    assert MARKER.encode() not in out.read_bytes()
    with Image.open(out) as im:
        assert im.text and not [v for v in im.text.values() if MARKER in v.upper()]
    _, named = sheet_texts(monkeypatch, cli, f"dicom:{data['root']}", "--out", tmp_path / "n.png", "--ids", "path")
    assert sorted(named) == sorted(lab.rsplit("/", 1)[0] + "/" + p.split("/")[-1] for lab, p in zip(labels, PATHS))
