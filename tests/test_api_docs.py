"""docs/plugins.md: it lists exactly the names of sslkit.api and every hook, and its worked
examples (a source, a task and a callback, each under 60 lines) pass the contract kit as written."""

from __future__ import annotations

import importlib.util
import re
import sys

import numpy as np
import pytest

import sslkit.api as api
from sslkit import hookspecs
from tests.conftest import REPO

DOC = REPO / "docs" / "plugins.md"


def section(title_start: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title_start}")
    end = text.find("\n## ", start + 4)
    return text[start: end if end > 0 else None]


def test_doc_lists_exactly_the_api_names():
    rows = re.findall(r"^\| `(\w+)` \|", section("The API"), flags=re.M)
    assert len(rows) == len(set(rows)), "a name is listed twice"
    assert set(rows) == set(api.__all__), (f"missing from docs/plugins.md: {sorted(set(api.__all__) - set(rows))}; "
                                           f"not in sslkit.api: {sorted(set(rows) - set(api.__all__))}")


def test_doc_lists_every_hook_and_readme_links_it():
    hooks = {name for name in dir(hookspecs) if name.startswith("register_")}
    assert hooks and set(re.findall(r"^\| `(register_\w+)` \|", section("The hooks"), flags=re.M)) == hooks
    assert "docs/plugins.md" in (REPO / "README.md").read_text()


def example(filename: str) -> tuple[str, object]:
    """The worked example whose code block starts with ``# filename``, imported as a module."""
    blocks = re.findall(r"```python\n(# " + re.escape(filename) + r"\n.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, f"one code block for {filename}"
    code = blocks[0]
    assert len(code.splitlines()) < 60, f"{filename}: {len(code.splitlines())} lines"
    imports = [ln for ln in code.splitlines() if "sslkit" in ln and ln.startswith(("from ", "import "))]
    assert imports and all(ln.startswith("from sslkit.api import ") for ln in imports)
    return code, filename[:-3]


def load(tmp_path, filename: str):
    code, name = example(filename)
    path = tmp_path / filename
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pickling the source needs its module importable
    spec.loader.exec_module(module)
    return module


def test_worked_source_example_passes_the_kit(tmp_path):
    from sslkit.testing import check_source

    module = load(tmp_path, "sslkit_npyfolder.py")
    rng = np.random.default_rng(0)
    for i in range(3):
        (tmp_path / "arrays" / f"p{i}").mkdir(parents=True)
        np.save(tmp_path / "arrays" / f"p{i}" / "a.npy", (rng.random((20, 24)) * 900).astype(np.int16))
    np.save(tmp_path / "arrays" / "p0" / "rgb.npy", rng.random((3, 16, 16)).astype(np.float32))
    report = check_source(module.NpyFolderSource, str(tmp_path / "arrays"), tmp_path=tmp_path)
    assert report["samples"] == 4 and report["channels"] == [1, 3]
    assert report["damaged"].startswith("load raises Undecodable")


def test_worked_task_example_passes_the_kit(tmp_path):
    from sslkit.testing import check_task

    module = load(tmp_path, "sslkit_rot4.py")
    report = check_task(module.Rot4, tmp_path=tmp_path)
    assert report["task"] == "kit-rot4" and "exactly" in report["resume"]
    assert "kit-rot4" not in api.__dict__ and module.Rot4.Options().min_scale == 0.3


def test_worked_callback_example_passes_the_kit(tmp_path):
    import csv
    import json

    from sslkit.testing import check_callback

    module = load(tmp_path, "sslkit_losswatch.py")
    report = check_callback(module.LossWatch, tmp_path=tmp_path)
    assert report["events"]["on_step_end"] == 3
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    smoothed = [losses[0]]
    for loss in losses[1:]:
        smoothed.append(0.9 * smoothed[-1] + 0.1 * loss)
    watch = json.loads((tmp_path / "run" / "losswatch.json").read_text())
    best = min(range(3), key=lambda i: smoothed[i])
    assert watch["status"] == "finished" and watch["step"] == 3
    assert watch["smoothed"] == pytest.approx(smoothed[-1], rel=1e-7)  # metrics.csv: 9 significant digits
    assert watch["best"] == pytest.approx(smoothed[best], rel=1e-7) and watch["best_step"] == best + 1
    # the kit's resume: a copy cut back to the step-2 checkpoint, its losswatch.json from step 3 (a crash
    # leaves a later file), resumed: the state follows the checkpoint and ends as the uninterrupted run's
    resumed = json.loads((tmp_path / "run-resumed" / "losswatch.json").read_text())
    assert resumed["checkpoints"]["2"] == watch["checkpoints"]["2"] and watch["checkpoints"]["2"]["step"] == 2
    assert resumed == watch and resumed["smoothed"] != pytest.approx(losses[2], rel=1e-7)
