"""``--resume`` with an ``--augment-opt`` that changes the views run.json recorded is refused in one line
(exit 2) before any image is decoded (sslkit.views_resume.check_views_before_decoding), not after the
whole data set was: the views are built from the task and run.json's input spec, without data. The value
the run recorded is still taken, and an unknown field is still its one-line error. The resumes decode
without the cache (``--no-cache``), so a resume that gets that far calls the folder source's ``load``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_images, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--task", "byol", "--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8",
        "--checkpoint-every", "2", "--seed", "1", "--quiet"]


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> Path:
    """A byol run stopped at step 2 of what its resumes extend to 4 (its views' saturation: 0.2)."""
    from click.testing import CliRunner

    from sslkit.cli import main

    root = tmp_path_factory.mktemp("augresume")
    images = make_images(root / "img", n_per_class=8, size=32)
    out = root / "run"
    proc = CliRunner().invoke(main, ["pretrain", "--data", f"folder:{images}", "--out", str(out), *ARGS,
                                     "--max-steps", "2"], catch_exceptions=False)
    assert proc.exit_code == 0, proc.output
    return out


@pytest.fixture
def run(started, tmp_path) -> Path:
    shutil.copytree(started, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The files the folder source decodes from now on (its ``load``, wrapped)."""
    from sslkit_plugins.sources.folder import FolderSource

    calls: list[str] = []
    load = FolderSource.load

    def spy(self, ref):
        calls.append(ref.path)
        return load(self, ref)

    monkeypatch.setattr(FolderSource, "load", spy)
    return calls


def files_of(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_changed_augment_opt_is_refused_before_any_decode(run, decoded, cli):
    before = files_of(run)
    bad = cli("pretrain", "--resume", run, "--max-steps", "4", "--no-cache", "--augment-opt", "saturation=0.3")
    line = one_line_error(bad)
    assert line == ("error: byol's augmentation changed since this run started (saturation 0.2 -> 0.3 in view 1 "
                    "and 2); to continue it exactly: --augment-opt saturation=0.2")
    assert decoded == []
    assert files_of(run) == before


def test_a_change_under_a_retuned_default_is_refused_before_any_decode(run, decoded, cli):
    """A run recorded before a recipe default changed (saturation 0.4 then): another value than the recorded
    one is refused before decoding, naming the flag that continues it; that flag resumes it."""
    info = json.loads((run / "run.json").read_text())
    for recipe in info["views"]["."]["recipes"]:
        recipe["saturation"] = 0.4
    (run / "run.json").write_text(json.dumps(info))
    bad = cli("pretrain", "--resume", run, "--max-steps", "4", "--no-cache", "--augment-opt", "saturation=0.3")
    assert one_line_error(bad, "saturation 0.4 -> 0.3 in view 1 and 2", "--augment-opt saturation=0.4")
    assert decoded == []
    ok = cli("pretrain", "--resume", run, "--max-steps", "4", "--no-cache", "--augment-opt", "saturation=0.4")
    assert ok.exit_code == 0, ok.output
    assert len(decoded) == 16


def test_the_recorded_value_is_taken_and_decodes(run, decoded, cli):
    ok = cli("pretrain", "--resume", run, "--max-steps", "4", "--no-cache", "--augment-opt", "saturation=0.2")
    assert ok.exit_code == 0, ok.output
    assert "trained 2 of them (from step 2)" in ok.output
    assert len(decoded) == 16  # every image: the spy sees the decoding the refusals above never reach
    recipes = json.loads((run / "run.json").read_text())["views"]["."]["recipes"]
    assert [r["saturation"] for r in recipes] == [0.2, 0.2]


def test_an_unknown_field_is_one_line_before_any_decode(run, decoded, cli):
    before = files_of(run)
    bad = cli("pretrain", "--resume", run, "--max-steps", "4", "--no-cache", "--augment-opt", "saturaton=0.3")
    line = one_line_error(bad, "saturaton", "saturation")
    assert "Traceback" not in bad.output and line.startswith("error: --augment-opt")
    assert decoded == []
    assert files_of(run) == before
