"""Hostile run folders and labels files: a FIFO, a folder or /dev/zero where a run's file should be, a
run.json nested 100,000 deep, a labels CSV with a huge field. Each is one line, exit code 2, at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from sslkit.errors import UsageError
from sslkit.output_file import check_regular, file_sha256, read_json
from tests.conftest import make_images, one_line_error, tiny_run


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


#: runs in one fresh interpreter: each command through the CLI under an alarm (a regression that reads the
#: FIFO or /dev/zero is reported as hung, not a hung test), its ``[exit code, stderr]`` printed as JSON
IN_ONE_PROCESS = """
import json, signal, sys
from click.testing import CliRunner
from sslkit.cli import main

class Hung(BaseException):  # past any 'except Exception' (or OSError) of the command
    pass

def hung(*_):
    raise Hung

signal.signal(signal.SIGALRM, hung)
answers = {}
for name, args in json.loads(sys.argv[1]).items():
    signal.alarm(int(sys.argv[2]))
    try:
        result = CliRunner().invoke(main, args)
        answers[name] = [result.exit_code, result.stderr + (repr(result.exception) if result.exit_code == 1 else "")]
    except Hung:
        answers[name] = [None, f"hung: no answer in {sys.argv[2]} s"]
    finally:
        signal.alarm(0)
print(json.dumps(answers))
"""


def hostile_cases(run: Path, data: Path, root: Path) -> dict[str, list[str]]:
    """Every command of the tests below that meets a hostile file, each on its own copy of the run."""
    cases = {}

    def copy_of(name: str) -> Path:
        return Path(shutil.copytree(run, root / name / "run"))

    for kind in KINDS:
        for command in ("export", "embed"):
            copy = copy_of(f"encoder-{command}-{kind}")
            put_hostile(copy / "encoder.safetensors", kind)
            (copy.parent / "out").mkdir()
            cases[f"encoder-{command}-{kind}"] = hostile_command(command, copy, data, copy.parent / "out")
    for name in ("run.json", "checkpoints/step-00000001/manifest.json"):
        copy = copy_of(f"fifo-{Path(name).name}")
        put_hostile(copy / name, "fifo")
        target = copy / "checkpoints/step-00000001" if name.startswith("checkpoints") else copy
        cases[f"fifo-{Path(name).name}"] = hostile_command("export", target, data, copy.parent)
    for kind in ("deep", "fifo"):
        copy = copy_of(f"resume-{kind}")
        if kind == "deep":
            (copy / "run.json").write_text(DEEP_JSON)
        else:
            put_hostile(copy / "run.json", "fifo")
        cases[f"resume-{kind}"] = ["pretrain", "--resume", copy, "--max-steps", 9, "--quiet"]
    return {name: [str(a) for a in args] for name, args in cases.items()}


@pytest.fixture(scope="module")
def answers(finished, tmp_path_factory) -> dict:
    """The real CLI on each hostile case, all in one subprocess (one start-up of torch, not ten): ``(result,
    root of the case)`` by case name, the result with the command's ``exit_code`` and ``stderr``."""
    root = tmp_path_factory.mktemp("hostile_cases")
    cases = hostile_cases(*finished, root)
    done = subprocess.run([sys.executable, "-c", IN_ONE_PROCESS, json.dumps(cases), str(HANG_S)],
                          capture_output=True, text=True, timeout=HANG_S * len(cases), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (SimpleNamespace(exit_code=code, stderr=err), root / name)
            for name, (code, err) in json.loads(done.stdout.splitlines()[-1]).items()}


def hostile_command(command: str, run: Path, data: Path, out: Path) -> list[str]:
    if command == "export":
        return ["export", run, "--out", out / "x.onnx"]
    if command == "embed":
        return ["embed", run, "--data", f"folder:{data}", "--out", out / "e.npz"]
    return ["pretrain", "--task", "simclr", "--data", f"folder:{data}", "--out", out / "pt", "--init", run,
            "--max-steps", 1, "--batch-size", 8, "--image-size", 32, "--quiet"]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("command", ["export", "embed"])
def test_an_encoder_that_is_a_fifo_folder_or_device_is_refused_without_reading_it(answers, kind, command):
    result, root = answers[f"encoder-{command}-{kind}"]
    copy = root / "run"
    assert one_line_error(result) == (f"error: {str(copy / 'encoder.safetensors')!r} is {KINDS[kind]}, not a "
                                            "regular file; sslkit reads only regular files there")
    assert list((root / "out").iterdir()) == []


@pytest.mark.parametrize("name", ["run.json", "checkpoints/step-00000001/manifest.json"])
def test_a_run_json_or_checkpoint_manifest_that_is_a_fifo_is_refused(answers, name):
    result, root = answers[f"fifo-{Path(name).name}"]
    line, copy = one_line_error(result), root / "run"
    if name == "run.json":
        assert line == f"error: {str(copy / name)!r} is a FIFO (named pipe), not a regular file; " \
                       "sslkit reads only regular files there"
    else:  # the checkpoint's own check (sslkit.checkpoint.verify), which --resume goes through too
        assert line == f"error: checkpoint {str(copy / 'checkpoints/step-00000001')!r} is unusable: manifest.json " \
                       "is a FIFO (named pipe), not a regular file"


@pytest.mark.parametrize("command", ["export", "embed", "pretrain"])
def test_a_run_json_nested_too_deeply_is_one_line(finished, tmp_path, cli, command):
    run, data = finished
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "run.json").write_text(DEEP_JSON)
    out = tmp_path / "out"
    out.mkdir()
    result = cli(*hostile_command(command, copy, data, out))  # a RecursionError would be raised here
    line = one_line_error(result)
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
    line = one_line_error(result)
    assert line == f"error: --labels {str(labels)!r}{expected}" and len(line) < 300 + len(str(labels))


@pytest.mark.parametrize("kind", ["deep", "fifo"])
def test_a_resume_of_a_hostile_run_json_is_one_line(answers, kind):
    """``pretrain --resume`` reads run.json through its own path (sslkit.config_resume): 100,000 nested
    brackets were a RecursionError traceback there, a FIFO was 'holds no sslkit run'."""
    result, root = answers[f"resume-{kind}"]
    line, copy = one_line_error(result), root / "run"
    assert line == (f"error: --resume: {copy / 'run.json'} is not a readable sslkit run.json" if kind == "deep" else
                    f"error: {str(copy / 'run.json')!r} is a FIFO (named pipe), not a regular file; sslkit reads "
                    f"only regular files there")
