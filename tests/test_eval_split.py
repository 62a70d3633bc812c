"""Evaluation without leakage: grouped k-fold on one labelled folder, overlap refused for --train/--test."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sslkit.errors import UsageError
from sslkit.eval.split import group_folds, group_keys, mean_std, parse_split


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """40 "patients", each with two identical images; the class is a coin flip per patient, unrelated
    to what the images show. A split that puts a patient's copies on both sides scores ~100 % with
    1-NN; a patient-grouped split scores about chance."""
    from sslkit.engine import pretrain
    from sslkit.run import RunConfig

    root = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(0)
    labels = ["sick" if i % 2 else "healthy" for i in rng.permutation(40)]
    for i, cls in enumerate(labels):
        (root / "data" / cls).mkdir(parents=True, exist_ok=True)
        img = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        for view in ("a", "b"):
            Image.fromarray(img).save(root / "data" / cls / f"p{i}_{view}.png")
    cfg = RunConfig(task="simclr", data=str(root / "data"), out=str(root / "run"), backbone="timm:resnet10t",
                    epochs=1, batch_size=8, image_size=16, max_steps=1, progress=False, cache_dir="")
    pretrain(cfg)
    return root


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _nested(patients, nested):
    """``data/<cls>/p7_a.png`` -> ``nested/<cls>/p7/p7_a.png``: hospital data's ``<class>/<patient>/`` layout."""
    for f in sorted((patients / "data").rglob("*.png")):
        (nested / f.parent.name / f.name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, nested / f.parent.name / f.name.split("_")[0] / f.name)
    return nested


def test_group_keys_from_pattern_folder_and_source(capsys):
    ids = ["/d/PNEUMONIA/person12_virus_3.jpg", "/d/PNEUMONIA/person12_bacteria_9.jpg",
           "/d/NORMAL/IM-0115-0001.jpg", "/d/NORMAL/NORMAL2-IM-0115-0001.jpg", "/d/x/other.jpg#2"]
    pattern = r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"
    keys = group_keys(ids, {}, pattern=pattern)
    assert keys[0] == keys[1] == "p:person12" and keys[2] == "p:IM-0115" and keys[3] == "p:NORMAL2-IM-0115"
    assert keys[4] == "f:/d/x/other.jpg"  # no match: the file is its own group (all its frames together)
    assert "matches 4 of 5 file names; the 1 others (e.g. 'other.jpg') are each their own group" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"matches none of the 5 file names \(e.g. 'person12_virus_3.jpg'\)"):
        group_keys(ids, {}, pattern=r"^(patient\d+)")  # every image its own group: a patient on both sides
    assert group_keys(ids, {}, "folder")[:3] == ["d:/d/PNEUMONIA", "d:/d/PNEUMONIA", "d:/d/NORMAL"]
    assert group_keys(ids[:1], {ids[0]: "patient-hash"})[0] == "patient-hash"
    with pytest.raises(UsageError, match="not a valid regular expression"):
        group_keys(ids, {}, pattern="(")


def test_a_pattern_never_splits_the_sources_own_patients(capsys):
    """The audit's case: on DICOM, --group-pattern '^(img\\d+)' replaced the patient key, and 4-9
    patients had images on both sides of a fold. Pattern groups that share a patient become one."""
    ids = [f"/d/{c}/{p}/img{i}.dcm" for c in ("A", "B") for p in ("p1", "p2", "p3") for i in range(2)]
    patients = {sid: "patient:" + sid.split("/")[3] for sid in ids}
    keys = group_keys(ids, patients, pattern=r"^(img\d+)")
    assert len(set(keys)) == 1  # img0 and img1 both span every patient: one group, as it must be
    assert "--group-pattern: 2 groups joined into 1" in capsys.readouterr().err
    keys = group_keys(ids, {sid: "patient:" + sid.split("/")[3] + sid.split("/")[2] for sid in ids}, "folder")
    for sid, key in zip(ids, keys):  # folders are patients here: nothing to join, nothing said
        assert key == keys[ids.index(sid.rsplit("/", 1)[0] + "/img0.dcm")]
    assert len(set(keys)) == 6 and capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="--group-pattern and --group-by folder both choose the split groups"):
        group_keys(ids, patients, "folder", pattern=r"^(img\d+)")


def test_group_folds_keep_groups_together_and_test_every_sample_once():
    rng = np.random.default_rng(1)
    groups = [f"g{i}" for i in rng.integers(0, 40, 300)]
    y = np.array([int(g[1:]) % 3 for g in groups])  # the class is a property of the group, as for patients
    folds = group_folds(y, groups, 5, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(300))
    for tr, te in folds:
        assert not {groups[i] for i in tr} & {groups[i] for i in te}
        assert set(y[te]) == {0, 1, 2}  # stratified: every class in every fold
    assert [te.tolist() for _, te in group_folds(y, groups, 5, seed=0)] == [te.tolist() for _, te in folds]
    with pytest.raises(UsageError, match="needs at least 5 groups"):
        group_folds(np.array([0, 1, 0, 1]), ["a", "a", "b", "c"], 5)
    assert parse_split("group:3") == 3
    for bad in ("group:1", "kfold:5", "group"):
        with pytest.raises(UsageError, match="group:K"):
            parse_split(bad)


def test_mean_std_over_folds():
    folds = [{"n": 10, "top1": 0.5, "balanced_accuracy": 0.5, "auroc": None, "C": 1.0},
             {"n": 12, "top1": 0.7, "balanced_accuracy": 0.6, "auroc": 0.8, "C": 10.0}]
    m = mean_std(folds)
    assert m["n"] == 22 and m["top1"] == pytest.approx(0.6) and m["auroc"] == 0.8
    assert m["std"]["top1"] == pytest.approx(np.std([0.5, 0.7], ddof=1)) and m["std"]["auroc"] is None
    assert [f["C"] for f in m["folds"]] == [1.0, 10.0]
    assert m["folds_scored"] == {"auroc": 1}  # a test fold without the positive class has no AUROC
    assert "folds_scored" not in mean_std(folds[1:])


def test_the_groupkfold_fallback_is_shuffled_by_the_seed():
    """A class with fewer groups than folds falls back to GroupKFold, which ignored --seed."""
    y = np.array([0] * 40 + [1] * 4)
    groups = [f"g{i}" for i in range(44)]
    a, b = (group_folds(y, groups, 5, seed=s) for s in (1, 2))
    assert [te.tolist() for _, te in a] != [te.tolist() for _, te in b]
    assert [te.tolist() for _, te in group_folds(y, groups, 5, seed=1)] == [te.tolist() for _, te in a]


def test_a_class_missing_from_a_folds_training_part_is_one_line_before_any_fit():
    """A probe cannot be fitted on a training part without a class it is scored on (sklearn had
    raised a traceback): a class of one patient, and a class whose patients share a test fold."""
    y, groups = np.array([0, 0, 0, 1]), ["a", "b", "c", "d"]
    with pytest.raises(UsageError, match=r"^--split group:2: class 'B' has images of one group \(patient\) only"):
        group_folds(y, groups, 2, classes=["A", "B"])
    y = np.array([0] * 6 + [1] * 2)  # class 1: patients g and h; 3 folds, fewer groups of 1 than folds
    groups = list("abcdefgh")
    folds = [(np.array([0, 1, 2, 3, 4, 5]), np.array([6, 7]))]  # both of its patients tested together
    from sslkit.eval.split import _check_classes_in_training

    with pytest.raises(UsageError, match=r"the training part of fold 1 has no image of class 'B' \(2 groups in all\)"):
        _check_classes_in_training(y, groups, 3, folds, ["A", "B"])
    for tr, _ in group_folds(y, groups, 2, seed=0, classes=["A", "B"]):  # when it holds, folds are as before
        assert set(y[tr]) == {0, 1}
    from sslkit.eval.split import fold_method

    assert fold_method(y, groups, 2).startswith("StratifiedGroupKFold")
    assert fold_method(y, groups, 3).startswith("GroupKFold")  # what the report says when it falls back


def test_cli_refuses_a_split_that_leaves_a_class_out_of_training(tmp_path, cli):
    from tests.conftest import make_images

    images = make_images(tmp_path / "img", n_per_class=4, size=16)
    for extra in sorted((images / sorted(p.name for p in images.iterdir())[1]).iterdir())[1:]:
        extra.unlink()  # the second class keeps one image: one group
    run = tmp_path / "run"
    r = cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data", f"folder:{images}",
            "--out", run, "--max-steps", "1", "--batch-size", "4", "--image-size", "16", "--quiet")
    assert r.exit_code == 0, r.output
    for kind in ("knn", "linear"):
        r = cli("eval", kind, run, "--data", f"folder:{images}", "--split", "group:2")
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert "class " in r.stderr and "has images of one group (patient) only" in r.stderr


def test_grouped_kfold_removes_the_leak_that_a_per_file_split_has(patients, cli):
    run, data = patients / "run", patients / "data"
    common = ["eval", "knn", run, "--data", data, "--split", "group:3", "--k", "1", "--no-baseline", "--json",
              "--quiet"]
    leaky = _json(cli(*common))  # source groups of a plain folder: every file is its own group
    grouped = _json(cli(*common, "--group-pattern", r"^(p\d+)_"))
    leak, fair = leaky["results"]["pretrained"]["k=1"], grouped["results"]["pretrained"]["k=1"]
    # a copy on the training side is always the nearest neighbour (about 2/3 of the pairs are split up)
    assert leak["top1"] >= 0.75 and leak["n"] == 80
    assert fair["top1"] <= 0.65 and fair["n"] == 80  # labels are noise w.r.t. the images
    assert len(fair["folds"]) == 3 and fair["top1"] == pytest.approx(np.mean([f["top1"] for f in fair["folds"]]))
    assert fair["std"]["top1"] == pytest.approx(np.std([f["top1"] for f in fair["folds"]], ddof=1))
    assert grouped["data"]["data"]["groups"] == 40 and leaky["data"]["data"]["groups"] == 80
    assert grouped["settings"]["split"]["folds"] == 3 and grouped["settings"]["split"]["group_by"] == "pattern"
    assert grouped["settings"]["split"]["method"] == "StratifiedGroupKFold (shuffled)"  # ~20 patients a class
    text = cli(*common[:-2], "--group-pattern", r"^(p\d+)_", "--quiet")
    assert text.exit_code == 0 and " ± " in text.stdout and "3-fold" in text.stdout


def test_linear_probe_over_folds_with_baseline(patients, cli):
    rep = _json(cli("eval", "linear", patients / "run", "--data", patients / "data", "--split", "group:3",
                    "--group-pattern", r"^(p\d+)_", "--C", "1", "--json", "--quiet"))
    for enc in ("pretrained", "random"):
        lin = rep["results"][enc]["linear"]
        assert lin["n"] == 80 and len(lin["folds"]) == 3 and all(f["C"] == 1.0 for f in lin["folds"])
    # the gain over folds: the mean of the per-fold differences and their SE, for every metric
    gain = rep["gain"]["pretrained - random"]["linear"]
    for key in ("top1", "balanced_accuracy", "auroc"):
        diffs = [a[key] - b[key] for a, b in zip(rep["results"]["pretrained"]["linear"]["folds"],
                                                 rep["results"]["random"]["linear"]["folds"])]
        assert gain[key] == pytest.approx(np.mean(diffs))
        assert gain[f"{key}_se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(3))
    assert gain["se"] == "over folds"


def test_the_probes_c_is_chosen_on_whole_patients(patients, cli):
    """The validation split that chooses C keeps a patient's two images together (they were split up, so a
    copy in the validation part scored every C near 1 on labels that are noise); each file its own group:
    per image, as before."""
    common = ["eval", "linear", patients / "run", "--data", patients / "data", "--split", "group:3", "--no-baseline",
              "--json", "--quiet"]
    grouped, per_file = _json(cli(*common, "--group-pattern", r"^(p\d+)_")), _json(cli(*common))
    assert grouped["settings"]["val_split"] == "group" and per_file["settings"]["val_split"] == "image"
    val = {name: [f["val_balanced_accuracy"] for f in rep["results"]["pretrained"]["linear"]["folds"]]
           for name, rep in (("grouped", grouped), ("per_file", per_file))}
    assert np.mean(val["grouped"]) < 0.8 < np.mean(val["per_file"]), val


def test_train_test_overlap_is_refused_or_reported(patients, cli, tmp_path):
    test = tmp_path / "test"
    shutil.copytree(patients / "data", test)
    for f in list(test.rglob("*_a.png"))[:3]:  # renamed copies are found by content
        f.rename(f.with_name("renamed_" + f.name))
    args = ["eval", "knn", patients / "run", "--train", patients / "data", "--test", test, "--k", "1",
            "--no-baseline", "--quiet"]
    bad = cli(*args)
    lines = bad.stderr.strip().splitlines()
    assert bad.exit_code == 2 and len(lines) == 1 and "share 80 of the 80 test images" in lines[0]
    rep = _json(cli(*args, "--allow-overlap", "--json"))
    assert rep["data"]["overlap"]["test_samples_in_train"] == 80


@pytest.mark.parametrize("extra, message", [
    (["--data", "{data}", "--train", "{data}"], "either --data"),
    (["--data", "{data}", "--split", "group:1"], "group:K"),
    (["--data", "{data}", "--split", "group:41", "--group-pattern", r"^(p\d+)_"], "needs at least 41 groups"),
    (["--train", "{data}"], "give --train and --test"),
    (["--data", "{data}", "--group-pattern", "("], "not a valid regular expression"),
    (["--data", "{data}", "--split", "group:5", "--group-pattern", r"^(patient\d+)"], "matches none of the 80 file"),
])
def test_split_user_errors_are_one_line(patients, cli, extra, message):
    result = cli("eval", "knn", patients / "run", *[a.format(data=patients / "data") for a in extra], "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_dicom_patient_key_groups_the_folds(patients, cli, tmp_path):
    """Default --group-by source on DICOM: the source's salted PatientID hash is the group, so the
    two studies of a patient (different files, different studies) stay in one fold."""
    from tests.dicom_factory import write_dicom

    rng = np.random.default_rng(3)
    rows = ["path,label"]
    for p in range(8):
        img = (rng.random((16, 16)) * 4000).astype(np.uint16)
        for s in range(2):
            write_dicom(tmp_path / "dcm" / f"scan{p}_{s}.dcm", img, patient_id=f"PID{p:03d}")
            rows.append(f"scan{p}_{s}.dcm,{'sick' if p % 2 else 'healthy'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    rep = _json(cli("eval", "knn", patients / "run", "--data", f"dicom:{tmp_path / 'dcm'}", "--split", "group:4",
                    "--labels", tmp_path / "labels.csv", "--k", "1", "--no-baseline", "--json", "--quiet"))
    assert rep["data"]["data"]["groups"] == 8 and rep["data"]["data"]["samples"] == 16
    knn = rep["results"]["pretrained"]["k=1"]
    assert knn["n"] == 16 and all(f["n"] == 4 for f in knn["folds"])  # 2 patients x 2 images per fold
    assert "PID" not in json.dumps(rep)  # no patient identifier in the report


@pytest.mark.parametrize("extra, flags", [
    (["--group-pattern", r"^(p\d+)_"], "--group-pattern applies"),
    (["--group-by", "folder"], "--group-by folder applies"),
    (["--group-pattern", r"^(p\d+)_", "--group-by", "folder"], "--group-pattern and --group-by folder apply"),
])
def test_group_flags_with_train_test_are_refused_not_ignored(patients, cli, extra, flags):
    """``--group-pattern`` / ``--group-by folder`` with ``--train/--test`` exited 0 and the report's settings
    omitted them (a split the user asked for, silently not made); refused in one line as ``--split`` is."""
    data = patients / "data"
    result = cli("eval", "knn", patients / "run", "--train", data, "--test", data, "--allow-overlap", "--k", "1",
                 "--no-baseline", *extra, "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == f"error: {flags} to --data (one labelled folder); --train/--test are already split"
    from sslkit.eval.data_args import DataArgs

    assert DataArgs(train="a", test="b", group_by="source").check() is None  # the default is no choice made
    with pytest.raises(UsageError, match="^--split applies to --data"):
        DataArgs(train="a", test="b", split="group:5").check()


def test_every_file_its_own_group_is_noted_on_stderr_and_in_the_report(patients, cli, tmp_path):
    """The default ``--split group:K`` on a plain folder makes each file its own group (a patient's two
    images on both sides of a fold) with nothing but "80 images, 80 groups" said: now one note naming
    the remedies, kept in ``settings.split.notes``; none when anything grouped the files."""
    common = ["eval", "knn", patients / "run", "--split", "group:3", "--k", "1", "--no-baseline", "--json", "--quiet"]
    result = cli(*common, "--data", patients / "data")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    note = ("--split group:3: each of the 80 groups is a single file (nothing grouped them), so a patient's images "
            "can lie on both sides of a fold; group them with --group-pattern REGEX (file name), --group-by folder, "
            "or, in an image folder, --data-opt group=REGEX (relative path)")
    assert result.stderr.count("sslkit: note:") == 1 and f"sslkit: note: {note}\n" in result.stderr
    assert rep["settings"]["split"]["notes"] == [note] and rep["data"]["data"]["groups"] == 80
    for grouping in (["--group-pattern", r"^(p\d+)_"], ["--data-opt", r"group=(p\d+)_"]):
        result = cli(*common, "--data", patients / "data", *grouping)
        rep = json.loads(result.stdout)
        assert result.exit_code == 0 and "note" not in result.stderr, result.output
        assert rep["settings"]["split"]["notes"] == [] and rep["data"]["data"]["groups"] == 40
    from sslkit.eval.split import file_groups_note

    assert file_groups_note(["f:a.png", "p:p1", "f:b.png"], 3) is None  # a pattern matched some: no note
    assert file_groups_note(["d:x", "d:y"], 2) is None and file_groups_note([], 2) is None


def test_tsne_folder_colours_hide_patient_folders_below_the_class_whatever_they_hold(patients, cli, tmp_path,
                                                                                      monkeypatch):
    """``DATA/<class>/<patient>/img.png``: a patient's folder of two images was shown by name (only
    one-image folders were aliased) in the printed classes, the report and the PNG legend."""
    from pathlib import Path

    import sslkit.eval.tsne as tsne
    from sslkit.registry import create_source

    nested = _nested(patients, tmp_path / "nested")
    for name in ("loose_1.png", "loose_2.png"):  # files of the class folder itself: its name is a label, kept
        shutil.copy(next((patients / "data" / "healthy").glob("*.png")), nested / "healthy" / name)
    legends, draw = [], tsne.draw_maps
    monkeypatch.setattr(tsne, "draw_maps", lambda panels, labels, title: legends.append(sorted(set(labels)))
                        or draw(panels, labels, title))
    result = cli("eval", "tsne", patients / "run", "--data", nested, "--out", tmp_path / "t.png", "--color-by",
                 "folder", "--perplexity", "3", "--no-baseline", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    names = sorted({p.name for p in nested.glob("*/p*") if p.is_dir()})  # 40 patient folders, two images each
    aliases = [f"folder {k} (may name a patient)" for k in range(1, 41)]
    assert len(names) == 40 and rep["classes"] == sorted(aliases + ["healthy"]) and legends == [rep["classes"]]
    assert rep["class_counts"]["plotted"]["healthy"] == 2
    assert "40 of 41 folder names" in result.stderr

    def strings(x):
        return [s for v in x.values() for s in strings(v)] if isinstance(x, dict) else \
            [s for v in x for s in strings(v)] if isinstance(x, list) else [x] if isinstance(x, str) else []

    shown = strings(rep) + strings(json.loads(Path(rep["report_file"]).read_text()))
    assert not any(n in s.split("/") or s.startswith(n + " ") or s == n for s in shown for n in names)
    src = create_source(f"folder:{nested}")  # the same aliases in every command: sorted names, numbered
    assert tsne.folder_aliases(src, src.index()) == dict(zip(names, aliases))


def test_nested_patient_folders_class_is_the_first_level_and_group_by_folder_the_patient(patients, cli, tmp_path):
    """``DATA/<class>/<patient>/img.png``: the label was the file's own folder, so eval's classes were
    the 40 patient IDs (and a split refused "class 'p7' has images of one group"). The class is the
    first folder below DATA (torchvision's ImageFolder); ``--group-by folder`` still groups by patient."""
    from sslkit.registry import create_source

    nested = _nested(patients, tmp_path / "nested")
    shutil.copy(next((patients / "data" / "sick").glob("*.png")), nested / "root.png")
    refs = create_source(f"folder:{nested}").index()
    truth = {f.name: f.parent.name for f in (patients / "data").rglob("*.png")}  # the flat tree's classes
    assert {r.path.rsplit("/", 1)[1]: r.label for r in refs} == {**truth, "root.png": None}
    (nested / "root.png").unlink()
    keys = group_keys([r.id for r in refs if r.label], {}, "folder")
    assert sorted(set(keys)) == sorted(f"d:{d}" for d in nested.glob("*/p*"))  # 40 patients, not 2 classes
    rep = _json(cli("eval", "knn", patients / "run", "--data", f"folder:{nested}", "--split", "group:3",
                    "--group-by", "folder", "--k", "1", "--no-baseline", "--json", "--quiet"))
    assert rep["class_counts"]["data"] == {"healthy": 40, "sick": 40} and rep["data"]["data"]["groups"] == 40
    assert rep["settings"]["split"]["group_by"] == "folder" and rep["results"]["pretrained"]["k=1"]["n"] == 80
    assert rep["results"]["pretrained"]["k=1"]["top1"] <= 0.65  # patients on one side: no copy leaks (see above)
