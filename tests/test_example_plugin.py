"""The third-party plugin in examples/ installs with pip, passes its own sslkit.testing
tests (what its CI runs) and works like a built-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sslkit import plugins
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "sslkit-example-plugin"


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """pip-install the example into a private folder (no cleanup needed)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True)
    assert list(Path(target).glob("sslkit_example_plugin-*.dist-info"))
    return target


@pytest.fixture
def installed(site_dir, monkeypatch) -> dict:
    """The example installed for this process (its folder on sys.path, plugins found anew)
    and for subprocesses (PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(site_dir))
    plugins.reset()
    return {"PYTHONPATH": str(site_dir)}


def test_listed_by_sslkit_plugins(installed, cli):
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    infos = {p["name"]: p for p in json.loads(result.stdout)}
    example = infos["example"]
    assert example["version"] == "0.1.0"
    assert example["tasks"] == ["relpos"] and example["sources"] == ["synthetic"]
    assert "mae" in infos  # built-ins still there


def test_not_visible_without_install(cli):
    assert "relpos" not in json.loads(cli("list", "tasks", "--json").stdout)


def test_used_by_pretrain(installed, tmp_path, cli):
    out = tmp_path / "relpos"
    result = cli("pretrain", "--task", "relpos", "--data", "synthetic:32", "--out", out,
                 "--image-size", "48", "--batch-size", "8", "--epochs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["task"] == "relpos" and info["input_spec"]["source"] == "synthetic"
    assert info["summary"]["steps"] == 4
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "accuracy" in header  # the plugin's own scalar is logged
    # The plugin's check() refuses a pairing with a one-line error.
    result = cli("pretrain", "--task", "relpos", "--data", "synthetic:8", "--out", tmp_path / "x",
                 "--image-size", "32", "--quiet")
    assert result.exit_code == 2 and "image-size >= 48" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x" / "run.json").exists()


def test_its_own_contract_tests_pass(installed):
    """``pytest examples/sslkit-example-plugin``: the plugin's CI, on sslkit.testing."""
    env = {**os.environ, **installed}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE)],
                          capture_output=True, text=True, env=env, cwd=EXAMPLE, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout


def test_imports_only_the_public_api():
    code = (EXAMPLE / "sslkit_example_plugin.py").read_text()
    imports = [ln for ln in code.splitlines() if "sslkit" in ln and ln.startswith(("from ", "import "))]
    assert imports == [ln for ln in imports if ln.startswith("from sslkit.api import ")] and imports
    assert len(code.splitlines()) < 100


@pytest.mark.parametrize("package", ["sslkit-example-plugin", "sslkit-mlflow"])
def test_each_example_package_has_the_readme_its_pyproject_names(package):
    """A plugin package's page on an index is its README: each example names one, which installs and tests
    that folder and names what the package registers."""
    import re
    import tomllib

    folder = REPO / "examples" / package
    meta = tomllib.loads((folder / "pyproject.toml").read_text())
    readme = (folder / meta["project"]["readme"]).read_text()
    assert readme.startswith(f"# {meta['project']['name']}\n")
    assert f"pip install ./examples/{package} " in readme
    assert f"pip install -e './examples/{package}[test]' && python -m pytest examples/{package}" in readme
    for entry in meta["project"]["entry-points"]["sslkit"].values():
        module = (folder / f"{entry}.py").read_text()
        assert re.search(r'^sslkit_api = "(.+)"$', module, re.M)[1] in readme
    assert f"[`{package}/`]({package})" in (REPO / "examples" / "README.md").read_text()
