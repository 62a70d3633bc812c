"""A benchmark's work dir is resumable, and a rerun in it with other settings (budget, seed, counts,
the data, a variant's flags) is refused in one line, exit status 2, instead of reusing results made
under the first settings; a missing data folder or a bad variant flag is one line too, before any
work; the helper modules say which script to run."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.usefixtures("restores_process_state")  # main() runs here

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import _data  # noqa: E402


def script(name: str, *args, cwd: Path = BENCH) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, str(BENCH / name), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def refused(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command printed (exit status 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def folder(root: Path, n_per_class: int = 2, classes=("a", "b")) -> Path:
    """``root`` with ``n_per_class`` (empty) files per class folder."""
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            (root / c / f"person{i}_{c}.jpg").write_bytes(b"")
    return root


def state(work: Path) -> dict:
    return json.loads((work / "state.json").read_text())


def test_check_settings_refuses_in_one_line_with_exit_status_2(tmp_path, capsys):
    """A changed setting is a user error: exit status 2 (it was 1), the line on stderr."""
    st = _common.Stages(tmp_path / "w")
    assert _common.check_settings(st, "k", {"budget_min": 1, "x-y": "a"}) == {"budget_min": 1, "x-y": "a"}
    with pytest.raises(SystemExit) as exc:
        _common.check_settings(st, "k", {"budget_min": 2, "x-y": "b_c"})
    want = (f"error: {st.work} holds runs made with budget-min 1, x-y a; this run asks budget-min 2, x-y b_c: "
            "pass the same settings, or use a new --work")
    assert exc.value.code == 2 and str(exc.value) == want and capsys.readouterr().err == want + "\n"


# --- quality.py ---------------------------------------------------------------------------------------

QUALITY = dict(budget_min=0.05, batch_size=128, seed=0, pretrain_images=300, eval_train=300, eval_test=200, threads=1)
QUALITY_FLAGS = ["--budget-min", "0.05", "--batch-size", "128", "--pretrain-images", "300", "--eval-train", "300",
                 "--eval-test", "200", "--tasks", "simclr"]


def test_quality_records_its_settings_and_refuses_a_rerun_with_others(tmp_path):
    """quality.py's stage names carry only the task: a rerun with another budget, seed, count, batch or
    data archive used to reuse every stage and print the new heading over the old numbers."""
    import quality

    work, archive = tmp_path / "q", tmp_path / "cifar.tar.gz"
    (work / "raw").mkdir(parents=True)
    (work / "raw" / ".complete").write_text("")  # extracted by the first run
    a = SimpleNamespace(**QUALITY, data=archive)
    rec = quality.check_quality_settings(_common.Stages(work), a)
    assert rec == {**QUALITY, "data": str(archive.resolve())} == state(work)["settings"]
    assert quality.check_quality_settings(_common.Stages(work), a) == rec  # the same again: fine
    for change in ({"budget_min": 0.5}, {"seed": 1}, {"eval_test": 100}, {"pretrain_images": 1000},
                   {"batch_size": 64}, {"eval_train": 500}, {"threads": 2}, {"data": tmp_path / "other.tar.gz"}):
        with pytest.raises(SystemExit, match="holds runs made with .*this run asks") as exc:
            quality.check_quality_settings(_common.Stages(work), SimpleNamespace(**{**vars(a), **change}))
        assert exc.value.code == 2
    before = (work / "state.json").read_text()
    line = refused(script("quality.py", "--work", work, "--data", archive, *QUALITY_FLAGS[2:], "--budget-min", "0.5"))
    assert "budget-min 0.05; this run asks budget-min 0.5" in line
    line = refused(script("quality.py", "--work", work, "--data", tmp_path / "x.tar.gz", *QUALITY_FLAGS))
    assert f"data {archive.resolve()}; this run asks data {(tmp_path / 'x.tar.gz').resolve()}" in line
    assert (work / "state.json").read_text() == before and sorted(p.name for p in work.iterdir()) == ["raw",
                                                                                                     "state.json"]


# --- task_table.py ------------------------------------------------------------------------------------

def table_args(work: Path, **kw) -> SimpleNamespace:
    return SimpleNamespace(**{**dict(work=work, batch_size=64, budget_min=0.05, seed=0, pretrain_images=300,
                                     eval_train=300, eval_test=200, xray_budget_min=0.05, xray_images=200,
                                     xray_batch_size=32, report_only=False, variant=[], xray_variant=[]), **kw})


def test_task_table_refuses_a_variant_name_reused_with_another_spec(tmp_path):
    """A variant's stages are named by its NAME only: its spec (task, budget, flags) is recorded beside
    them and another spec under the same name refused in one line; another name is a new run."""
    from task_table_variants import check_variants

    a = table_args(tmp_path / "t", variant=["v1=simclr --base-lr 1e-3"], xray_variant=["x1=simclr --base-lr 1e-3"])
    check_variants(_common.SharedStages(a.work), a)
    rec = state(a.work)
    assert rec["spec-cifar-var-v1"] == {"cifar-var-v1": "simclr@0.05 --base-lr 1e-3"}
    assert rec["spec-xray-var-x1"] == {"xray-var-x1": "simclr@0.05 --base-lr 1e-3"}
    check_variants(_common.SharedStages(a.work), a)  # the same again: fine
    for spec in ("v1=simclr --base-lr 5e-1", "v1=simclr@1 --base-lr 1e-3", "v1=moco --base-lr 1e-3",
                 "v1=simclr --base-lr 1e-3 --batch-size 32"):
        with pytest.raises(SystemExit, match="give the --variant another NAME") as exc:
            check_variants(_common.SharedStages(a.work), table_args(a.work, variant=[spec]))
        assert exc.value.code == 2
    with pytest.raises(SystemExit, match=r"cifar-var-v1 simclr@0.05 --base-lr 1e-3; this run asks "
                                         r"cifar-var-v1 simclr@0.05 --base-lr 5e-1: give the --variant"):
        check_variants(_common.SharedStages(a.work), table_args(a.work, variant=["v1=simclr --base-lr 5e-1"]))
    with pytest.raises(SystemExit, match="give the --xray-variant another NAME"):
        check_variants(_common.SharedStages(a.work), table_args(a.work, xray_variant=["x1=simclr --base-lr 5e-1"]))
    ro = table_args(a.work, variant=["v1=simclr --base-lr 5e-1"], report_only=True)  # --report-only: refused too
    with pytest.raises(SystemExit, match="give the --variant another NAME"):
        check_variants(_common.ReadOnlyStages(a.work), ro)
    check_variants(_common.SharedStages(a.work), table_args(a.work, variant=["v2=simclr --base-lr 5e-1"]))
    assert state(a.work)["spec-cifar-var-v2"] == {"cifar-var-v2": "simclr@0.05 --base-lr 5e-1"}


def test_task_table_checks_every_variants_flags_before_any_work(tmp_path):
    """A mistyped flag (``--base-lrr``) ended in a CalledProcessError traceback after the table's runs, a
    backbone option the backbone cannot take in a traceback: each is one line, exit 2, before any run."""
    from task_table_variants import check_variants

    a = table_args(tmp_path / "t")
    for spec, said in (("v=simclr --backbone-opt depth=6", "cannot build timm:resnet18"),
                       ("v=mae --task-opt bogus=1", "unknown option 'bogus'"),
                       ("v=simclr --base-lr fast", "'fast' is not a valid float")):
        with pytest.raises(SystemExit, match=f"error: --variant '{spec}': .*{said}") as exc:
            check_variants(_common.SharedStages(a.work), table_args(a.work, variant=[spec]))
        assert exc.value.code == 2
    check_variants(_common.SharedStages(a.work), table_args(  # a good one passes
        a.work, variant=["p4=mae --backbone-opt patch_size=4 --task-opt mask_ratio=0.5 --batch-size 32"]))
    cifar = folder(tmp_path / "cifar" / "train")  # a tiny folder: the check comes before the splits
    work = tmp_path / "cli"
    line = refused(script("task_table.py", "--work", work, "--cifar", cifar.parent, "--skip-xray", "--tasks", "simclr",
                          "--budget-min", "0.05", "--variant", "v=simclr --base-lr 1e-3",
                          "--variant", "w=simclr --base-lrr 1e-3"))
    assert line.startswith("error: --variant 'w=simclr --base-lrr 1e-3': ") and "'--base-lr'" in line
    assert sorted(p.name for p in work.iterdir()) == ["state.json"]  # no split, no run


def test_task_table_records_its_data_and_refuses_other_data(tmp_path):
    """--cifar / --xray are recorded (path and file count): another folder, or the same one holding
    other images, is refused in one line instead of reusing the runs made on the first."""
    import task_table

    a = table_args(tmp_path / "t")
    cifar = folder(tmp_path / "cifar" / "train").parent
    xray = folder(tmp_path / "xray", classes=("NORMAL", "PNEUMONIA"))
    data = {**_data.data_settings("cifar", cifar), **_data.data_settings("xray", xray)}
    assert data == {"cifar": str(cifar.resolve()), "cifar_files": 4, "xray": str(xray.resolve()), "xray_files": 4}
    rec = task_table.check_table_settings(task_table.SharedStages(a.work), a, data)
    assert {k: rec[k] for k in data} == data == {k: state(a.work)["table-settings"][k] for k in data}
    folder(xray, 3, classes=("NORMAL",))  # one image more
    with pytest.raises(SystemExit, match="xray-files 4; this run asks xray-files 5"):
        task_table.check_table_settings(task_table.SharedStages(a.work), a, _data.data_settings("xray", xray))
    other = folder(tmp_path / "other" / "train").parent
    line = refused(script("task_table.py", "--work", a.work, "--cifar", other, "--skip-xray", "--tasks", "simclr",
                          "--budget-min", "0.05", "--pretrain-images", "300", "--eval-train", "300",
                          "--eval-test", "200", "--xray-budget-min", "0.05", "--xray-images", "200"))
    assert f"holds runs made with cifar {cifar.resolve()}; this run asks cifar {other.resolve()}" in line


def test_task_table_and_init_continue_say_how_to_get_missing_data(tmp_path):
    """A data folder that is not there was a FileNotFoundError traceback: one line naming the archive
    in ../shared/data, exit 2, before any work."""
    line = refused(script("task_table.py", "--work", tmp_path / "t", "--cifar", tmp_path / "nope", "--skip-xray"))
    assert f"--cifar {tmp_path / 'nope'} has no train/ folder" in line and "cifar10-train.tar.gz" in line
    cifar = folder(tmp_path / "cifar" / "train").parent
    line = refused(script("task_table.py", "--work", tmp_path / "t", "--cifar", cifar, "--xray", tmp_path / "nope"))
    assert "--xray" in line and "has no NORMAL/ folder" in line and "pneumonia-train.tar.gz" in line
    line = refused(script("init_continue.py", "--work", tmp_path / "ic", "--data-dir", tmp_path / "nope"))
    assert f"--data-dir {tmp_path / 'nope' / 'cifar'} has no train/ folder" in line and "cifar10-train" in line
    assert not (tmp_path / "ic" / "state.json").exists()


def test_a_missing_data_folder_is_extracted_from_the_archive_once(tmp_path):
    """Without a data folder the scripts extract the shared archive into the work dir (as cifar10.py and
    pneumonia.py do), through a temporary folder renamed when whole; a missing archive is one line."""
    src = folder(tmp_path / "src" / "train", classes=("NORMAL", "PNEUMONIA"))
    archive = tmp_path / "x.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname="train")
    got = _data.data_folder("--xray", None, archive, tmp_path / "w" / "data-xray", needs="NORMAL", within="train")
    assert got == (tmp_path / "w" / "data-xray" / "train").resolve()
    assert sorted(p.name for p in got.rglob("*.jpg")) == sorted(p.name for p in src.rglob("*.jpg"))
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["data-xray"]  # no temporary folder left
    archive.unlink()  # extracted once: not needed again
    assert _data.data_folder("--xray", None, archive, tmp_path / "w" / "data-xray", within="train") == got
    with pytest.raises(SystemExit, match=f"data archive {archive} does not exist: pass --xray") as exc:
        _data.data_folder("--xray", None, archive, tmp_path / "w2")
    assert exc.value.code == 2
    assert _data.data_folder("--xray", src, archive, tmp_path / "w3", needs="NORMAL") == src.resolve()


# --- label_curve.py / init_continue.py (their pretraining and scoring replaced by stand-ins) -------------

def fake_report(fractions: str) -> dict:
    fr = [float(f) for f in fractions.split(",")]
    metric = {"auroc": 0.9, "std": {"auroc": 0.01}, "train_labels": 10, "folds": [{"auroc": 0.9}] * 5}
    res = {f"{p} f={f:g}": metric for f in fr for p in ("linear", "k=20")}
    return {"settings": {"fractions": fr, "k": 20}, "results": {"pretrained": res, "random": res}}


@pytest.fixture
def curve_stubs(monkeypatch):
    """label_curve.py with stand-ins for pretraining and ``eval curve``: the runs it asks for are listed."""
    import label_curve

    asked = []

    def pretrain(stages, name, run, data, a, extra):
        def go():
            asked.append((name, data, extra))
            run.mkdir(parents=True, exist_ok=True)
            (run / "run.json").write_text(json.dumps({"backbone": "timm:resnet18", "status": "finished"}))
            return {}
        stages.run(name, go)

    monkeypatch.setattr(label_curve, "pretrain", pretrain)
    monkeypatch.setattr(label_curve, "curve", lambda stages, name, run, data, out, fractions: stages.run(
        name, lambda: fake_report(fractions)))
    monkeypatch.setattr(label_curve, "imagenet_file", lambda work, backbone: print("skip: no ImageNet weights"))

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["label_curve.py", *map(str, args)])
        label_curve.main()
    return main, asked


def test_label_curve_records_the_init_run_that_ran(tmp_path, curve_stubs):
    """The documented pair on one --work: ``--init-imagenet`` (skipped: no cached weights), then
    ``--init WORK/TASK``. The skipped stage was recorded as ``init imagenet`` and refused the second."""
    main, asked = curve_stubs
    work, data = tmp_path / "curve", folder(tmp_path / "data" / "train", classes=("NORMAL", "PNEUMONIA")).parent
    main("--work", work, "--data-dir", data, "--task", "mae", "--init-imagenet")
    assert "init" not in state(work)["settings-mae"] and [n for n, _, _ in asked] == ["pretrain-mae"]
    main("--work", work, "--data-dir", data, "--task", "mae", "--init", work / "mae")
    assert asked[-1] == ("pretrain-mae-init", data.resolve() / "train", ["--init", str(work / "mae")])
    assert state(work)["settings-mae"]["init"] == str((work / "mae").resolve())
    with pytest.raises(SystemExit, match="init .*; this run asks init .*elsewhere") as exc:
        main("--work", work, "--data-dir", data, "--task", "mae", "--init", tmp_path / "elsewhere")
    assert exc.value.code == 2
    old = tmp_path / "old"  # an older dir that recorded the skipped stage as run: the record is dropped
    main("--work", old, "--data-dir", data, "--task", "mae")
    st = state(old)
    (old / "state.json").write_text(json.dumps({**st, "settings-mae": {**st["settings-mae"], "init": "imagenet"}}))
    main("--work", old, "--data-dir", data, "--task", "mae", "--init", old / "mae")
    assert state(old)["settings-mae"]["init"] == str((old / "mae").resolve())


def test_label_curve_refuses_other_data_in_the_same_work_dir(tmp_path, curve_stubs):
    """A rerun with --data-dir of other images (here: more of them) printed the first curve, exit 0."""
    main, asked = curve_stubs
    work = tmp_path / "curve"
    small = folder(tmp_path / "small" / "train", 3, classes=("NORMAL", "PNEUMONIA")).parent
    main("--work", work, "--data-dir", small, "--steps", "4")
    assert {k: v for k, v in state(work)["settings-vicreg"].items() if k.startswith("data")} == {
        "data_dir": str((small / "train").resolve()), "data_dir_files": 6}
    full = folder(tmp_path / "full" / "train", 5, classes=("NORMAL", "PNEUMONIA")).parent
    line = refused(script("label_curve.py", "--work", work, "--data-dir", full, "--steps", "4"))
    assert (f"data-dir {small.resolve()}/train, data-dir-files 6; this run asks data-dir {full.resolve()}/train, "
            "data-dir-files 10") in line
    folder(small / "train", 5, classes=("NORMAL",))  # the same folder, other images
    assert "data-dir-files 6; this run asks data-dir-files 8" in refused(
        script("label_curve.py", "--work", work, "--data-dir", small, "--steps", "4"))
    line = refused(script("label_curve.py", "--work", tmp_path / "c2", "--data-dir", tmp_path / "nope"))
    assert "has no train/ folder" in line and "pneumonia-train.tar.gz" in line
    assert len(asked) == 1


def test_init_continue_refuses_other_data_in_the_same_work_dir(tmp_path, monkeypatch):
    import init_continue

    monkeypatch.setattr(init_continue, "pretrain", lambda stages, name, *args: stages.run(f"pretrain {name}", dict))
    monkeypatch.setattr(init_continue, "score", lambda *args, **kw: {})
    monkeypatch.setattr(init_continue, "init_settings", lambda run: "")
    monkeypatch.setattr(init_continue, "imagenet_file", lambda work, backbone: None)

    def data_dir(root: Path, n: int) -> Path:
        folder(root / "cifar" / "train", n)
        folder(root / "train", n, classes=("NORMAL", "PNEUMONIA"))
        return root

    first, work = data_dir(tmp_path / "d1", 2), tmp_path / "ic"
    monkeypatch.setattr(sys, "argv", ["init_continue.py", "--work", str(work), "--data-dir", str(first),
                                      "--only", "xray>new"])
    init_continue.main()
    rec = state(work)["settings"]
    assert (rec["cifar"], rec["cifar_files"], rec["xray"], rec["xray_files"]) == (
        str((first / "cifar").resolve()), 4, str((first / "train").resolve()), 4)
    line = refused(script("init_continue.py", "--work", work, "--data-dir", data_dir(tmp_path / "d2", 3),
                          "--only", "xray>new"))
    assert "cifar-files 4, xray" in line and "cifar-files 6, xray" in line and "use a new --work" in line


# --- helper modules ------------------------------------------------------------------------------------

def test_helper_modules_say_which_script_to_run(tmp_path):
    """``python X.py --help`` of a module that is not a script printed nothing, exit 0."""
    import os

    expect = {"_common.py": "quality.py, task_table.py", "_data.py": "cifar10.py, task_table.py",
              "first_pass.py": "data_pipeline.py or volumes.py", "lightly_tasks.py": "task_table.py --lightly",
              "task_table_report.py": "run task_table.py", "task_table_variants.py": "run task_table.py (--variant"}
    procs = {name: subprocess.Popen([sys.executable, str(BENCH / name), "--help"], cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}) for name in expect}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        line = refused(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        assert line.startswith(f"error: {name} is a helper module, not a script: run ") and expect[name] in line
        assert out == ""


def test_cifar10_and_pneumonia_refuse_another_data_archive(tmp_path):
    """cifar10.py and pneumonia.py extract --data into WORK/raw once: a rerun with another archive reused
    the first one's images and runs; the archive is in their plan now, and another refused."""
    import cifar10
    import pneumonia

    for module, extra in ((cifar10, dict(steps=3, precision="fp32", batch_size=4, budget_min=30.0)),
                          (pneumonia, dict(budget_min=0.001, image_size=32, batch_size=2, test_fraction=0.2))):
        work, archive = tmp_path / module.__name__, tmp_path / "a.tar.gz"
        a = SimpleNamespace(seed=0, eval_train=10, eval_test=10, data=archive, **extra)
        plan = module.plan(_common.Stages(work), a, 100)
        assert plan["data"] == str(archive.resolve()) and state(work)["plan"] == plan and plan["steps"] >= 2
        assert module.plan(_common.Stages(work), a, 100) == plan
        with pytest.raises(SystemExit, match=f"data {archive.resolve()}; this run asks data .*b.tar.gz") as exc:
            module.plan(_common.Stages(work), SimpleNamespace(**{**vars(a), "data": tmp_path / "b.tar.gz"}), 100)
        assert exc.value.code == 2
