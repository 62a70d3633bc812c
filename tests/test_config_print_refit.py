"""``--print-config`` writes what the task chose (backbone, fitted backbone options, engine and optimizer
defaults) commented out, so that the file used at another image size or optimizer resolves as a run
without it would; what the user gave stays set. ``--quiet`` acts on one session, not on a resume."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from sslkit import config
from sslkit.run_record import recorded_config, write_config_toml
from tests.conftest import make_images

WHERE = {"data": "folder:/nonexistent/images", "out": "runs/x"}


def printed(cli, tmp_path, *args: str):
    """The file ``sslkit pretrain --print-config ARGS`` prints, written to ``tmp_path``."""
    r = cli("pretrain", "--print-config", *args)
    assert r.exit_code == 0, r.output
    f = tmp_path / "printed.toml"
    f.write_text(r.output)
    return f, r.output


@pytest.mark.parametrize("later, expected", [
    ({"image_size": 32}, {"backbone": "timm:vit_tiny_patch16_224", "backbone_options": {"patch_size": 8, "depth": 6}}),
    ({"image_size": 64}, {"backbone_options": {"patch_size": 8}}),
    ({"optimizer": "sgd", "base_lr": 0.1}, {"lr_scaling": "linear", "weight_decay": 1e-4, "base_lr": 0.1}),
])
def test_a_printed_mae_file_refits_to_another_size_or_optimizer(tmp_path, cli, later, expected):
    """mae's file printed at 224 px kept 16-px patches and 12 blocks at 32 px (4 tokens), and AdamW's
    sqrt rule and weight decay 0.05 under --optimizer sgd; now it resolves as the run without the file."""
    f, text = printed(cli, tmp_path, "--task", "mae")
    assert re.search(r'^# backbone = "timm:vit_tiny_patch16_224"  \(refitted unless set\)$', text, re.M)
    assert re.search(r"^# weight_decay = 0\.05  \(refitted unless set\)$", text, re.M)
    assert re.search(r'^# lr_scaling = "sqrt"  \(refitted unless set\)$', text, re.M)
    from_file = config.resolve({**WHERE, **later}, str(f))
    assert from_file == config.resolve({**WHERE, **later, "task": "mae"})
    assert {k: getattr(from_file, k) for k in expected} == expected


def test_a_printed_simmim_file_builds_the_resnet_below_96_px(tmp_path, cli):
    """simmim printed at 224 px (its ViT, base LR 1e-4) kept the ViT at 32 px; it builds ResNet-18 at 3e-3."""
    f, text = printed(cli, tmp_path, "--task", "simmim")
    assert re.search(r"^# base_lr = 0\.0001  \(refitted unless set\)$", text, re.M)
    small = config.resolve({**WHERE, "image_size": 32}, str(f))
    assert (small.backbone, small.base_lr) == ("timm:resnet18", 3e-3)
    assert small == config.resolve({**WHERE, "image_size": 32, "task": "simmim"})


def test_what_the_user_gave_stays_set(tmp_path, cli):
    """Given values (command line or the user's --config) are written set and win at another size;
    the fitted ones the user did not give are refitted."""
    f, text = printed(cli, tmp_path, "--task", "mae", "--image-size", "32", "--backbone-opt", "drop_path_rate=0.1",
                      "--weight-decay", "0.1", "--optimizer", "adamw")
    data = tomllib.loads(text)
    assert data["backbone_options"] == {"drop_path_rate": 0.1} and data["weight_decay"] == 0.1
    assert data["optimizer"] == "adamw" and "backbone" not in data and "base_lr" not in data
    assert "# patch_size = 8  (refitted unless set)" in text and "# depth = 6  (refitted unless set)" in text
    at_64 = config.resolve({**WHERE, "image_size": 64}, str(f))
    assert at_64.backbone_options == {"patch_size": 8, "drop_path_rate": 0.1} and at_64.weight_decay == 0.1
    # the user's own file: its values are theirs, printed set
    mine = tmp_path / "mine.toml"
    mine.write_text('task = "simmim"\nbackbone = "timm:vit_tiny_patch16_224"\nbase_lr = 5e-4\n')
    again = tomllib.loads(config.print_config({}, str(mine)))
    assert (again["backbone"], again["base_lr"]) == ("timm:vit_tiny_patch16_224", 5e-4)


@pytest.mark.parametrize("args", [("--task", "mae"), ("--task", "mae", "--image-size", "32"),
                                  ("--task", "simmim", "--image-size", "64"), ("--task", "simclr"),
                                  ("--task", "simclr", "--backbone", "timm:vit_tiny_patch16_224", "--image-size", "32"),
                                  ("--task", "byol", "--optimizer", "sgd", "--base-lr", "0.05"),
                                  ("--task", "mae", "--init", "timm:vit_small_patch16_224.augreg_in21k")])
def test_the_printed_file_with_the_same_flags_is_the_same_run(tmp_path, cli, args):
    """``--print-config > c.toml; --config c.toml`` gives the run the flags give, and prints the same file."""
    f, text = printed(cli, tmp_path, *args)
    flags = dict(zip(args[::2], args[1::2]))
    values = config.cli_values({k.lstrip("-").replace("-", "_"): v for k, v in flags.items()},
                               {k.lstrip("-").replace("-", "_") for k in flags})
    values = {k: int(v) if k == "image_size" else float(v) if k == "base_lr" else v for k, v in values.items()}
    assert config.resolve(WHERE, str(f)) == config.resolve({**WHERE, **values})
    assert config.print_config({}, str(f)) == text


def test_vit_defaults_are_shown_and_another_backbone_refits_them(tmp_path, cli):
    """simclr on a ViT: AdamW at 1e-3 shown (commented); the file used with a ResNet gets LARS, as without it."""
    f, text = printed(cli, tmp_path, "--task", "simclr", "--backbone", "timm:vit_tiny_patch16_224",
                      "--image-size", "32")
    assert re.search(r'^# optimizer = "adamw"  \(refitted unless set\)$', text, re.M)
    assert re.search(r"^# base_lr = 0\.001  \(refitted unless set\)$", text, re.M)
    assert config.resolve(WHERE, str(f)).optimizer == "adamw"
    cnn = config.resolve({**WHERE, "backbone": "timm:resnet10t"}, str(f))
    assert (cnn.optimizer, cnn.base_lr, cnn.weight_decay) == ("lars", 1.2, 1e-6)


def test_the_run_folders_config_toml_keeps_every_setting(tmp_path):
    """The run's own config.toml repeats it exactly: nothing in it is left to be chosen again."""
    cfg = config.resolve({"task": "mae", "data": "folder:/nonexistent/images", "out": str(tmp_path),
                          "image_size": 32})
    write_config_toml(tmp_path, cfg.to_dict())
    text = (tmp_path / "config.toml").read_text()
    data = tomllib.loads(text)
    assert "refitted" not in text and data["backbone_options"] == {"patch_size": 8, "depth": 6}
    assert (data["backbone"], data["base_lr"], data["weight_decay"]) == ("timm:vit_tiny_patch16_224", 2.5e-4, 0.05)


def _recorded_run(tmp_path, progress: bool):
    """A run folder whose run.json records ``progress`` (what --resume reads back)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = config.resolve({"task": "simclr", "data": "folder:/nonexistent/images", "out": str(run),
                          "progress": progress})
    (run / "run.json").write_text(json.dumps({"config": recorded_config(cfg.to_dict())}))
    return run


def test_quiet_is_not_inherited_by_a_resume(tmp_path):
    run = _recorded_run(tmp_path, progress=False)
    assert config.resolve({"out": str(run), "resume": True}).progress is True
    assert config.resolve({"out": str(run), "resume": True, "progress": False}).progress is False
    quiet = tmp_path / "quiet.toml"
    quiet.write_text("quiet = true\n")  # a config file's quiet acts on the session it starts too
    assert config.resolve({"out": str(run), "resume": True}, str(quiet)).progress is False


def test_a_quiet_run_resumed_without_quiet_shows_progress(tmp_path, cli):
    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    out = tmp_path / "run"
    common = ("--task-opt", "proj_hidden_dim=16", "--task-opt", "proj_dim=8", "--device", "cpu")
    first = cli("pretrain", "--task", "simclr", "--backbone", "timm:resnet10t", "--image-size", "16",
                "--batch-size", "8", "--data", f"folder:{images}", "--out", out, "--max-steps", "1", "--quiet",
                *common)
    assert first.exit_code == 0, first.output
    assert " step " not in first.stderr
    loud = cli("pretrain", "--resume", out, "--max-steps", "2", "--device", "cpu")
    assert loud.exit_code == 0, loud.output
    assert re.search(r"^simclr step 2/2 epoch \d+ loss ", loud.stderr, re.M), loud.stderr
    quiet = cli("pretrain", "--resume", out, "--max-steps", "3", "--device", "cpu", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert " step " not in quiet.stderr and "done: 3 steps" in quiet.output
