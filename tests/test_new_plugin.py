"""``sslkit new-plugin``: the generated packages install, pass their own sslkit.testing tests,
and their names work in ``sslkit pretrain`` and ``sslkit export``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_sslkit

KINDS = ("task", "source", "backbone", "exporter")


def with_site(site: Path, code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in this venv's Python with ``site`` added as a site directory (so the
    editable installs' ``.pth`` finders work, as in a venv where they were installed)."""
    boot = f"import site, sys; site.addsitedir({str(site)!r}); sys.argv = [sys.argv[0], *sys.argv[1:]]; {code}"
    return subprocess.run([sys.executable, "-c", boot, *args], capture_output=True, text=True, cwd=cwd, timeout=1500)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """One package per kind, from the real CLI, pip-installed (editable) into a private site dir."""
    root = tmp_path_factory.mktemp("new-plugin")
    dirs = {}
    for kind in KINDS:
        dirs[kind] = root / f"sslkit-kit-{kind}"
        proc = run_sslkit("new-plugin", f"kit_{kind}", "--kind", kind, "--out", dirs[kind])
        assert proc.returncode == 0 and "pip install -e" in proc.stdout, proc.stderr
    site = root / "site"
    editable = [arg for d in dirs.values() for arg in ("-e", str(d))]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), *editable], check=True, capture_output=True)
    return {"root": root, "dirs": dirs, "site": site}


def test_package_layout_and_api_range(generated):
    from sslkit.api import API_VERSION

    task = generated["dirs"]["task"]
    assert sorted(p.name for p in task.iterdir()) == ["README.md", "pyproject.toml", "sslkit_kit_task.py", "tests"]
    pyproject = (task / "pyproject.toml").read_text()
    assert '[project.entry-points.sslkit]\nkit_task = "sslkit_kit_task"' in pyproject
    assert "[tool.pytest.ini_options]" in pyproject
    module = (task / "sslkit_kit_task.py").read_text()
    assert f'sslkit_api = ">={API_VERSION},<{API_VERSION + 1}"' in module
    for d in generated["dirs"].values():  # only the public API
        code = next(d.glob("sslkit_*.py")).read_text()
        imports = [ln for ln in code.splitlines() if "sslkit" in ln and ln.startswith(("from ", "import "))]
        assert imports and all(ln.startswith("from sslkit.api import ") for ln in imports), imports


def test_generated_tests_pass(generated):
    dirs = [str(d) for d in generated["dirs"].values()]
    proc = with_site(generated["site"], "import pytest; sys.exit(pytest.main())", "-q", "-p", "no:cacheprovider",
                     *dirs, cwd=generated["root"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "9 passed" in proc.stdout  # 2 per kind + the backbone's second model


def test_generated_names_work_in_pretrain_and_export(generated, tmp_path):
    data = tmp_path / "npy"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(data / f"{i}.npy", (rng.random((3, 36, 40)) * 255).astype(np.uint8))
    cli = "from sslkit.cli import main; main()"
    run = tmp_path / "run"
    proc = with_site(generated["site"], cli, "pretrain", "--task", "kit_task", "--data", f"kit_source:{data}",
                     "--backbone", "kit_backbone:small", "--out", str(run), "--image-size", "32", "--batch-size", "4",
                     "--max-steps", "2", "--epochs", "1", "--quiet", "--no-cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((run / "run.json").read_text())
    assert (info["task"], info["input_spec"]["source"], info["backbone"]) == ("kit_task", "kit_source",
                                                                              "kit_backbone:small")
    assert info["input_spec"]["channels"] == 3 and info["summary"]["steps"] == 2
    out = tmp_path / "encoder.npz"
    proc = with_site(generated["site"], cli, "export", str(run), "--format", "kit_exporter", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "exported kit_exporter" in proc.stdout
    with np.load(out) as saved:
        assert json.loads(str(saved["__sslkit__"]))["task"] == "kit_task"


def test_refuses_to_overwrite_and_bad_names(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    proc = run_sslkit("new-plugin", "demo", "--kind", "task", "--out", tmp_path / "taken")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "not empty" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["keep.txt"]
    proc = run_sslkit("new-plugin", "My-Plugin", "--kind", "task", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "lower-case" in proc.stderr and not (tmp_path / "x").exists()
