"""Config files (TOML, YAML) + CLI overrides, --print-config, the resolved config in run.json."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from sslkit import config
from sslkit.errors import UsageError
from tests.conftest import make_images

TOML = """
task = "simclr"
data = "folder:DATA"
out = "OUT"
backbone = "timm:resnet10t"
image-size = 16
batch_size = 8
epochs = 1
max_steps = 2
optimizer = "sgd"
base_lr = 0.4
betas = [0.9, 0.99]
progress = false

[task_options]
temperature = 0.2
proj_hidden_dim = 32
"""


def test_precedence_defaults_file_cli(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(TOML)
    cfg = config.resolve({"batch_size": 4, "task_options": {"proj_dim": "16"}}, str(f))
    assert cfg.batch_size == 4  # CLI beats the file
    assert cfg.image_size == 16 and cfg.optimizer == "sgd" and cfg.betas == (0.9, 0.99)  # file beats defaults
    assert cfg.weight_decay == 0.05  # default
    # task options: file and CLI merged key by key, the rest filled from the task's defaults
    assert cfg.task_options == {"temperature": 0.2, "proj_hidden_dim": 32, "proj_dim": 16, "min_scale": 0.08}
    assert cfg.effective_lr == pytest.approx(0.4 * 4 / 256)


def test_yaml_config(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("task: mae\ndata: folder:x\nout: y\nlr: 0.01\ntask_options:\n  mask_ratio: 0.6\n")
    cfg = config.resolve({}, str(f))
    assert cfg.lr == 0.01 and cfg.task_options["mask_ratio"] == 0.6
    assert cfg.backbone == "timm:vit_tiny_patch16_224"  # resolved from the task


@pytest.mark.parametrize("text, message", [
    ("task = 'simclr'\nbatch_sise = 4\n", "unknown setting 'batch_sise' (did you mean 'batch_size'?)"),
    ("task = 'simclr'\nepochs = 'ten'\n", "epochs must be an integer"),
    ("task = 'simclr'\noptimizer = 'adam'\n", "optimizer must be one of adamw, sgd, lars"),
    ("task = 'simclr'\nepochs = 0\n", "epochs must be >= 1"),
    ("task = 'simclr\n", "invalid TOML"),
])
def test_bad_config_files_are_one_line_usage_errors(tmp_path, cli, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        config.resolve({"data": "x", "out": "y"}, str(f))
    from tests.conftest import run_sslkit

    if "batch_sise" in text:  # and through the real CLI: one line, exit 2
        proc = run_sslkit("pretrain", "--config", f, "--data", "x", "--out", "y")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_cli_errors(cli):
    r = cli("pretrain", "--task", "simclr", "--data", "x")
    assert r.exit_code == 2 and "missing --out" in r.output
    r = cli("pretrain", "--config", "/nonexistent/run.toml")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = cli("pretrain", "--print-config")
    assert r.exit_code == 2 and "needs --task" in r.output


def test_print_config_round_trips(tmp_path, cli):
    r = cli("pretrain", "--print-config", "--task", "simclr", "--backbone", "timm:resnet10t", "--lr-scaling", "sqrt")
    assert r.exit_code == 0, r.output
    data = tomllib.loads(r.output)
    assert data["task"] == "simclr" and data["backbone"] == "timm:resnet10t" and data["lr_scaling"] == "sqrt"
    assert data["task_options"] == {"temperature": 0.5, "proj_hidden_dim": 2048, "proj_dim": 128, "min_scale": 0.08}
    assert "# data = ...  (required)" in r.output
    f = tmp_path / "printed.toml"
    f.write_text(r.output)
    cfg = config.resolve({"data": "folder:x", "out": "y"}, str(f))
    again = config.print_config({"data": "folder:x", "out": "y"}, str(f))
    assert tomllib.loads(again) == {**data, "data": "folder:x", "out": "y"}
    assert cfg.lr_scaling == "sqrt" and cfg.backbone == "timm:resnet10t"


def test_run_json_holds_the_resolved_config(tmp_path, cli):
    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    f = tmp_path / "run.toml"
    f.write_text(TOML.replace("DATA", str(images)).replace("OUT", str(tmp_path / "run")))
    r = cli("pretrain", "--config", f, "--seed", "5", "--grad-clip", "2.5", "--quiet")
    assert r.exit_code == 0, r.output
    assert "done: 2 steps" in r.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    cfg = info["config"]
    assert cfg["seed"] == 5 and cfg["grad_clip"] == 2.5 and cfg["optimizer"] == "sgd" and cfg["batch_size"] == 8
    assert cfg["task_options"]["temperature"] == 0.2 and cfg["task_options"]["proj_dim"] == 128
    assert cfg["betas"] == [0.9, 0.99]
    # the saved config is a valid config file's content
    assert config.check_values(cfg, "run.json")["max_steps"] == 2
