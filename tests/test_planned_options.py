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


TINY = ("--task", "byol", "--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8", "--quiet")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("planned") / "img", n_per_class=4, size=36)


def _recorded(run: Path) -> tuple[dict, list]:
    """``(task_options, crop scales of the views)`` that ``run``'s run.json holds."""
    info = json.loads((run / "run.json").read_text())
    return info["config"]["task_options"], [r["scale"] for r in info["views"]["."]["recipes"]]


#: (task, short-run values, long-run values, the crop scale of its two views in a long run)
PLANS = [("byol", {"tau_base": 0.999, "min_scale": 0.9}, {"tau_base": 0.996, "min_scale": 0.08}, (0.08, 1.0)),
         ("dino", {"momentum": 0.999, "global_scale_min": 0.8}, {"momentum": 0.996, "global_scale_min": 0.4},
          (0.4, 1.0))]


@pytest.mark.parametrize("name,short,long,scale", PLANS)
def test_byol_and_dino_plan_their_crops_and_target_from_the_runs_length(name, short, long, scale):
    import sys

    from sslkit.registry import get_task

    cls = get_task(name)
    boundary = sys.modules[cls.__module__].SHORT_RUN_STEPS
    assert cls.planned_options(boundary) == short
    assert cls.planned_options(boundary + 1) == long


@pytest.mark.parametrize("name,short,long,scale", PLANS)
def test_a_task_built_outside_a_run_takes_the_long_runs_values(name, short, long, scale):
    import timm

    from sslkit.api import InputSpec
    from sslkit.registry import get_task
    from sslkit.options import build_options

    cls = get_task(name)
    net = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    task = cls(net, build_options(cls.Options, {}, name), InputSpec(1, 32, (0.5,), (0.25,)))
    assert {k: task.resolved_options()[k] for k in long} == long
    assert [r.scale for r in task.views(task.spec).recipes[:2]] == [scale] * 2


def test_a_short_run_records_the_planned_values_and_a_users_value_stands(images, tmp_path, cli):
    result = cli("pretrain", "--data", images, "--out", tmp_path / "short", "--max-steps", "2", *TINY)
    assert result.exit_code == 0, result.output
    options, scales = _recorded(tmp_path / "short")
    assert (options["tau_base"], options["min_scale"], scales) == (0.999, 0.9, [[0.9, 1.0]] * 2)
    assert "tau_base = 0.999" in (tmp_path / "short" / "config.toml").read_text()
    result = cli("pretrain", "--data", images, "--out", tmp_path / "mine", "--max-steps", "2", "--task-opt",
                 "tau_base=0.99", *TINY)
    assert result.exit_code == 0, result.output
    options, scales = _recorded(tmp_path / "mine")
    assert (options["tau_base"], options["min_scale"], scales) == (0.99, 0.9, [[0.9, 1.0]] * 2)


def test_a_short_dino_run_records_its_gentle_crops_and_slow_teacher(images, tmp_path, cli):
    result = cli("pretrain", "--data", images, "--out", tmp_path / "dino", "--max-steps", "2", *TINY[2:], "--task",
                 "dino", "--task-opt", "out_dim=64")
    assert result.exit_code == 0, result.output
    options, scales = _recorded(tmp_path / "dino")
    assert (options["momentum"], options["global_scale_min"], scales[:2]) == (0.999, 0.8, [[0.8, 1.0]] * 2)


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
    assert (options["tau_base"], options["min_scale"], scales) == (0.999, 0.9, [[0.9, 1.0]] * 2)


def test_a_run_planned_before_a_planned_value_changed_resumes_with_its_own(images, tmp_path, cli, monkeypatch):
    """byol's short runs planned crops of 0.8-1 until the forty-ninth session (now 0.9-1): a run that
    recorded 0.8 keeps it when resumed by today's code."""
    from sslkit_plugins.tasks import byol

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setitem(byol.SHORT_RUN, "min_scale", 0.8)
        assert cli("pretrain", "--data", images, "--out", run, "--max-steps", "2", *TINY).exit_code == 0
    assert _recorded(run)[1] == [[0.8, 1.0]] * 2
    result = cli("pretrain", "--resume", run, "--max-steps", "3", "--quiet")
    assert result.exit_code == 0, result.output
    options, scales = _recorded(run)
    assert (options["min_scale"], scales) == (0.8, [[0.8, 1.0]] * 2)


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
