"""Hostile run folders and labels files: a FIFO, a folder or /dev/zero where a run's file should be, a
run.json nested 100,000 deep, a labels CSV with a huge field. Each is one line, exit code 2, at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from sslkit.errors import UsageError
from sslkit.output_file import check_regular, file_sha256, read_json
from tests.conftest import make_images, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"fifo": "a FIFO (named pipe)", "directory": "a directory", "dev-zero": "a device"}
HANG_S = 120  # seconds a command may take before the test calls it hung (it answers in a few)
DEEP_JSON = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hostile_runs")
    data = make_images(root / "data", n_per_class=4, size=32)
    return tiny_run(f"folder:{data}", root / "run", 32), data


def put_hostile(path: Path, kind: str) -> None:
    """Replace the file ``path`` by a FIFO, a folder or a symlink to ``/dev/zero``."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")


def sslkit_within(seconds: float, *args) -> tuple[int, str]:
    """The real ``sslkit`` in a subprocess, killed (a failed test, not a hung one) after ``seconds``:
    ``(exit code, stderr)``."""
    exe = Path(sys.executable).parent / "sslkit"
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=seconds,
                          stdin=subprocess.DEVNULL)
    return done.returncode, done.stderr


def one_line_error(code: int, stderr: str) -> str:
    """The single stderr line of a command that must fail as a usage error (exit code 2)."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    return lines[0]


def hostile_command(command: str, run: Path, data: Path, out: Path) -> list[str]:
    if command == "export":
        return ["export", run, "--out", out / "x.onnx"]
    if command == "embed":
        return ["embed", run, "--data", f"folder:{data}", "--out", out / "e.npz"]
    return ["pretrain", "--task", "simclr", "--data", f"folder:{data}", "--out", out / "pt", "--init", run,
            "--max-steps", 1, "--batch-size", 8, "--image-size", 32, "--quiet"]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("command", ["export", "embed"])
def test_an_encoder_that_is_a_fifo_folder_or_device_is_refused_without_reading_it(finished, tmp_path, kind, command):
    run, data = finished
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    put_hostile(copy / "encoder.safetensors", kind)
    out = tmp_path / "out"
    out.mkdir()
    # in a subprocess with a timeout: a regression (reading the FIFO, /dev/zero) fails, it does not hang
    line = one_line_error(*sslkit_within(HANG_S, *hostile_command(command, copy, data, out)))
    assert line == (f"error: {str(copy / 'encoder.safetensors')!r} is {KINDS[kind]}, not a regular file; "
                    "sslkit reads only regular files there")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["run.json", "checkpoints/step-00000001/manifest.json"])
def test_a_run_json_or_checkpoint_manifest_that_is_a_fifo_is_refused(finished, tmp_path, name):
    run, data = finished
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    put_hostile(copy / name, "fifo")
    target = copy / "checkpoints/step-00000001" if name.startswith("checkpoints") else copy
    line = one_line_error(*sslkit_within(HANG_S, *hostile_command("export", target, data, tmp_path)))
    if target == copy:
        assert line == f"error: {str(copy / name)!r} is a FIFO (named pipe), not a regular file; " \
                       "sslkit reads only regular files there"
    else:  # the checkpoint's own check (sslkit.checkpoint.verify), which --resume goes through too
        assert line == f"error: checkpoint {str(target)!r} is unusable: manifest.json is a FIFO (named pipe), " \
                       "not a regular file"


@pytest.mark.parametrize("command", ["export", "embed", "pretrain"])
def test_a_run_json_nested_too_deeply_is_one_line(finished, tmp_path, cli, command):
    run, data = finished
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "run.json").write_text(DEEP_JSON)
    out = tmp_path / "out"
    out.mkdir()
    result = cli(*hostile_command(command, copy, data, out))  # a RecursionError would be raised here
    line = one_line_error(result.exit_code, result.stderr)
    if command != "pretrain":  # --init reads a damaged run.json as none, then the folder as plain weights
        assert line == f"error: {copy / 'run.json'} is not valid JSON: nested too deeply"
    assert list(out.iterdir()) == []


@contextmanager
def writer_for(fifo: Path):
    """Meanwhile, whoever opens ``fifo`` to read it gets an empty file (a writer opens and closes
    it): a regression that reads it then fails its test rather than hangs it."""
    stop = threading.Event()

    def serve() -> None:
        while not stop.wait(0.05):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO: no reader waits
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_read_json_and_file_sha256_never_read_a_fifo(tmp_path):
    fifo = tmp_path / "run.json"
    os.mkfifo(fifo)
    with writer_for(fifo):
        for read in (read_json, lambda p: file_sha256([p]), check_regular):
            with pytest.raises(UsageError, match=r"'.*/run.json' is a FIFO \(named pipe\), not a regular file"):
                read(fifo)
    (tmp_path / "deep.json").write_text(DEEP_JSON)
    assert read_json(tmp_path / "deep.json") == {}  # damaged: as absent (RecursionError caught)
    (tmp_path / "ok.json").write_text('{"a": 1}')
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "ok.json")  # a symlink to a regular file is read
    assert read_json(link) == {"a": 1}


@pytest.mark.parametrize("rows, expected", [
    ("a/0.png," + "x" * 140_000 + "\n",
     " line 2: not a 'path,label' CSV row (field larger than field limit (131072))"),
    ("y" * 100_000 + "\n", " line 2: expected 'path,label', got ['" + "y" * 27 + "..." + "y" * 28 + "']"),
    ("a/0.png," + "p" * 100_000 + "\na/0.png," + "q" * 100_000 + "\n",
     ": 'a/0.png' has two labels, '" + "p" * 27 + "..." + "p" * 28 + "' and '" + "q" * 27 + "..." + "q" * 28 + "'"),
])
def test_a_labels_csv_with_huge_fields_is_one_short_line(finished, tmp_path, cli, rows, expected):
    run, data = finished
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + rows)
    result = cli("eval", "knn", run, "--data", f"folder:{data}", "--labels", labels)
    line = one_line_error(result.exit_code, result.stderr)
    assert line == f"error: --labels {str(labels)!r}{expected}" and len(line) < 300 + len(str(labels))


@pytest.mark.parametrize("kind", ["deep", "fifo"])
def test_a_resume_of_a_hostile_run_json_is_one_line(finished, tmp_path, kind):
    """``pretrain --resume`` reads run.json through its own path (sslkit.config_resume): 100,000 nested
    brackets were a RecursionError traceback there, a FIFO was 'holds no sslkit run'."""
    run, _ = finished
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    if kind == "deep":
        (copy / "run.json").write_text(DEEP_JSON)
    else:
        put_hostile(copy / "run.json", "fifo")
    line = one_line_error(*sslkit_within(HANG_S, "pretrain", "--resume", copy, "--max-steps", 9, "--quiet"))
    assert line == (f"error: --resume: {copy / 'run.json'} is not a readable sslkit run.json" if kind == "deep" else
                    f"error: {str(copy / 'run.json')!r} is a FIFO (named pipe), not a regular file; sslkit reads "
                    f"only regular files there")
