"""Options a task plans from the run's length (``Task.planned_options``): byol's gentle crops and slow
target for a short run, the paper's for a long one; filled in once the horizon is known, recorded in
run.json and config.toml, kept by ``--resume`` whatever its horizon, a user's value standing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from sslkit.api import Task
from sslkit.testing import check_task
from tests.conftest import make_images

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("--task", "byol", "--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8", "--quiet")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("planned") / "img", n_per_class=4, size=36)


def _recorded(run: Path) -> tuple[dict, list]:
    """``(task_options, crop scales of the views)`` that ``run``'s run.json holds."""
    info = json.loads((run / "run.json").read_text())
    return info["config"]["task_options"], [r["scale"] for r in info["views"]["."]["recipes"]]


def test_byol_plans_its_crops_and_target_from_the_runs_length():
    from sslkit_plugins.tasks.byol import BYOL, SHORT_RUN_STEPS

    assert BYOL.planned_options(SHORT_RUN_STEPS) == {"tau_base": 0.999, "min_scale": 0.8}
    assert BYOL.planned_options(SHORT_RUN_STEPS + 1) == {"tau_base": 0.996, "min_scale": 0.08}


def test_a_byol_built_outside_a_run_takes_the_papers_values():
    import timm

    from sslkit.api import InputSpec
    from sslkit.options import build_options
    from sslkit_plugins.tasks.byol import BYOL

    net = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    task = BYOL(net, build_options(BYOL.Options, {}, "byol"), InputSpec(1, 32, (0.5,), (0.25,)))
    assert task.resolved_options() == {"tau_base": 0.996, "min_scale": 0.08}
    assert [r.scale for r in task.views(task.spec).recipes] == [(0.08, 1.0)] * 2


def test_a_short_run_records_the_planned_values_and_a_users_value_stands(images, tmp_path, cli):
    result = cli("pretrain", "--data", images, "--out", tmp_path / "short", "--max-steps", "2", *TINY)
    assert result.exit_code == 0, result.output
    options, scales = _recorded(tmp_path / "short")
    assert (options["tau_base"], options["min_scale"], scales) == (0.999, 0.8, [[0.8, 1.0]] * 2)
    assert "tau_base = 0.999" in (tmp_path / "short" / "config.toml").read_text()
    result = cli("pretrain", "--data", images, "--out", tmp_path / "mine", "--max-steps", "2", "--task-opt",
                 "tau_base=0.99", *TINY)
    assert result.exit_code == 0, result.output
    options, scales = _recorded(tmp_path / "mine")
    assert (options["tau_base"], options["min_scale"], scales) == (0.99, 0.8, [[0.8, 1.0]] * 2)


def test_the_horizon_decides_and_a_resume_keeps_what_its_run_planned(images, tmp_path, cli, monkeypatch):
    """With a 2-step boundary: 2 planned steps are short, 3 long; a 2-step run resumed to 3 keeps its
    short-run values (re-planned, its views would change under it)."""
    monkeypatch.setattr("sslkit_plugins.tasks.byol.SHORT_RUN_STEPS", 2)
    result = cli("pretrain", "--data", images, "--out", tmp_path / "long", "--max-steps", "3", *TINY)
    assert result.exit_code == 0, result.output
    options, scales = _recorded(tmp_path / "long")
    assert (options["tau_base"], options["min_scale"], scales) == (0.996, 0.08, [[0.08, 1.0]] * 2)
    run = tmp_path / "run"
    assert cli("pretrain", "--data", images, "--out", run, "--max-steps", "2", *TINY).exit_code == 0
    result = cli("pretrain", "--resume", run, "--max-steps", "3", "--quiet")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["total_steps"] == 3
    options, scales = _recorded(run)
    assert (options["tau_base"], options["min_scale"], scales) == (0.999, 0.8, [[0.8, 1.0]] * 2)


@dataclass
class WidthOption:
    width: int | None = None


class PlansBadly(Task):
    Options = WidthOption

    def views(self, spec):
        from sslkit.api import MultiView, recipe

        return MultiView([recipe("simclr", spec.image_size)], spec.mean, spec.std)

    def forward(self, views):
        return {"loss": self.encoder(views[0]).pow(2).mean()}


class PlansAnotherName(PlansBadly):
    @classmethod
    def planned_options(cls, total_steps):
        return {"size": 4}


class PlansNone(PlansBadly):
    @classmethod
    def planned_options(cls, total_steps):
        return {"width": None} if total_steps > 1 else {}


@pytest.mark.parametrize("cls,needle", [(PlansAnotherName, r"planned_options\(1\) names \['size'\], which are not "),
                                        (PlansNone, r"planned_options\(1000000\) leaves \['width'\] at None")])
def test_check_task_catches_planned_options_that_are_not_options(cls, needle, tmp_path):
    with pytest.raises(AssertionError, match=needle):
        check_task(cls, tmp_path=tmp_path, channels=(1,), export=False, resume=False, steps=1)
