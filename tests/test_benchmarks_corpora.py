"""The benchmark scripts quoted in BENCHMARKS.md still run at HEAD: volumes.py's 3D MAE step (no 2D
image size on a volume run), the corpus scripts (a changed corpus starts from an empty folder; a
folder they did not make is never emptied), and batchnorm_recompute.py / vit_pooling.py on the
split folders task_table.py names (``-seed0`` in new work dirs, the recorded ``--eval-test``)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_images, tiny_run

pytestmark = pytest.mark.usefixtures("restores_process_state")  # main() runs here

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_volumes_trains_the_3d_mae_step_on_the_volume_size(tmp_path):
    """The 3D MAE run of volumes.py's step ratio is built without --image-size (refused on a volume
    run since c5dd505: the full run crashed at step 3); its batches are the OPTIONS' 64^3 volumes."""
    import volumes
    from step_overhead import sslkit_trainer

    root = tmp_path / "ct"
    volumes.make_corpus(root, 2, 8, 16)
    cache = tmp_path / "cache"
    real, synthetic, cpu = volumes.step_ratio(root, str(cache), 1, 1)
    assert real > 0 and synthetic > 0 and cpu > 0
    run = sslkit_trainer(f"dicom:{root}", tmp_path / "w", 2, None, task="mae", backbone="monai:vit",
                         backbone_options=dict(patch_size=16, hidden_size=48, num_layers=1, num_heads=2),
                         source_options=dict(volumes.OPTIONS), cache_dir=str(cache))
    assert tuple(run.loader.read(run.loader.indices(0, 0)).shape) == (2, 1, *volumes.SIZE)


def test_volumes_corpus_of_other_settings_starts_from_an_empty_folder(tmp_path):
    """2 series x 6 slices, then 1 x 4: the folder holds the new corpus only (the old files stayed and
    the runs mixed series); the same settings again reuse it untouched."""
    import volumes

    out = tmp_path / "ct"
    volumes.make_corpus(out, 2, 6, 16)
    assert len(list(out.rglob("*.dcm"))) == 12
    volumes.make_corpus(out, 1, 4, 16)
    assert tree(out) == [".complete", "s000"] + [f"s000/{k:05d}.dcm" for k in range(4)]
    stamp = (out / "s000" / "00000.dcm").stat().st_mtime_ns
    volumes.make_corpus(out, 1, 4, 16)
    assert (out / "s000" / "00000.dcm").stat().st_mtime_ns == stamp


@pytest.fixture
def xray_tar(tmp_path, monkeypatch):
    """make_dicom_corpus.py's source archive, 6 small JPEGs."""
    import make_dicom_corpus

    tar_path = tmp_path / "pneumonia.tar.gz"
    rng = np.random.default_rng(0)
    with tarfile.open(tar_path, "w:gz") as tar:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(buf, "JPEG")
            info = tarfile.TarInfo(f"train/NORMAL/im{i}.jpeg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    monkeypatch.setattr(make_dicom_corpus, "TAR", tar_path)
    return make_dicom_corpus


def test_dicom_corpus_of_another_count_replaces_the_old_one(xray_tar, tmp_path):
    """--count 6 then --count 3: 3 files in the folder, as the header says (the 6 stayed, and
    data_pipeline.py's first pass decoded them all)."""
    out = tmp_path / "cr"
    assert len(xray_tar.make_corpus(out, 6, 32)) == 6
    files = xray_tar.make_corpus(out, 3, 32)
    assert [f.relative_to(out).as_posix() for f in files] == sorted(p for p in tree(out) if p.endswith(".dcm"))
    assert tree(out) == [".complete", "patient0000", "patient0000/cr00000.dcm", "patient0000/cr00001.dcm",
                         "patient0000/cr00002.dcm"]


def test_an_rle_corpus_is_rle_throughout_and_decodes_as_the_mixed_ones_pixels(xray_tar, tmp_path, capsys):
    """--syntax rle (BENCHMARKS.md "First pass on an RLE Lossless corpus"): every file RLE Lossless, each
    file's pixels those of the mixed corpus's file of the same name; another corpus in its folder (its
    settings name the syntax); an unknown syntax is one line, exit code 2."""
    import pydicom
    from pydicom.uid import RLELossless

    mixed = {f.name: pydicom.dcmread(f).pixel_array for f in xray_tar.make_corpus(tmp_path / "mixed", 3, 32)}
    rle = xray_tar.make_corpus(tmp_path / "rle", 3, 32, syntax="rle")
    assert [pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in rle] == [RLELossless] * 3
    for f in rle:
        np.testing.assert_array_equal(pydicom.dcmread(f).pixel_array, mixed[f.name])
    assert (tmp_path / "rle" / ".complete").read_text().split()[-1] == "rle"
    with pytest.raises(SystemExit) as exc:
        xray_tar.make_corpus(tmp_path / "x", 3, 32, syntax="jpeg")
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_corpus_scripts_never_empty_a_folder_they_did_not_make(xray_tar, tmp_path, capsys):
    """A folder without the scripts' marker that holds anything, or a marked one holding a file the
    script does not write: one line, exit code 2, every file kept."""
    import volumes

    user = tmp_path / "mine"
    (user / "s000").mkdir(parents=True)
    (user / "s000" / "00000.dcm").write_bytes(b"a user's slice")
    for make in (lambda: xray_tar.make_corpus(user, 3, 32), lambda: volumes.make_corpus(user, 1, 4, 16)):
        with pytest.raises(SystemExit) as exc:
            make()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds no corpus this script wrote" in err
    assert tree(user) == ["s000", "s000/00000.dcm"]

    out = tmp_path / "cr"
    xray_tar.make_corpus(out, 3, 32)
    (out / "patient0000" / "notes.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(SystemExit) as exc:
        xray_tar.make_corpus(out, 6, 32)
    assert exc.value.code == 2 and "patient0000/notes.txt" in capsys.readouterr().err
    assert tree(out) == before
    with pytest.raises(SystemExit) as exc:  # the other script's corpus is not this one's to remove
        volumes.make_corpus(out, 1, 4, 16)
    assert exc.value.code == 2 and tree(out) == before


def table_work(root: Path, record: dict | None, suffix: str, test: int = 10) -> Path:
    """A task_table.py work dir: split folders named with ``suffix``, ``record`` as its table-settings."""
    split = root / "split"
    make_images(split / f"pretrain-16{suffix}", n_per_class=8, size=32, seed=0)
    make_images(split / f"bank-16{suffix}", n_per_class=8, size=32, seed=1)
    make_images(split / f"test-{test}{suffix}", n_per_class=test // 2, size=32, seed=2)
    (root / "state.json").write_text(json.dumps({"table-settings": record} if record else {"calibrate-x": 1}))
    return root


NEW = {"seed": 0, "seed_in_split_names": True, "pretrain_images": 16, "eval_train": 16, "eval_test": 10}


def test_table_splits_are_named_as_task_table_names_them(tmp_path, capsys):
    """A new work dir's folders end in -seed0 and the test folder has the recorded --eval-test
    images; an old dir's (no record) are its one folder of each kind; two to choose from: one line."""
    from batchnorm_recompute import table_splits

    new = table_work(tmp_path / "new", NEW, "-seed0")
    make_images(new / "split" / "test-2000", n_per_class=1)  # a decoy of the old fixed name
    assert {k: p.name for k, p in table_splits(new).items()} == {
        "pretrain": "pretrain-16-seed0", "bank": "bank-16-seed0", "test": "test-10-seed0"}
    assert table_splits(new, "test-2000")["test"] == new / "split" / "test-2000"
    old = table_work(tmp_path / "old", None, "")
    assert {k: p.name for k, p in table_splits(old).items()} == {
        "pretrain": "pretrain-16", "bank": "bank-16", "test": "test-10"}
    make_images(old / "split" / "test-20", n_per_class=1)
    with pytest.raises(SystemExit) as exc:
        table_splits(old)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "test-10, test-20" in err and "--test" in err


def test_batchnorm_recompute_and_vit_pooling_run_on_a_new_work_dir(tmp_path, monkeypatch, capsys):
    """Both scripts score a new work dir's runs on its -seed0 folders (they looked for bank-5000 and
    failed with a traceback): batchnorm_recompute's trained and random cells are the kNN of the run and
    of its random init on test-10-seed0; vit_pooling refuses a non-ViT run in one line, exit code 2."""
    import batchnorm_recompute
    import vit_pooling
    from _common import knn_correctness

    work = table_work(tmp_path / "work", NEW, "-seed0")
    data = f"folder:{work / 'split' / 'pretrain-16-seed0'}"
    cnn = tiny_run(data, work / "runs" / "cnn")
    vit = tiny_run(data, work / "runs" / "vit", 32, "--backbone", "timm:vit_tiny_patch16_224",
                   "--backbone-opt", "patch_size=8", "--backbone-opt", "depth=1")
    split = work / "split"
    monkeypatch.setattr(sys, "argv", ["batchnorm_recompute.py", "--work", str(work), "cnn"])
    batchnorm_recompute.main()
    row = [c.strip() for c in capsys.readouterr().out.splitlines()[-1].strip("|").split("|")]
    trained, random = (knn_correctness(cnn, split / "bank-16-seed0", split / "test-10-seed0", w) for w in (True, False))
    assert row[0] == "cnn" and len(trained) == 10
    assert row[1].split()[0] == f"{100 * trained.mean():.1f}" and row[3] == f"{100 * random.mean():.1f}"

    monkeypatch.setattr(sys, "argv", ["vit_pooling.py", "--work", str(work), "--pool", "token", "vit", "cnn"])
    with pytest.raises(SystemExit) as exc:
        vit_pooling.main()
    out = capsys.readouterr()
    assert exc.value.code == 2 and out.out == "" and out.err.count("\n") == 1 and "timm:resnet10t" in out.err
    monkeypatch.setattr(sys, "argv", ["vit_pooling.py", "--work", str(work), "--pool", "token", "vit"])
    vit_pooling.main()
    row = [c.strip() for c in capsys.readouterr().out.splitlines()[-1].strip("|").split("|")]
    torch.manual_seed(0)
    token = knn_correctness(vit, split / "bank-16-seed0", split / "test-10-seed0", True)  # simclr: the class token
    assert row[:3] == ["vit", "token", "all"] and row[3] == f"{100 * token.mean():.1f}"
