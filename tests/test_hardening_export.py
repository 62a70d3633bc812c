"""Issue 13, export side: no machine paths in ONNX files, a full disk during export, the
safetensors README snippet, `pretrain` without --out, one --device default, `make test`
progress. Everything through the CLI, as a user meets it: the real executable where the
process matters (a full disk, a file-size limit), in-process otherwise."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import onnx
import pytest

from tests.conftest import REPO, make_images, run_sslkit, tiny_run

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A gray 8-bit image folder and a 1-step SimCLR run of resnet10t on it."""
    root = tmp_path_factory.mktemp("hardening")
    data = make_images(root / "gray", n_per_class=4, size=40, channels=1)
    return {"root": root, "data": data, "run": tiny_run(f"folder:{data}", root / "run", SIZE)}


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- 5: no paths of the build machine in the ONNX file ------------------------------------
# (checked on the CLI export of test_export.py::test_onnx_export_contract, sparing an export)

def assert_no_machine_paths(file: Path, *places: Path) -> None:
    """``file``'s bytes name none of ``places``, the repository, the venv, site-packages,
    torch, $HOME or the temp dir; an ONNX file keeps only sslkit's metadata entry."""
    blob = file.read_bytes()
    places = {**{f"given {i}": p for i, p in enumerate(places)}, "repository": REPO, "venv": sys.prefix,
              "site-packages": sysconfig.get_paths()["purelib"], "torch": Path(__import__("torch").__file__).parent,
              "home": os.path.expanduser("~"), "tmp dir": tempfile.gettempdir() + os.sep}
    found = {what: str(p) for what, p in places.items() if len(str(p)) > 4 and str(p).encode() in blob}
    assert not found, f"{file.name} names {found}"
    if file.suffix == ".onnx":
        model = onnx.load(str(file))
        assert not any(node.metadata_props for node in model.graph.node)  # no stack traces, fx nodes, ...
        assert not model.graph.metadata_props and not any(v.metadata_props for v in model.graph.value_info)
        assert [p.key for p in model.metadata_props] == ["sslkit"]  # the client's contract stays


# -- 7 / 14: a full disk during export ------------------------------------------------------

def _namespaces_allowed() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


FULL_DISK = """set -e
d="$1"; shift
mount -t tmpfs -o size=1m tmpfs "$d"
printf precious > "$d/encoder.out"
set +e
"$@"; rc=$?
echo "LEFT: $(ls -A "$d" | tr '\\n' ' ')| $(cat "$d/encoder.out")"
exit $rc
"""


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs unshare -Urm (user + mount namespaces) for a tmpfs")
def test_onnx_export_to_a_full_disk(trained, tmp_path):
    """A 1 MB tmpfs (in a private mount namespace) holds less than the 20 MB encoder."""
    folder = tmp_path / "full"
    folder.mkdir()
    exe = Path(sys.executable).parent / "sslkit"
    cmd = ["unshare", "-Urm", "sh", "-c", FULL_DISK, "sh", str(folder), str(exe), "export", str(trained["run"]),
           "--out", str(folder / "encoder.out"), "--overwrite", "--check-data", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    _one_line_error(proc, "No space left on device", str(folder / "encoder.out"))
    assert "LEFT: encoder.out | precious" in proc.stdout  # the old file kept, no temporary file left


def test_export_refused_by_the_file_size_limit(trained, tmp_path):
    """The same failure without privileges, for the safetensors writer: RLIMIT_FSIZE makes the
    kernel refuse the write (EFBIG), as a full disk refuses it (ENOSPC)."""
    out = tmp_path / "encoder.safetensors"
    out.write_text("precious")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    exe = Path(sys.executable).parent / "sslkit"
    proc = subprocess.run([str(exe), "export", str(trained["run"]), "--out", str(out), "--format", "safetensors",
                           "--overwrite"], capture_output=True, text=True, timeout=900, preexec_fn=limit)
    _one_line_error(proc, "File too large")
    assert out.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# -- 22: the safetensors README snippet, exactly as printed ---------------------------------

def _readme_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README has {len(found)} python blocks with {containing!r}"
    return found[0]


def test_safetensors_readme_snippet_gives_the_runs_data_config(trained, tmp_path, cli):
    proc = cli("export", trained["run"], "--out", tmp_path / "encoder.safetensors", "--format", "safetensors")
    assert proc.exit_code == 0, proc.stderr
    assert_no_machine_paths(tmp_path / "encoder.safetensors", trained["run"], trained["data"], tmp_path)
    snippet = _readme_block("resolve_data_config")
    check = snippet + (
        "\nimport sys\nfrom PIL import Image\n"
        f"x = transform(Image.open({str(trained['data'] / 'a' / '0.png')!r}))\n"
        "json.dump({'config': {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},\n"
        "           'x': list(x.shape), 'logits': list(model.eval()(x[None]).shape)}, sys.stdout)\n")
    ran = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert ran.returncode == 0, ran.stderr
    got = json.loads(ran.stdout)
    spec = json.loads((trained["run"] / "run.json").read_text())["input_spec"]
    assert got["config"] == {"input_size": [1, SIZE, SIZE], "interpolation": "bilinear", "mean": spec["mean"],
                             "std": spec["std"], "crop_pct": 1.0, "crop_mode": "center"}
    assert got["x"] == [1, SIZE, SIZE] and got["logits"] == [1, 5]


# -- 17: `sslkit pretrain --task T --data DIR` without --out --------------------------------

def test_pretrain_without_out_makes_a_new_run_dir(trained, tmp_path, cli, monkeypatch):
    # Folders for the next minute's names already exist: the run must take a fresh one.
    stamp = time.time()
    taken = {time.strftime("simclr-%Y%m%d-%H%M%S", time.localtime(stamp + s)) for s in range(-1, 60)}
    for name in taken:
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "mine.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    proc = cli("pretrain", "--task", "simclr", "--data", trained["data"], "--backbone", "timm:resnet10t",
               "--image-size", SIZE, "--batch-size", 8, "--max-steps", 1, "--quiet")
    assert proc.exit_code == 0, proc.stderr
    printed = re.search(r"^run directory: (runs/simclr-\d{8}-\d{6}-2)$", proc.stdout, re.M)
    assert printed, proc.stdout
    run_dir = tmp_path / printed.group(1)
    assert (run_dir / "run.json").is_file() and f"run saved in {printed.group(1)}" in proc.stdout
    assert all((tmp_path / "runs" / name / "mine.txt").read_text() == "precious" for name in taken)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(taken | {run_dir.name})


def test_runs_started_in_the_same_second_without_out_take_two_folders(tmp_path, monkeypatch, cli):
    """The default run folder is made when it is named, so a second run in the same second (array jobs)
    takes ``-2`` instead of finding the first's folder not empty; a run that fails before writing
    anything leaves no empty folder behind."""
    from sslkit.config import default_out

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261205-120000")
    first, second = default_out("simclr", tmp_path / "runs"), default_out("simclr", tmp_path / "runs")
    assert (Path(first).name, Path(second).name) == ("simclr-20261205-120000", "simclr-20261205-120000-2")
    assert Path(first).is_dir() and Path(second).is_dir()
    monkeypatch.chdir(tmp_path)
    bad = cli("pretrain", "--task", "simclr", "--data", "folder:missing", "--quiet")
    assert bad.exit_code == 2 and "does not exist" in bad.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [Path(first).name, Path(second).name]


# -- 26: one --device default ----------------------------------------------------------------

def test_embed_and_eval_share_the_device_default():
    defaults = {}
    for command in (["embed"], ["eval", "knn"], ["eval", "linear"]):
        proc = run_sslkit(*command, "--help")
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stdout.split())
        match = re.search(r"--device TEXT .*?\[default: (\w+)\]", text)
        assert match, text
        defaults[" ".join(command)] = match.group(1)
    assert set(defaults.values()) == {"auto"}, defaults


# -- 16: the README's install line works -------------------------------------------------------

def test_readme_install_line_builds_a_complete_package(tmp_path):
    """``pip install .`` (the README's line; sslkit is not on PyPI) builds a wheel with every
    file of the tree's packages, the ``sslkit`` command and the built-in plugins' entry points."""
    readme = (REPO / "README.md").read_text()
    install = re.findall(r"^ {4}(pip install \S+)", readme, re.M)
    assert install and install[0] == "pip install .", install
    assert not re.search(r"pip install sslkit\b", readme)

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    src = tmp_path / "src"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("sslkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every file of the two packages (modules, templates), as git sees the tree
    modules = {str(p.relative_to(src)) for p in (src / "sslkit").rglob("*") if p.is_file()}
    modules |= {"sslkit_plugins/" + str(p.relative_to(src / "plugins")) for p in (src / "plugins").rglob("*")
                if p.is_file()}
    assert modules - names == set(), "pip install . would miss these files"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sslkit = sslkit.__main__:run" in text and "onnx = sslkit_plugins.exporters.onnx" in text


# -- 25: `make test` shows which file runs and how far the suite is ---------------------------

def _make_test_args() -> list[str]:
    """The pytest options of the Makefile's ``test`` recipe (its command may go on over ``\\`` lines)."""
    recipe = re.search(r"^test:.*\n\t((?:.*\\\n)*.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    return recipe.replace("\\\n", " ").split("-m pytest", 1)[1].split()


def _run_make_test_options(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", *_make_test_args(), "-c", str(REPO / "pyproject.toml"),
                           "--rootdir", str(folder), "-p", "no:cacheprovider", str(folder)],
                          cwd=folder, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # `make test` runs in the repo


def test_make_test_prints_a_line_per_test_file(tmp_path):
    """Run three tiny test files with the pytest options of the Makefile's ``test`` recipe (several processes:
    pytest-xdist and tests/file_progress.py) and the project's pytest configuration: one line per file, with
    its name, its tests' letters and the share done, in the order the files finish."""
    args = _make_test_args()
    assert "-n" in args and "tests.file_progress" in args, args
    body = "import pytest\n\n\ndef test_one():\n    pass\n\n\n@pytest.mark.skip\ndef test_two():\n    pass\n"
    for name in ("test_first.py", "test_second.py"):
        (tmp_path / name).write_text(body)
    (tmp_path / "test_third.py").write_text("def test_one():\n    assert 1 == 2\n")
    proc = _run_make_test_options(tmp_path)
    assert proc.returncode == 1, proc.stdout
    lines = re.findall(r"^(test_\w+\.py) ([.sF]+)\s+\[ *(\d+)%\]$", proc.stdout, re.M)
    assert {(name, letters) for name, letters, _ in lines} == {("test_first.py", ".s"), ("test_second.py", ".s"),
                                                                ("test_third.py", "F")}, proc.stdout
    # a line's share counts every test done by then, its own file's and those of files still running
    done = [sum(len(letters) for _, letters, _ in lines[:i + 1]) for i in range(len(lines))]
    shares = [int(share) for _, _, share in lines]
    assert shares == sorted(shares) and shares[-1] == 100, proc.stdout
    assert all(share >= n * 100 // 5 for share, n in zip(shares, done)), proc.stdout
    assert "FAILED test_third.py::test_one" in proc.stdout and not re.search(r"^[.sF]+\s+\[", proc.stdout, re.M)


def test_make_test_ends_in_seconds_naming_a_test_that_kills_its_process(tmp_path):
    """A test that takes its process down (a segfault, the OOM killer) fails the run at once, named; replacing
    the process instead, pytest-xdist 3.8 waits for good under --dist loadfile (pytest-xdist#784, #1378)."""
    for name in ("test_a.py", "test_b.py", "test_c.py"):
        (tmp_path / name).write_text("def test_one():\n    pass\n\n\ndef test_two():\n    pass\n")
    (tmp_path / "test_crash.py").write_text("import os\n\n\ndef test_crash():\n    os._exit(1)\n\n\n"
                                           "def test_after():\n    pass\n")
    proc = _run_make_test_options(tmp_path)  # its timeout: 300 s, where the run takes a few
    assert proc.returncode == 1, proc.stdout
    assert "worker 'gw" in proc.stdout and "crashed while running 'test_crash.py::test_crash'" in proc.stdout


def test_a_failed_run_never_removes_a_folder_the_user_named(tmp_path, monkeypatch, cli):
    """--out given in a config file, an empty folder of the user's: a run that fails early leaves it."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "run.toml").write_text('task = "simclr"\ndata = "folder:missing"\nout = "mine"\n')
    monkeypatch.chdir(tmp_path)
    bad = cli("pretrain", "--config", "run.toml", "--quiet")
    assert bad.exit_code == 2 and "does not exist" in bad.stderr and "run directory:" not in bad.stdout
    assert (tmp_path / "mine").is_dir()
