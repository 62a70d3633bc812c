"""``sslkit new-plugin``: the generated packages install, pass their own sslkit.testing tests,
and their names (and the source's flag) work in ``sslkit pretrain`` and ``sslkit export``.

One pip install of the five packages and one interpreter with them installed (the
generated tests, then the commands, in-process) serve every test here."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sslkit.testing.cli import sslkit
from tests.conftest import one_line_error, run_sslkit

KINDS = ("task", "source", "backbone", "exporter", "callback")

#: runs in a fresh interpreter where the packages are installed: pytest on the generated
#: packages (what their CI runs), then each sslkit command of the plan through click
INSTALLED = """
import json, sys
import pytest
from click.testing import CliRunner
from sslkit.cli import main

plan = json.loads(sys.argv[1])
results = {"pytest": int(pytest.main(["-q", "-p", "no:cacheprovider", *plan["dirs"]]))}
for name, args in plan["commands"].items():
    r = CliRunner().invoke(main, args)
    results[name] = {"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "error": repr(r.exception)}
with open(plan["results"], "w") as f:
    json.dump(results, f)
"""


def with_site(site: Path, code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in this venv's Python with ``site`` added as a site directory (so the
    editable installs' ``.pth`` finders work, as in a venv where they were installed)."""
    boot = f"import site, sys; site.addsitedir({str(site)!r}); sys.argv = [sys.argv[0], *sys.argv[1:]]; {code}"
    return subprocess.run([sys.executable, "-c", boot, *args], capture_output=True, text=True, cwd=cwd, timeout=1500)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """One package per kind from the CLI, pip-installed (editable) into a private site dir,
    then the generated tests and the plan's commands run there in one interpreter."""
    root = tmp_path_factory.mktemp("new-plugin")
    dirs = {}
    for kind in KINDS:
        dirs[kind] = root / f"sslkit-kit-{kind}"
        assert "pip install -e" in sslkit("new-plugin", f"kit_{kind}", "--kind", kind, "--out", dirs[kind])
    site = root / "site"
    editable = [arg for d in dirs.values() for arg in ("-e", str(d))]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), *editable], check=True, capture_output=True)
    data, run = root / "npy", root / "run"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(data / f"{i}.npy", (rng.random((3, 36, 40)) * 255).astype(np.uint8))
    commands = {
        "help": ["pretrain", "--help"],
        "pretrain": ["pretrain", "--task", "kit_task", "--data", f"kit_source:{data}", "--backbone", "kit_backbone:small",
                     "--out", str(run), "--image-size", "32", "--batch-size", "4", "--max-steps", "2", "--epochs", "1",
                     "--quiet", "--no-cache", "--scale", "255", "--callbacks", "csv,kit_callback"],
        "export": ["export", str(run), "--format", "kit_exporter", "--out", str(root / "encoder.npz")],
    }
    plan = {"dirs": [str(d) for d in dirs.values()], "commands": commands, "results": str(root / "results.json")}
    proc = with_site(site, INSTALLED, json.dumps(plan), cwd=root)
    assert (root / "results.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "dirs": dirs, "run": run, "proc": proc,
            "results": json.loads((root / "results.json").read_text())}


def test_package_layout_and_api_range(generated):
    from sslkit.api import API_VERSION

    task = generated["dirs"]["task"]
    assert sorted(p.name for p in task.iterdir()) == ["README.md", "pyproject.toml", "sslkit_kit_task.py", "tests"]
    pyproject = (task / "pyproject.toml").read_text()
    assert '[project.entry-points.sslkit]\nkit_task = "sslkit_kit_task"' in pyproject
    assert "[tool.pytest.ini_options]" in pyproject and "sslkit.source_flags" not in pyproject
    module = (task / "sslkit_kit_task.py").read_text()
    assert f'sslkit_api = ">={API_VERSION},<{API_VERSION + 1}"' in module
    for d in generated["dirs"].values():  # only the public API, in every module (a source has two)
        code = "\n".join(f.read_text() for f in sorted(d.glob("sslkit_*.py")))
        imports = [ln for ln in code.splitlines() if "sslkit" in ln and ln.startswith(("from ", "import "))]
        assert imports and all(ln.startswith("from sslkit.api import ") for ln in imports), imports
    source = generated["dirs"]["source"]
    assert '[project.entry-points."sslkit.source_flags"]\nkit_source = "sslkit_kit_source_flags:FLAGS"' in \
        (source / "pyproject.toml").read_text()
    flags = ast.parse((source / "sslkit_kit_source_flags.py").read_text())  # read for --help: imports nothing
    assert not [n for n in ast.walk(flags) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_generated_tests_pass(generated):
    proc = generated["proc"]
    assert generated["results"]["pytest"] == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "12 passed" in proc.stdout  # 2 per kind + the backbone's second model + the source's flags


def test_generated_source_flag_is_offered_by_pretrain(generated):
    help_ = generated["results"]["help"]
    assert help_["code"] == 0, help_
    assert "--scale TEXT" in help_["stdout"] and "[kit_source] Divide the arrays" in help_["stdout"]
    proc = run_sslkit("pretrain", "--help")  # not installed here: not offered
    assert proc.returncode == 0 and "--scale" not in proc.stdout


def test_generated_names_work_in_pretrain_and_export(generated):
    results = generated["results"]
    assert results["pretrain"]["code"] == 0, results["pretrain"]
    info = json.loads((generated["run"] / "run.json").read_text())
    assert (info["task"], info["input_spec"]["source"], info["backbone"]) == ("kit_task", "kit_source",
                                                                              "kit_backbone:small")
    assert info["input_spec"]["channels"] == 3 and info["summary"]["steps"] == 2
    logged = [json.loads(line) for line in (generated["run"] / "kit_callback.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in logged] == [1, 2, None] and logged[-1]["status"] == "finished"
    assert info["config"]["source_options"] == {"scale": "255"}  # the --scale flag reached the source
    assert info["input_spec"]["preprocessing"] == {"kit_source": {"scale": "255"}}
    assert results["export"]["code"] == 0, results["export"]
    assert "exported kit_exporter" in results["export"]["stdout"]
    with np.load(generated["root"] / "encoder.npz") as saved:
        assert json.loads(str(saved["__sslkit__"]))["task"] == "kit_task"


def test_refuses_to_overwrite_and_bad_names(tmp_path, cli):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    one_line_error(cli("new-plugin", "demo", "--kind", "task", "--out", tmp_path / "taken"), "not empty")
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["keep.txt"]
    one_line_error(cli("new-plugin", "My-Plugin", "--kind", "task", "--out", tmp_path / "x"), "lower-case")
    assert not (tmp_path / "x").exists()
    # a name an installed plugin registers for that kind: the two would be ambiguous side by side
    for name, kind, listing in (("simclr", "task", "tasks"), ("timm", "backbone", "backbones")):
        line = one_line_error(cli("new-plugin", name, "--kind", kind, "--out", tmp_path / name))
        assert line == (f"error: plugin name {name!r}: the plugin {name!r} already registers a {kind} of that name "
                        f"(sslkit list {listing}); choose another name") and not (tmp_path / name).exists()
    # another kind of the same name: the entry-point name sslkit's simclr plugin already has
    one_line_error(cli("new-plugin", "simclr", "--kind", "exporter", "--out", tmp_path / "e"),
                   "already uses the entry-point name 'simclr'")
    assert cli("new-plugin", "simclr_npz", "--kind", "exporter", "--out", tmp_path / "e").exit_code == 0
