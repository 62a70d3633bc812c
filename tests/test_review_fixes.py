"""Review fixes: the short checkpoint form ``RUN/checkpoints/step-N`` wherever a run is read
(embed, eval, --init), ``new-plugin --out`` onto an existing empty folder, ``eval --out X.png
--overwrite`` replacing X.json too, and ``remove_reports`` not entering a symlinked eval folder."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from sslkit.errors import UsageError
from tests.conftest import make_images, tiny_run


@pytest.fixture(scope="module")
def ck_run(tmp_path_factory) -> dict[str, Path]:
    """A one-step run with one checkpoint (``checkpoints/step-00000001``), and its labelled images."""
    root = tmp_path_factory.mktemp("review-fixes")
    images = make_images(root / "img", n_per_class=4, size=20)
    run = tiny_run(f"folder:{images}", root / "run", 16, "--checkpoint-every", "1")
    assert (run / "checkpoints" / "step-00000001").is_dir()
    return {"run": run, "images": images, "root": root}


# --- 1. RUN/checkpoints/step-N (N plain) -------------------------------------------------------------

def test_checkpoint_path_normalises_plain_step_only(ck_run):
    from sslkit.run import checkpoint_path

    ck = ck_run["run"] / "checkpoints"
    assert checkpoint_path(ck / "step-1") == ck / "step-00000001"
    assert checkpoint_path(ck / "step-00000001") == ck / "step-00000001"
    assert checkpoint_path(ck / "step-²") == ck / "step-²"  # not ASCII digits: left as it is, no ValueError
    other = ck_run["root"] / "elsewhere" / "step-1"  # not in a folder named checkpoints
    assert checkpoint_path(other) == other
    with pytest.raises(UsageError, match=r"step-00000009' does not exist; the run has step-00000001"):
        checkpoint_path(ck / "step-9")


def test_embed_short_checkpoint_form(cli, ck_run, tmp_path):
    run, images = ck_run["run"], ck_run["images"]
    r = cli("embed", run / "checkpoints" / "step-1", "--data", f"folder:{images}", "--out", tmp_path / "e.npz",
            "--device", "cpu", "--batch-size", 8)
    assert r.exit_code == 0, r.stderr
    r = cli("embed", run / "checkpoints" / "step-00000001", "--data", f"folder:{images}", "--out",
            tmp_path / "long.npz", "--device", "cpu", "--batch-size", 8)
    assert r.exit_code == 0, r.stderr
    short, long = np.load(tmp_path / "e.npz"), np.load(tmp_path / "long.npz")
    assert np.array_equal(short["embeddings"], long["embeddings"])
    r = cli("embed", run / "checkpoints" / "step-9", "--data", f"folder:{images}", "--out", tmp_path / "x.npz")
    assert r.exit_code == 2 and "the run has step-00000001" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_knn_short_checkpoint_form(cli, ck_run):
    run, images = ck_run["run"], ck_run["images"]
    r = cli("eval", "knn", run / "checkpoints" / "step-1", "--train", f"folder:{images}", "--test",
            f"folder:{images}", "--allow-overlap", "--no-baseline", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    report = json.loads(Path(r.stdout.strip().splitlines()[-1].split("report: ", 1)[1]).read_text())
    assert report["model"]["checkpoint"] == "step-00000001"
    r = cli("eval", "knn", run / "checkpoints" / "step-9", "--train", f"folder:{images}", "--test", f"folder:{images}")
    assert r.exit_code == 2 and "the run has step-00000001" in r.stderr


def test_init_short_checkpoint_form(ck_run, monkeypatch):
    from sslkit.init.resolve import recorded_init, resolve_init

    run = ck_run["run"]
    want = run / "checkpoints" / "step-00000001" / "model.safetensors"
    assert resolve_init(str(run / "checkpoints" / "step-1")).path == want
    monkeypatch.chdir(run)  # "checkpoints/step-1": one slash, but a local checkpoint, not a Hub id
    assert resolve_init("checkpoints/step-1").path.resolve() == want.resolve()
    assert recorded_init("checkpoints/step-1") == str(want.parent.resolve())
    with pytest.raises(UsageError, match="the run has step-00000001"):
        resolve_init("checkpoints/step-9")


def test_export_non_ascii_step_is_one_line(cli, ck_run, tmp_path):
    r = cli("export", ck_run["run"] / "checkpoints" / "step-²", "--out", tmp_path / "e.onnx")
    assert r.exit_code == 2 and "does not exist" in r.stderr


# --- 2. new-plugin --out onto an existing empty folder -----------------------------------------------

PACKAGE = {"pyproject.toml", "README.md", "sslkit_foo.py", "tests"}


def test_new_plugin_into_current_folder(cli, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    os.chmod(here, 0o2775)  # setgid: kept, as the folder itself is kept
    before = os.stat(here)
    monkeypatch.chdir(here)
    r = cli("new-plugin", "foo", "--kind", "task", "--out", ".")
    assert r.exit_code == 0, r.stderr
    after = os.stat(here)
    assert {p.name for p in here.iterdir()} == PACKAGE
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o2775)
    assert os.path.samefile(os.getcwd(), here)


def test_new_plugin_into_absolute_current_folder_keeps_it(cli, tmp_path, monkeypatch):
    here = tmp_path / "abs"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    r = cli("new-plugin", "foo", "--kind", "task", "--out", str(here))
    assert r.exit_code == 0, r.stderr
    assert here.stat().st_ino == inode and {p.name for p in here.iterdir()} == PACKAGE
    assert os.listdir(tmp_path) == ["abs"]  # no temporary folder left beside it


def test_new_plugin_into_symlink_to_empty_folder(cli, tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    r = cli("new-plugin", "foo", "--kind", "task", "--out", link)
    assert r.exit_code == 0, r.stderr
    assert link.is_symlink() and {p.name for p in real.iterdir()} == PACKAGE


def test_new_plugin_failed_move_leaves_nothing(cli, tmp_path, monkeypatch):
    import sslkit.new_plugin as new_plugin

    target = tmp_path / "empty"
    target.mkdir()
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(new_plugin.os, "replace", replace)
    r = cli("new-plugin", "foo", "--kind", "task", "--out", target)
    assert r.exit_code == 2 and "nothing was written" in r.stderr
    assert target.is_dir() and list(target.iterdir()) == [] and os.listdir(tmp_path) == ["empty"]


# --- 3. eval --out X.png --overwrite: X.json is the new report ---------------------------------------

#: per command: its data arguments, and the two runs' differing arguments with the report setting they show
OVERWRITE_RUNS = {
    "tsne": (["--data", "{images}"], [["--seed", "2"], ["--seed", "3"]], ("seed", 3)),
    "attention": (["--images", "{images}"], [["--max-images", "2"], ["--max-images", "3"]], ("max_images", 3)),
    "curve": (["--train", "{images}", "--test", "{images}", "--allow-overlap", "--k", "2"],
              [["--fractions", "1.0"], ["--fractions", "0.5,1.0"]], ("fractions", [0.5, 1.0])),
}


@pytest.mark.parametrize("command", sorted(OVERWRITE_RUNS))
def test_eval_overwrite_replaces_same_name_report(cli, ck_run, command):
    run, images = ck_run["run"], ck_run["images"]
    out = run / "eval" / f"my-{command}.png"
    out.parent.mkdir(exist_ok=True)  # --out's folder must exist
    data, runs, (key, value) = OVERWRITE_RUNS[command]
    data = [a.format(images=f"folder:{images}") for a in data]
    for extra in runs:
        r = cli("eval", command, run, *data, *extra, "--out", out, "--overwrite", "--device", "cpu", "--no-baseline")
        assert r.exit_code == 0, r.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"][key] == value and report["report_file"] == str(out.with_suffix(".json"))
    assert not list((run / "eval").glob(f"{command}-*.json"))  # not beside it under a new name
    r = cli("eval", command, run, *data, *runs[0], "--out", out, "--device", "cpu", "--no-baseline")
    assert r.exit_code == 2  # without --overwrite: refused, as before
    assert json.loads(out.with_suffix(".json").read_text())["settings"][key] == value


def test_save_report_overwrite_replaces_only_the_pictures_report(tmp_path):
    from sslkit.eval.report import SCHEMA, save_report

    picture = tmp_path / "my.png"
    first = {"schema": SCHEMA, "kind": "curve", "files": [str(picture)], "n": 1}
    assert save_report(first, tmp_path, picture) == tmp_path / "my.json"
    second = {"schema": SCHEMA, "kind": "curve", "files": [str(picture)], "n": 2}
    assert save_report(second, tmp_path, picture, overwrite=True) == tmp_path / "my.json"
    assert json.loads((tmp_path / "my.json").read_text())["n"] == 2
    third = {"schema": SCHEMA, "kind": "curve", "files": [str(picture)], "n": 3}
    assert save_report(third, tmp_path, picture).name.startswith("curve-")  # without overwrite: unchanged
    assert json.loads((tmp_path / "my.json").read_text())["n"] == 2
    (tmp_path / "own.json").write_text('{"mine": true}')  # the user's own file of that name stays
    fourth = {"schema": SCHEMA, "kind": "curve", "files": [str(tmp_path / "own.png")], "n": 4}
    assert save_report(fourth, tmp_path, tmp_path / "own.png", overwrite=True).name.startswith("curve-")
    assert json.loads((tmp_path / "own.json").read_text()) == {"mine": True}


# --- 4. remove_reports does not follow a symlinked eval folder -----------------------------------------

def test_remove_reports_does_not_enter_symlinked_folder(tmp_path):
    from sslkit.eval.report import remove_reports

    other = tmp_path / "other"
    other.mkdir()
    report = other / "knn-20261205T221500Z.json"
    report.write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval").symlink_to(other)
    remove_reports(tmp_path / "run" / "eval")
    assert report.is_file() and (tmp_path / "run" / "eval").is_symlink()
    own = tmp_path / "run" / "eval2"
    own.mkdir()
    (own / "knn-20261205T221500Z.json").write_text("{}")
    remove_reports(own)  # a real eval folder: its reports (and then the folder) go as before
    assert not own.exists()
