"""One process per run directory: a second `sslkit pretrain` on a running run is refused
in one line; once the holder dies (SIGKILL) the lock is free, and the next start removes
the temporary files the killed process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sslkit import checkpoint, plugins
from tests.conftest import make_images, run_sslkit
from tests.test_engine import TINY_VIT, install_probe

SSLKIT = str(Path(sys.executable).parent / "sslkit")


def test_second_process_refused_lock_freed_when_the_holder_dies_orphans_removed(tmp_path, cli, monkeypatch):
    env = {"PYTHONPATH": str(install_probe(tmp_path / "probe"))}
    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    out = tmp_path / "run"
    cmd = ["pretrain", "--task", "probe", "--data", f"folder:{images}", "--out", str(out), "--image-size", "16",
           "--batch-size", "4", "--max-steps", "100000", "--checkpoint-every", "1", "--no-cache", "--quiet",
           *[a for k, v in {**TINY_VIT, "patch_size": 8}.items() for a in ("--backbone-opt", f"{k}={v}")]]
    first = subprocess.Popen([SSLKIT, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.05)
        second = run_sslkit("pretrain", "--resume", out, "--quiet", env=env)
        assert first.poll() is None  # the first run was still training all along
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert "in use by another sslkit process" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)

    ckpts = out / "checkpoints"
    step = int(checkpoint.list_checkpoints(ckpts)[-1].name.split("-")[1])
    (ckpts / ".tmp-killed").mkdir(exist_ok=True)  # what a kill mid-checkpoint leaves (plus any real ones)
    (ckpts / ".tmp-killed" / checkpoint.MODEL_FILE).write_bytes(b"partial")
    (out / ".tmp-run.json").write_text("{")
    monkeypatch.syspath_prepend(env["PYTHONPATH"])  # the resume in-process: the same command, ~5 s less
    plugins.reset()
    again = cli("pretrain", "--resume", out, "--max-steps", str(step + 2), "--quiet")
    assert again.exit_code == 0, again.stderr  # the dead holder's lock is no obstacle
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert "removed .tmp-killed" in again.stdout


def test_a_run_started_while_another_decoded_is_not_cleared_by_its_overwrite(tmp_path, cli, monkeypatch):
    """`--overwrite` into a folder that did not exist: while this process decodes, another starts a
    run there and holds its lock. The first must be refused in one line when it comes to write, with
    the other run's files untouched (it used to clear them before asking for the lock)."""
    from sslkit.engine import session
    from sslkit.engine.lock import RunLock

    images = make_images(tmp_path / "img", n_per_class=4, size=20)
    out = tmp_path / "run"
    real_build, held = session.build, []

    def build_then_race(cfg, device):  # the data is decoded here: the other process starts meanwhile
        setup = real_build(cfg, device)
        (out / "checkpoints" / "step-00000001").mkdir(parents=True)
        for name in ("run.json", "metrics.csv", "data_report.json"):
            (out / name).write_text("the other run's\n")
        other = RunLock(out)  # another open file description: a lock this process does not hold
        other.acquire()
        held.append(other)
        return setup

    monkeypatch.setattr(session, "build", build_then_race)
    result = cli("pretrain", "--task", "simclr", "--data", f"folder:{images}", "--out", out, "--overwrite",
                 "--backbone", "timm:resnet10t", "--image-size", 16, "--batch-size", 4, "--max-steps", 1, "--quiet")
    try:
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
        assert "is in use by another sslkit process" in result.stderr
        assert all((out / n).read_text() == "the other run's\n" for n in ("run.json", "metrics.csv", "data_report.json"))
        assert (out / "checkpoints" / "step-00000001").is_dir()
    finally:
        held[0].release()


def test_overwrite_replaces_runs_only(tmp_path, cli):
    """A folder with files and no run.json is not a run: `--overwrite` refuses it, deleting nothing
    (it used to remove a metrics.csv and a checkpoints/ folder of the user's)."""
    images = make_images(tmp_path / "img", n_per_class=4, size=20)
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "notes.txt").write_text("keep\n")
    (out / "metrics.csv").write_text("mine\n")
    args = ("pretrain", "--task", "simclr", "--data", f"folder:{images}", "--backbone", "timm:resnet10t",
            "--image-size", 16, "--batch-size", 4, "--max-steps", 1, "--quiet")
    result = cli(*args, "--out", out, "--overwrite")
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: --overwrite: {str(out)!r} is not an sslkit run (no run.json) and is not empty; --overwrite "
        f"replaces runs only: give a new or empty --out")
    assert (out / "checkpoints" / "notes.txt").read_text() == "keep\n" and (out / "metrics.csv").read_text() == "mine\n"
    result = cli(*args, "--out", out)  # without --overwrite: refused, and the folder is left exactly as it was
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: run directory {str(out)!r} is not empty and is not an sslkit run (no run.json); give a new or "
        f"empty --out")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.csv"]  # no .sslkit.lock left behind
    # a parent that is a file: one line before anything is decoded (was NotADirectoryError at the end)
    (tmp_path / "afile").write_text("x")
    result = cli(*args, "--out", tmp_path / "afile" / "sub")
    assert result.exit_code == 2 and result.stderr.strip() == \
        f"error: --out {str(tmp_path / 'afile' / 'sub')!r}: {str(tmp_path / 'afile')!r} is a file, not a folder"
    # a real run is replaced, and a finished run resumed with a bound below its steps is refused
    assert cli(*args, "--out", tmp_path / "r").exit_code == 0
    (tmp_path / "r" / "eval").mkdir()
    for name in ("knn-20261205T221500Z.json", "tsne-20261205T221500Z-2.png"):  # reports on the run being replaced
        (tmp_path / "r" / "eval" / name).write_text("{}")
    (tmp_path / "r" / "notes.txt").write_text("mine\n")
    assert cli(*args, "--out", tmp_path / "r", "--overwrite").exit_code == 0
    assert not (tmp_path / "r" / "eval").exists() and (tmp_path / "r" / "notes.txt").read_text() == "mine\n"
    (tmp_path / "r" / "eval").mkdir()
    (tmp_path / "r" / "eval" / "knn-20261205T221501Z.json").write_text("{}")
    (tmp_path / "r" / "eval" / "my_notes.md").write_text("mine\n")  # the user's own file in eval/ stays
    assert cli(*args, "--out", tmp_path / "r", "--overwrite").exit_code == 0
    assert [p.name for p in (tmp_path / "r" / "eval").iterdir()] == ["my_notes.md"]
    result = cli(*args[:-3], "--max-steps", 3, "--quiet", "--out", tmp_path / "r2")
    assert result.exit_code == 0, result.output
    result = cli("pretrain", "--resume", tmp_path / "r2", "--max-steps", 2, "--quiet")
    assert result.exit_code == 2 and "already has 3 steps, more than the 2" in result.stderr, result.output


def test_a_full_disk_at_the_final_encoder_is_one_line_and_the_run_resumes(tmp_path, cli, monkeypatch):
    """safetensors wraps ENOSPC in its own error (not an OSError): the write of encoder.safetensors
    used to end in a traceback with run.json still saying "running"."""
    import json

    from safetensors import SafetensorError

    from sslkit.engine import session

    images = make_images(tmp_path / "img", n_per_class=4, size=20)
    out = tmp_path / "run"

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(session, "save_file", full)
    args = ("--backbone", "timm:resnet10t", "--image-size", 16, "--batch-size", 4, "--max-steps", 2, "--quiet")
    result = cli("pretrain", "--task", "simclr", "--data", f"folder:{images}", "--out", out, *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == (f"error: cannot write {str(out / 'encoder.safetensors')!r}: Error while serializing: I/O "
                        f"error: No space left on device (os error 28); the run's checkpoints are kept: free space, "
                        f"then --resume")
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "encoder.safetensors").exists() and not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    result = cli("pretrain", "--resume", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["status"] == "finished" and (out / "encoder.safetensors").is_file()
