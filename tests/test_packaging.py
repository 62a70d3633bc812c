"""What a fresh install gets: pyproject's metadata, the sdist's files, and sslkit without PyTorch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.specifiers import SpecifierSet
from setuptools._distutils.filelist import FileList

from sslkit.needs_torch import MESSAGE
from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# `python -c` as the `sslkit` command, with torch unimportable as where it is not installed
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
sys.argv[0] = "sslkit"
from sslkit.cli import main
main()
"""


def sslkit_without_torch(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.parametrize("args", [
    ["pretrain", "--task", "mae", "--data", "folder:IMAGES", "--out", "run"],
    ["eval", "knn", "run", "--train", "IMAGES", "--test", "IMAGES"],
    ["embed", "run", "--data", "IMAGES", "--out", "emb.npz"],
    ["export", "run", "--out", "encoder.onnx"],
    ["data", "preview", "IMAGES", "--out", "preview.png"],
])
def test_a_command_that_needs_torch_is_one_line_without_it(tmp_path, args):
    proc = sslkit_without_torch(*args, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {MESSAGE}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--help"], ["pretrain", "--help"], ["eval", "knn", "--help"]])
def test_help_works_without_torch(tmp_path, args):
    proc = sslkit_without_torch(*args, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith(f"Usage: sslkit {' '.join(args[:-1])}".rstrip() + " [OPTIONS]")


def test_listing_plugins_without_torch_is_what_loads_and_one_line(tmp_path):
    proc = sslkit_without_torch("list", "sources", cwd=tmp_path)
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["dicom", "folder", "nifti", "npz"]
    assert re.fullmatch(rf"sslkit: \d+ plugin\(s\) not loaded: {re.escape(MESSAGE)}\n", proc.stderr), proc.stderr


def test_the_torch_line_is_the_pin_of_pyproject_and_the_readme():
    pins = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith(("torch==", "torchvision=="))]
    assert MESSAGE.endswith(f"pip install {' '.join(pins)}")
    assert f"pip install {' '.join(pins)} --index-url https://download.pytorch.org/whl/cpu" in (
        REPO / "README.md").read_text()


def test_requires_python_excludes_pythons_without_tomllib():
    assert [v for v in ("3.10", "3.11", "3.12") if v in SpecifierSet(PYPROJECT["project"]["requires-python"])] == [
        "3.11", "3.12"]


def test_license_is_an_spdx_string_with_its_file():
    project = PYPROJECT["project"]
    assert (project["license"], project["license-files"]) == ("Apache-2.0", ["LICENSE"])
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150
    setuptools_req = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    assert "76.1" not in SpecifierSet(setuptools_req.removeprefix("setuptools"))  # 77: license expressions


def test_every_package_directory_is_packaged_with_its_data():
    config = PYPROJECT["tool"]["setuptools"]
    found = set()
    for top, folder in config["package-dir"].items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".tmpl", ".typed") and "__pycache__" not in path.parts:
                found.add(".".join([top, *path.parent.relative_to(REPO / folder).parts]))
    assert found == set(config["packages"])
    data = config["package-data"]
    assert "py.typed" in data["sslkit"] and (REPO / "sslkit" / "py.typed").is_file()
    assert data["sslkit.new_plugin_templates"] == ["*.tmpl"]


def sdist_files() -> set[str]:
    """What MANIFEST.in puts in the sdist besides the packages (as setuptools' sdist reads it)."""
    files = FileList()
    files.allfiles = []
    for top, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv")] if top == str(REPO) else dirs
        files.allfiles += [os.path.relpath(os.path.join(top, n), REPO) for n in names]
    for line in (REPO / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            files.process_template_line(line)
    return set(files.files)


def test_the_sdist_carries_what_the_tests_and_make_need_and_no_run():
    files = sdist_files()
    needed = {str(p.relative_to(REPO)) for p in (REPO / "tests").glob("*.py")}
    needed |= {"README.md", "BENCHMARKS.md", "Makefile", "LICENSE", "docs/plugins.md", "docs/tasks.md",
               "examples/sslkit-example-plugin/pyproject.toml", "examples/sslkit-mlflow/sslkit_mlflow.py",
               "benchmarks/cifar10.py", "benchmarks/gpu_checks.sh"}
    assert needed - files == set()
    assert [f for f in files if f.startswith(("runs/", ".venv/")) or f.endswith(".pyc") or "/build/" in f] == []


def test_a_ctrl_c_while_the_cli_imports_is_one_line():
    """The interrupts audit: a Ctrl-C in the first ~0.1 s (sslkit.cli and its imports loading, before the
    command's own handling) was a 22-line KeyboardInterrupt traceback; the console script's entry
    (sslkit.__main__:run, as pyproject.toml declares) says "aborted" and exits 130 as a later Ctrl-C does."""
    entry = PYPROJECT["project"]["scripts"]["sslkit"]
    module, func = entry.split(":")
    prelude = ("import builtins, sys\n"
               "real = builtins.__import__\n"
               "def interrupted(name, *a, **k):\n"
               "    if name == 'sslkit.cli':\n"
               "        raise KeyboardInterrupt\n"
               "    return real(name, *a, **k)\n"
               "builtins.__import__ = interrupted\n"
               f"import {module}\n"
               "sys.argv = ['sslkit', '--help']\n"
               f"{module}.{func}()\n")
    proc = subprocess.run([sys.executable, "-c", prelude], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "aborted\n", "")
