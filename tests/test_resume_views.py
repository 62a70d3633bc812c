"""``--resume`` and the augmentation a run recorded (run.json ``views``): a task's recipe that
changed since the run started is refused in one line before any step (exit 2, run.json as it
was), naming what differs; a run without the record resumes with a note; a matching one as before.
A tiny byol run stands for one started before a recipe change: its run.json ``views`` is edited to
the old saturation 0.4 (today's byol recipes: 0.2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_images, one_line_error

ARGS = ["--task", "byol", "--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8",
        "--checkpoint-every", "2", "--seed", "1", "--quiet"]


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> Path:
    """A byol run stopped at step 2 of what its resumes extend to 4 (--max-steps 4)."""
    from click.testing import CliRunner

    from sslkit.cli import main

    root = tmp_path_factory.mktemp("views")
    images = make_images(root / "img", n_per_class=8, size=32)
    out = root / "run"
    proc = CliRunner().invoke(main, ["pretrain", "--data", f"folder:{images}", "--out", str(out), *ARGS,
                                     "--max-steps", "2"], catch_exceptions=False)
    assert proc.exit_code == 0, proc.output
    return out


def copy_of(started: Path, tmp_path: Path, edit=None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(started, run)
    if edit is not None:
        info = json.loads((run / "run.json").read_text())
        edit(info)
        (run / "run.json").write_text(json.dumps(info))
    return run


def old_saturation(info: dict) -> None:
    for recipe in info["views"]["."]["recipes"]:
        assert recipe["saturation"] == 0.2
        recipe["saturation"] = 0.4


def saturations(run: Path) -> list:
    return [r["saturation"] for r in json.loads((run / "run.json").read_text())["views"]["."]["recipes"]]


def test_a_matching_record_resumes_as_before(started, tmp_path, cli):
    run = copy_of(started, tmp_path)
    done = cli("pretrain", "--resume", run, "--max-steps", "4")
    assert done.exit_code == 0, done.output
    assert "note" not in done.output and "augmentation" not in done.output
    assert "trained 2 of them (from step 2)" in done.output


def test_a_changed_recipe_is_refused_in_one_line_before_any_step(started, tmp_path, cli):
    run = copy_of(started, tmp_path, old_saturation)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for how in (["--resume", run], ["--resume", "auto", "--out", run]):
        bad = cli("pretrain", *how, "--max-steps", "4")
        assert bad.exit_code == 2
        assert bad.output.strip() == (
            "error: byol's augmentation changed since this run started (saturation 0.4 -> 0.2 in view 1 and 2); "
            "to continue it exactly: --augment-opt saturation=0.4")
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
            sorted(p.name for p in (started / "checkpoints").iterdir())


def test_the_flags_the_refusal_names_continue_it_as_recorded(started, tmp_path, cli):
    """A resume takes --augment-opt where run.json records the views (sslkit.config_resume): the flags the
    refusal names resume it on the recorded views; other values are refused by the same check."""
    run = copy_of(started, tmp_path, old_saturation)
    bad = cli("pretrain", "--resume", run, "--max-steps", "4")
    assert bad.exit_code == 2
    assert bad.output.strip() == ("error: byol's augmentation changed since this run started (saturation 0.4 -> 0.2 "
                                  "in view 1 and 2); to continue it exactly: --augment-opt saturation=0.4")
    other = cli("pretrain", "--resume", run, "--max-steps", "4", "--augment-opt", "saturation=0.3")
    assert other.exit_code == 2 and "saturation 0.4 -> 0.3 in view 1 and 2" in other.output
    ok = cli("pretrain", "--resume", run, "--max-steps", "4", "--augment-opt", "saturation=0.4")
    assert ok.exit_code == 0, ok.output
    assert "trained 2 of them (from step 2)" in ok.output
    assert saturations(run) == [0.4, 0.4]


def test_a_change_no_flag_restores_is_refused_without_one(started, tmp_path, cli):
    def uneven(info):  # one view's saturation, the other's blur: --augment-opt sets every view alike
        info["views"]["."]["recipes"][0]["saturation"] = 0.4
        info["views"]["."]["recipes"][1]["blur_p"] = 0.3

    run = copy_of(started, tmp_path, uneven)
    bad = cli("pretrain", "--resume", run, "--max-steps", "4")
    assert bad.exit_code == 2
    assert bad.output.strip() == (
        "error: byol's augmentation changed since this run started (saturation 0.4 -> 0.2 in view 1; "
        "blur_p 0.3 -> 0.0 in view 2); this sslkit cannot continue it exactly: start a new run (or resume it "
        "with the sslkit it was started with)")


def test_a_run_without_a_views_record_resumes_with_one_note(started, tmp_path, cli):
    run = copy_of(started, tmp_path, lambda info: info.pop("views"))
    done = cli("pretrain", "--resume", run, "--max-steps", "4")
    assert done.exit_code == 0, done.output
    notes = [line for line in done.output.splitlines() if "augmentation" in line]
    assert notes == ["sslkit: note: this run's augmentation was not recorded (run.json before views records); "
                     "its remaining steps use today's byol views"]
    assert "trained 2 of them (from step 2)" in done.output


def test_a_compiled_augmentation_records_the_views_it_compiles():
    import torch

    from sslkit.engine.compiled import compile_views
    from sslkit.views import MultiView, byol_recipes, views_record

    views = MultiView(byol_recipes(32), [0.5] * 3, [0.2] * 3)
    eager = views_record(views)
    assert [r["saturation"] for r in eager["."]["recipes"]] == [0.2, 0.2]
    assert views_record(compile_views(views)) == eager
    assert views_record(torch.compile(views)) == eager


def test_a_compiled_runs_wrapper_only_record_resumes_with_one_note(started, tmp_path, cli):
    """--compile runs recorded the compile wrapper's class alone (no recipes): not a change of views."""
    run = copy_of(started, tmp_path, lambda info: info.update(views={".": {"class": "CompiledOrEager"}}))
    done = cli("pretrain", "--resume", run, "--max-steps", "4")
    assert done.exit_code == 0, done.output
    assert [line for line in done.output.splitlines() if "augmentation" in line] == [
        "sslkit: note: this run's augmentation was not recorded (a --compile run recorded its wrapper alone); its "
        "remaining steps use today's byol views"]


# --augment-opt on --resume is held to the record before any image is decoded
# (sslkit.views_resume.check_views_before_decoding): the views built from the task and run.json's input spec,
# without data. The resumes decode without the cache (--no-cache), so one that gets that far calls the folder
# source's load.


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


def test_a_changed_augment_opt_is_refused_before_any_decode(started, tmp_path, decoded, cli):
    run = copy_of(started, tmp_path)
    before = files_of(run)
    bad = cli("pretrain", "--resume", run, "--max-steps", "4", "--no-cache", "--augment-opt", "saturation=0.3")
    line = one_line_error(bad)
    assert line == ("error: byol's augmentation changed since this run started (saturation 0.2 -> 0.3 in view 1 "
                    "and 2); to continue it exactly: --augment-opt saturation=0.2")
    assert decoded == []
    assert files_of(run) == before


def test_a_change_under_a_retuned_default_is_refused_before_any_decode(started, tmp_path, decoded, cli):
    run = copy_of(started, tmp_path)
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


def test_the_recorded_value_is_taken_and_decodes(started, tmp_path, decoded, cli):
    run = copy_of(started, tmp_path)
    ok = cli("pretrain", "--resume", run, "--max-steps", "4", "--no-cache", "--augment-opt", "saturation=0.2")
    assert ok.exit_code == 0, ok.output
    assert "trained 2 of them (from step 2)" in ok.output
    assert len(decoded) == 16  # every image: the spy sees the decoding the refusals above never reach
    recipes = json.loads((run / "run.json").read_text())["views"]["."]["recipes"]
    assert [r["saturation"] for r in recipes] == [0.2, 0.2]


def test_an_unknown_field_is_one_line_before_any_decode(started, tmp_path, decoded, cli):
    run = copy_of(started, tmp_path)
    before = files_of(run)
    bad = cli("pretrain", "--resume", run, "--max-steps", "4", "--no-cache", "--augment-opt", "saturaton=0.3")
    line = one_line_error(bad, "saturaton", "saturation")
    assert "Traceback" not in bad.output and line.startswith("error: --augment-opt")
    assert decoded == []
    assert files_of(run) == before
