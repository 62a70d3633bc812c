"""Outputs under faults: a read-only run folder, an interrupted or failed write, a ``kill -9``d writer,
two writers racing for one name, ``--overwrite`` beside the user's files, a ``new-plugin`` that fails
half-way. Each is one line and exit 2 where it is the user's, and never loses or leaves files."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sslkit.errors import UsageError
from sslkit.output_file import check_output, write_atomic
from tests.conftest import make_images, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A one-step run (16 px, resnet10t) and its labelled data."""
    root = tmp_path_factory.mktemp("faults")
    data = make_images(root / "data", n_per_class=4, size=16)
    return {"run": tiny_run(f"folder:{data}", root / "run", 16), "data": data}


def _read_only(monkeypatch, under: Path) -> None:
    """Files under ``under`` cannot be created (as on a read-only mount; root ignores chmod)."""
    mkstemp, mkdir = tempfile.mkstemp, os.mkdir

    def refuse(path) -> None:
        if Path(os.path.abspath(path)).is_relative_to(under.absolute()):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def no_mkstemp(*args, **kw):
        refuse(kw.get("dir") or ".")
        return mkstemp(*args, **kw)

    def no_mkdir(path, *args, **kw):
        refuse(path)
        return mkdir(path, *args, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", no_mkstemp)
    monkeypatch.setattr(os, "mkdir", no_mkdir)


def _one_line(result, *words: str) -> str:
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("command", ["knn", "tsne"])
def test_eval_on_a_read_only_run_is_one_line_before_any_work(run, cli, monkeypatch, tmp_path, command):
    """Defect 1: it embedded everything, then crashed writing ``RUN/eval`` (tsne --out: after its PNG)."""
    import sslkit.embed

    def no_work(*args, **kw):
        raise AssertionError("embedded before the report folder was checked")

    monkeypatch.setattr(sslkit.embed, "embed", no_work)
    _read_only(monkeypatch, run["run"])
    args = (["--train", run["data"], "--test", run["data"], "--allow-overlap"] if command == "knn"
            else ["--data", run["data"], "--out", tmp_path / "map.png"])
    _one_line(cli("eval", command, run["run"], *args), "eval", "Read-only file system")
    assert not (run["run"] / "eval").exists() and list(tmp_path.iterdir()) == []


def test_a_report_folder_that_cannot_be_made_is_a_usage_error(tmp_path, monkeypatch):
    """Defect 1: any OSError while saving a report (here: creating its folder) is one line, not a traceback."""
    from sslkit.eval.report import new_report, save_report

    _read_only(monkeypatch, tmp_path / "run")
    with pytest.raises(UsageError, match="Read-only file system"):
        save_report(new_report("knn", {}, {}), tmp_path / "run" / "eval")


def test_an_interrupted_report_leaves_no_empty_placeholder(tmp_path):
    """Defect 2: the report's name was reserved by an empty file, left by Ctrl-C, SIGTERM or a full disk."""
    from sslkit.eval.report import new_report, save_report

    class Interrupted:
        def __str__(self) -> str:
            raise KeyboardInterrupt  # Ctrl-C (SIGTERM unwinds the same way) while the report is written

    report = new_report("knn", {}, {"odd": Interrupted()})
    with pytest.raises(KeyboardInterrupt):
        save_report(report, tmp_path / "eval")
    assert [p.name for p in (tmp_path / "eval").iterdir()] == []
    report["settings"] = {}
    first, second = save_report(dict(report), tmp_path / "eval"), save_report(dict(report), tmp_path / "eval")
    assert first != second and json.loads(second.read_text())["report_file"] == str(second)


def test_a_full_disk_during_tsne_leaves_no_empty_picture(run, cli, monkeypatch):
    """Defect 2: ``tsne-<stamp>.png`` stayed, 0 bytes, after the write failed."""
    import sslkit.output_file

    def full(path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sslkit.output_file, "fsync_path", full)
    _one_line(cli("eval", "tsne", run["run"], "--data", run["data"], "--no-baseline", "--quiet"),
              "No space left on device")
    left = [p for p in (run["run"] / "eval").glob("*")] if (run["run"] / "eval").exists() else []
    assert left == [], left


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_name_their_writer_and_a_dead_writers_old_ones_are_removed(tmp_path):
    """Defect 3: ``kill -9`` during a write left ``.tmp-*`` files forever."""
    from sslkit.output_file import _host, remove_stale_temps

    dead, now, host = _dead_pid(), time.time(), _host()
    other = "000000" if host != "000000" else "ffffff"  # another machine's, on a shared file system
    names = {"dead_old": f".tmp-{dead}@{host}-abc.npz", "dead_new": f".tmp-{dead}@{host}-def.npz",
             "mine": f".tmp-{os.getpid()}@{host}-ghi", "alive": f".tmp-{os.getppid()}@{host}-jkl",
             "other_machine": f".tmp-{dead}@{other}-mno", "checkpoint_style": ".tmp-killed", "user": "notes.txt",
             "user_tmpish": ".tmp-1234x-mine"}
    for key, name in names.items():
        (tmp_path / name).write_text(key)
        if key != "dead_new":
            os.utime(tmp_path / name, (now - 3600, now - 3600))
    (tmp_path / f".tmp-{dead}@{host}-folder").mkdir()
    os.utime(tmp_path / f".tmp-{dead}@{host}-folder", (now - 3600, now - 3600))
    seen = []
    write_atomic(tmp_path / "emb.npz", lambda tmp: (seen.append(tmp.name), tmp.write_text("x")), mode=0o600)
    assert seen[0].startswith(f".tmp-{os.getpid()}@{host}-") and seen[0].endswith(".npz")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*(n for k, n in names.items() if k != "dead_old"), f".tmp-{dead}@{host}-folder", "emb.npz"])
    assert stat.S_IMODE((tmp_path / "emb.npz").stat().st_mode) == 0o600
    assert remove_stale_temps(tmp_path) == []


def test_a_second_writer_is_refused_not_silently_replaced(tmp_path):
    """Defect 5: both of two ``embed --out same.npz`` said saved; one result was lost."""
    out = tmp_path / "same.npz"
    check_output(out, overwrite=False, suffix=".npz")

    def other_writer_finishes_first(tmp: Path) -> None:
        tmp.write_text("mine")
        out.write_text("theirs")

    with pytest.raises(UsageError, match=r"already exists .*; pass --overwrite"):
        write_atomic(out, other_writer_finishes_first, suffix=".npz")
    assert out.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["same.npz"]
    check_output(out, overwrite=True, suffix=".npz")  # --overwrite: replaced, as before
    write_atomic(out, lambda tmp: tmp.write_text("mine"), suffix=".npz")
    assert out.read_text() == "mine"


def test_overwrite_keeps_the_users_files_in_checkpoints_and_tensorboard(tmp_path, capsys):
    """Defect 4: ``pretrain --overwrite`` deleted ``checkpoints/`` and ``tensorboard/`` whole."""
    from sslkit.run import RunConfig, prepare_run_dir

    out = tmp_path / "run"
    ours = ["run.json", "checkpoints/step-00000002/model.safetensors", "checkpoints/step-00000002/state.pt",
            "checkpoints/step-00000002/manifest.json", "checkpoints/.tmp-abc/model.safetensors",
            "checkpoints/step-00000001/manifest.json", "tensorboard/events.out.tfevents.1765000000.host.123.0"]
    mine = ["checkpoints/notes.txt", "checkpoints/step-00000002-best/model.safetensors", "tensorboard/plot.png"]
    for rel in ours + mine:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("{}")
    elsewhere = tmp_path / "shared-eval"  # a symlinked folder is never entered (its files were deleted)
    elsewhere.mkdir()
    (elsewhere / "knn-20261206T000000Z.json").write_text("{}")
    (out / "eval").symlink_to(elsewhere)
    (out / "tensorboard" / "other").symlink_to(elsewhere)
    cfg = RunConfig(task="simclr", data="folder:x", out=str(out), overwrite=True)
    prepare_run_dir(cfg)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    assert left == sorted(mine) and (elsewhere / "knn-20261206T000000Z.json").exists()
    assert not (out / "checkpoints" / ".tmp-abc").exists() and not (out / "checkpoints" / "step-00000001").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(rel in err for rel in mine), err
    from sslkit.checkpoint import list_checkpoints  # a user's copy is no checkpoint to rotate away

    assert list_checkpoints(out / "checkpoints") == []
    (out / "checkpoints" / "step-00000003").mkdir()  # a file of the user's where the new run will save
    (out / "checkpoints" / "step-00000003" / "why.txt").write_text("mine")
    (out / "run.json").write_text("{}")
    with pytest.raises(UsageError, match="^--overwrite: checkpoints/step-00000003/why.txt is not sslkit's, and the "
                                         "new run's checkpoint of that step would replace its folder; move it first$"):
        prepare_run_dir(cfg)
    assert (out / "run.json").exists() and (out / "checkpoints" / "step-00000003" / "why.txt").exists()


def test_new_plugin_that_fails_half_way_leaves_nothing_and_can_be_rerun(tmp_path, monkeypatch, cli):
    """Defect 6: a full disk left a half-written package, and the rerun was refused ('not empty')."""
    write_text, calls = Path.write_text, []

    def fills_up(self, *args, **kw):
        calls.append(self)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kw)

    monkeypatch.setattr(Path, "write_text", fills_up)
    _one_line(cli("new-plugin", "demo", "--kind", "task", "--out", tmp_path / "pkg"), "No space left on device")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Path, "write_text", write_text)
    result = cli("new-plugin", "demo", "--kind", "task", "--out", tmp_path / "pkg")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pkg" / "sslkit_demo.py").is_file() and [p.name for p in tmp_path.iterdir()] == ["pkg"]
    assert stat.S_IMODE((tmp_path / "pkg").stat().st_mode) != 0o700  # not mkdtemp's private mode


@pytest.mark.parametrize("name, suggestion", [("1abc", "--task abc"), ("123", None)])
def test_new_plugin_suggests_only_a_valid_name(cli, tmp_path, name, suggestion):
    err = _one_line(cli("new-plugin", name, "--kind", "task", "--out", tmp_path / "x"), "lower-case")
    assert (suggestion in err) if suggestion else "e.g." not in err, err
    assert f"--task {name}" not in err and not (tmp_path / "x").exists()


def test_overwrite_that_cannot_remove_a_file_is_one_line_and_keeps_the_run_record(tmp_path, monkeypatch):
    """A file --overwrite could not remove (read-only, another user's) was a traceback, after run.json,
    the encoder and metrics.csv were already gone."""
    from sslkit import run_clear
    from sslkit.run import RunConfig, prepare_run_dir

    out = tmp_path / "run"
    for rel in ("run.json", "encoder.safetensors", "checkpoints/step-00000002/state.pt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("{}")
    real = os.unlink

    def refuses(path, *args, **kw):
        if str(path).endswith("state.pt"):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(run_clear.os, "unlink", refuses)
    with pytest.raises(UsageError, match=r"^--overwrite: cannot remove .*state\.pt: Operation not permitted; the old "
                                         r"run is partly removed$"):
        prepare_run_dir(RunConfig(task="simclr", data="folder:x", out=str(out), overwrite=True))
    assert (out / "run.json").exists() and (out / "encoder.safetensors").exists()


def test_a_temporary_file_whose_writer_holds_its_lock_is_never_removed(tmp_path):
    """A writer in another PID namespace (a container sharing the folder, the same host name) has a pid
    that looks dead here: its temporary file of a long export was removed mid-write."""
    import fcntl

    from sslkit.output_file import _host, remove_stale_temps

    dead, now = _dead_pid(), time.time()
    busy = tmp_path / f".tmp-{dead}@{_host()}-busy.onnx"
    busy.write_text("half")
    os.utime(busy, (now - 3600, now - 3600))
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as write_atomic holds it while writing
        assert remove_stale_temps(tmp_path) == [] and busy.exists()
    finally:
        os.close(fd)
    assert remove_stale_temps(tmp_path) == [busy.name] and not busy.exists()  # the writer gone: removed


def test_overwrite_never_replaces_a_pipe_or_a_device(tmp_path):
    """--overwrite replaced whatever sat at the path, a FIFO included."""
    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="is not a regular file"):
        check_output(fifo, overwrite=True, suffix=".npz")
    with pytest.raises(UsageError, match="is not a regular file"):
        check_output(Path("/dev/null"), overwrite=True)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_overwrite_through_links_and_a_users_old_folder(tmp_path, monkeypatch):
    """A second review: a symlinked ``checkpoints/`` kept the old run's checkpoints, which ``--resume`` then
    took; a symlinked ``step-<8 digits>`` was "kept" and then replaced; a user's ``checkpoints/.old-mine/``
    was deleted whole; a report that could not be removed was a traceback after the run files were gone."""
    from sslkit.run import RunConfig, prepare_run_dir

    cfg = lambda out: RunConfig(task="simclr", data="folder:x", out=str(out), overwrite=True)  # noqa: E731
    shared = tmp_path / "shared"
    (shared / "step-00000006").mkdir(parents=True)
    (shared / "step-00000006" / "model.safetensors").write_text("{}")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "run.json").write_text("{}")
    (linked / "checkpoints").symlink_to(shared)
    with pytest.raises(UsageError, match="^--overwrite: checkpoints is a link to .*shared', which holds sslkit's "
                                         "files of a run; --overwrite never deletes through a link"):
        prepare_run_dir(cfg(linked))
    assert (shared / "step-00000006" / "model.safetensors").exists() and (linked / "run.json").exists()

    step_link = tmp_path / "step-link"
    (step_link / "checkpoints").mkdir(parents=True)
    (step_link / "checkpoints" / "step-00000002").symlink_to(tmp_path / "shared")
    (step_link / "run.json").write_text("{}")
    with pytest.raises(UsageError, match="checkpoints/step-00000002 is not sslkit's"):
        prepare_run_dir(cfg(step_link))

    old = tmp_path / "old"
    (old / "checkpoints" / ".old-mine" / "deep").mkdir(parents=True)
    (old / "run.json").write_text("{}")
    (old / "checkpoints" / ".old-mine" / "deep" / "notes.txt").write_text("precious")
    (old / "checkpoints" / ".old-x1" / "step-00000003").mkdir(parents=True)  # a killed save's: sslkit's
    (old / "checkpoints" / ".old-x1" / "step-00000003" / "state.pt").write_text("{}")
    prepare_run_dir(cfg(old))
    assert (old / "checkpoints" / ".old-mine" / "deep" / "notes.txt").read_text() == "precious"
    assert not (old / "checkpoints" / ".old-x1").exists()

    report = tmp_path / "report"
    (report / "eval").mkdir(parents=True)
    (report / "eval" / "knn-20261206T000000Z.json").write_text("{}")
    (report / "run.json").write_text("{}")
    real = os.unlink

    def refuses(path, *args, **kw):
        if str(path).endswith(".json") and "eval" in str(path):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", refuses)
    with pytest.raises(UsageError, match="cannot remove .*knn-20261206T000000Z.json: Operation not permitted"):
        prepare_run_dir(cfg(report))
    assert (report / "run.json").exists()


def test_resume_auto_and_checkpoint_paths_agree_with_the_checkpoints_a_resume_takes(tmp_path, monkeypatch):
    """``--resume auto`` counted a user's ``checkpoints/step-best`` as a checkpoint (and resumed with none);
    ``step-5`` given from inside ``RUN/checkpoints`` was "does not exist"."""
    from sslkit.run import auto_resume, checkpoint_path

    run = tmp_path / "run"
    (run / "checkpoints" / "step-best").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    assert auto_resume(str(run)) == {"overwrite": True}
    (run / "checkpoints" / "step-00000005").mkdir()
    assert auto_resume(str(run)) == {"resume": True, "out": str(run)}
    monkeypatch.chdir(run / "checkpoints")
    assert checkpoint_path(Path("step-5")) == Path("step-00000005")
