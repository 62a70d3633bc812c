"""``sslkit pretrain --config RUN/config.toml`` reruns a run recorded before an option existed with the
value that run used (``Task.legacy_option_values`` / ``Source.legacy_option_values``), as ``--resume``
does, not today's default; a user's TOML, and a config.toml written today, keep their values."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from tests.conftest import make_images


TINY = ("--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8", "--quiet")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny inpainting run made today (its config.toml lists visible_weight = 1.0)."""
    from click.testing import CliRunner

    from sslkit.cli import main

    root = tmp_path_factory.mktemp("legacy")
    images = make_images(root / "img", n_per_class=4, size=36)
    out = root / "run"
    result = CliRunner().invoke(main, ["pretrain", "--task", "inpainting", "--data", str(images), "--out", str(out),
                                       "--max-steps", "2", *TINY], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _without(text: str, key: str) -> str:
    """``text`` (a config.toml) as a version without the option ``key`` wrote it: its line and the
    comment lines of its help above it dropped."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
    start = at
    while start > 0 and lines[start - 1].startswith("# ") and " = " not in lines[start - 1]:
        start -= 1
    return "\n".join(lines[:start] + lines[at + 1:]) + "\n"


def _printed(cli, config: Path, *extra: str) -> tuple[dict, str]:
    """The settings ``--config config --print-config`` prints (stdout) and its stderr."""
    result = cli("pretrain", "--config", config, "--print-config", *extra)
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.stdout), result.stderr


def test_an_old_config_toml_reruns_with_the_value_its_run_used(run, tmp_path, cli):
    """The audit's case: a config.toml written before inpainting's visible_weight (runs then used 0)."""
    old = tmp_path / "old" / "config.toml"
    old.parent.mkdir()
    text = (run / "config.toml").read_text()
    assert "visible_weight = 1.0" in text  # today's file lists every task option, defaults included
    old.write_text(_without(text, "visible_weight"))
    values, err = _printed(cli, old)
    assert values["task_options"]["visible_weight"] == 0.0
    assert "visible_weight" in err and err.count("\n") == 1  # one note naming it
    # the command line still wins
    values, _ = _printed(cli, old, "--task-opt", "visible_weight=0.5")
    assert values["task_options"]["visible_weight"] == 0.5
    # the run itself uses it
    result = cli("pretrain", "--config", old, "--out", tmp_path / "again", "--max-steps", "1", "--quiet")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "again" / "run.json").read_text())
    assert info["config"]["task_options"]["visible_weight"] == 0.0


def test_a_users_toml_and_todays_config_toml_keep_their_values(run, tmp_path, cli):
    """No mark: the user's file, never filled; today's own file: every option as it holds it."""
    mine = tmp_path / "mine.toml"
    mine.write_text(_without((run / "config.toml").read_text(), "visible_weight").split("\n", 1)[1])
    values, err = _printed(cli, mine)
    assert values["task_options"]["visible_weight"] == 1.0 and err == ""
    values, err = _printed(cli, run / "config.toml")
    assert values["task_options"]["visible_weight"] == 1.0 and err == ""
    assert values == tomllib.loads((run / "config.toml").read_text())


def test_a_source_option_is_filled_only_where_the_runs_record_says_it_lacked_it(run, tmp_path, cli, monkeypatch):
    """config.toml lists the source options given only: one it lacks is told gained by the run.json beside
    it (its source_options_resolved, naming this file by its sha256); a copy without run.json keeps
    today's default."""
    from sslkit.registry import get_source

    monkeypatch.setattr(get_source("folder"), "legacy_option_values", {"group": "^(a)"})
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.toml").write_bytes((run / "config.toml").read_bytes())
    info = json.loads((run / "run.json").read_text())
    assert "group" in info["source_options_resolved"]
    (old / "run.json").write_text(json.dumps(info))
    values, err = _printed(cli, old / "config.toml")  # the run had the option (at its default): kept
    assert values.get("source_options", {}).get("group") is None and err == ""
    del info["source_options_resolved"]["group"]
    (old / "run.json").write_text(json.dumps(info))
    values, err = _printed(cli, old / "config.toml")
    assert values["source_options"]["group"] == "^(a)" and "group" in err
    (old / "run.json").unlink()
    values, err = _printed(cli, old / "config.toml")
    assert values.get("source_options", {}).get("group") is None and err == ""
