"""Config files (TOML, YAML) + CLI overrides, --print-config, the resolved config in run.json."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from sslkit import config, config_values
from sslkit.errors import UsageError
from tests.conftest import make_images, one_line_error

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
    assert cfg.weight_decay == 1e-4 and cfg.lr_scaling == "linear"  # SGD's own: simclr's (1e-6, sqrt) are LARS's
    assert cfg.warmup_epochs == 1.0  # the built-in default
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
    ("batch-size = 16\nbatch_size = 32\n", "'batch-size' and 'batch_size' both set batch_size; keep one of them"),
    ("cache = '/tmp/c'\nno_cache = true\n", "'cache' and 'no_cache' both set cache_dir"),
    ("quiet = true\nprogress = true\n", "'quiet' and 'progress' both set progress"),
])
def test_bad_config_files_are_one_line_usage_errors(tmp_path, cli, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        config.resolve({"data": "x", "out": "y"}, str(f))
    if "batch_sise" in text:  # and through the CLI: one line, exit 2
        one_line_error(cli("pretrain", "--config", f, "--data", "x", "--out", "y"), message)


def test_cli_errors(cli):
    r = cli("pretrain", "--data", "x")  # --out has a default (runs/<task>-<timestamp>); --task has none
    assert r.exit_code == 2 and "missing --task" in r.output
    r = cli("pretrain", "--config", "/nonexistent/run.toml")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = cli("pretrain", "--print-config")
    assert r.exit_code == 2 and "needs --task" in r.output
    # both set cache_dir: which won depended on a set's order, so on the hash seed
    r = cli("pretrain", "--task", "simclr", "--data", "x", "--cache", "/tmp/c", "--no-cache", "--print-config")
    assert r.exit_code == 2 and "--cache and --no-cache both set cache_dir; give one of them" in r.output


def test_no_cache_false_beside_cache_is_no_clash(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("task = 'simclr'\nno_cache = false\ncache = '/tmp/c'\n")  # no_cache = false sets nothing
    assert config.resolve({"data": "x", "out": "y"}, str(f)).cache_dir == "/tmp/c"


def test_print_config_round_trips(tmp_path, cli):
    r = cli("pretrain", "--print-config", "--task", "simclr", "--backbone", "timm:resnet10t", "--lr-scaling", "sqrt")
    assert r.exit_code == 0, r.output
    data = tomllib.loads(r.output)
    assert data["task"] == "simclr" and data["backbone"] == "timm:resnet10t" and data["lr_scaling"] == "sqrt"
    assert data["task_options"] == {"temperature": 0.5, "proj_hidden_dim": 2048, "proj_dim": 128, "min_scale": 0.08}
    assert "# data = ...  (required)" in r.output and "# out = ...  (default: runs/<task>-<timestamp>)" in r.output
    f = tmp_path / "printed.toml"
    f.write_text(r.output)
    cfg = config.resolve({"data": "folder:x", "out": "y"}, str(f))
    again = config.print_config({"data": "folder:x", "out": "y"}, str(f))
    assert tomllib.loads(again) == {**data, "data": "folder:x", "out": "y"}
    assert cfg.lr_scaling == "sqrt" and cfg.backbone == "timm:resnet10t"


def test_print_config_leaves_out_the_per_session_flags(cli):
    """--overwrite and --allow-data-change (like --resume) act on one session: a printed file that held
    them would resume, clear or accept changed data on every later run made from it."""
    r = cli("pretrain", "--print-config", "--task", "simclr", "--overwrite")
    assert r.exit_code == 0, r.output
    data = tomllib.loads(r.output)
    assert data["task"] == "simclr"
    assert not {"resume", "overwrite", "allow_data_change"} & set(data), sorted(data)
    # --allow-data-change acts on a resume only: a new run's settings with it are refused, as the run refuses them
    r = cli("pretrain", "--print-config", "--task", "simclr", "--allow-data-change")
    assert r.exit_code == 2 and "--allow-data-change" in r.stderr and r.stdout == ""


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


# --- every option name of `sslkit pretrain` is a config key (issue 13, item 24) ---------------
def _sample_value(param, hint):
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) is not tuple and typing.get_origin(hint) is not dict:
        hint = args[0] if typing.get_origin(hint) is not typing.Literal else hint
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)[0]
    if typing.get_origin(hint) is tuple:
        return [0.9, 0.95]
    if typing.get_origin(hint) is dict:
        return {}
    if hint is None:
        return True if getattr(param, "is_flag", False) else "lung"
    return {bool: True, int: 1, float: 0.5, str: "x"}.get(hint, "x")


def test_every_pretrain_option_name_is_a_config_key():
    import click

    from sslkit.cli import pretrain

    for param in pretrain.get_params(click.Context(pretrain)):
        if not isinstance(param, click.Option) or "--help" in param.opts:
            continue
        name = param.opts[0].lstrip("-")
        for key in (name, name.replace("-", "_")):  # "batch-size" and "batch_size"
            field = config_values.ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            value = _sample_value(param, config_values.HINTS.get(field))
            try:
                out = config.check_values({key: value}, "run.toml")
            except UsageError as exc:  # only the repeatable KEY=VALUE options and --config itself
                assert re.search(r"as a \[\w+_options\] table|command-line option only", str(exc)), (key, exc)
                continue
            assert out, key
    checked = config.check_values({"cache": "/c", "quiet": True, "window": "lung", "series-description": "ax*"}, "f")
    assert checked == {"cache_dir": "/c", "progress": False,
                       "source_options": {"window": "lung", "series_description": "ax*"}}
    assert config.check_values({"no_cache": True}, "f") == {"cache_dir": ""}
    with pytest.raises(UsageError, match=r"write these options as a \[task_options\] table"):
        config.check_values({"task-opt": ["temperature=0.1"]}, "run.toml")
    with pytest.raises(UsageError, match="window must be a string or a number"):
        config.check_values({"window": {"a": 1}}, "run.toml")


def test_top_level_source_flag_in_a_config_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('task = "simclr"\nwindow = "lung"\n\n[source_options]\nframes = "middle"\nwindow = "bone"\n')
    cfg = config.resolve({"data": "dicom:x", "out": str(tmp_path / "r")}, str(f))
    assert cfg.source_options == {"frames": "middle", "window": "lung"}  # the flag's key wins, as on the CLI
    cli = config.cli_values({"window": "brain", "data_opts": ("window=bone",)}, {"window", "data_opts"})
    cfg = config.resolve({**cli, "data": "dicom:x", "out": str(tmp_path / "r")}, str(f))
    assert cfg.source_options == {"frames": "middle", "window": "brain"}


def test_print_config_is_commented_and_round_trips(tmp_path, cli):
    args = ("--task", "simclr", "--window", "lung", "--no-cache", "--quiet", "--lr", "0.1", "--data-opt",
            "frames=middle", "--task-opt", "temperature=0.2")
    r = cli("pretrain", "--print-config", *args)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    settings = [i for i, line in enumerate(lines) if line and not line.startswith(("#", "["))]
    assert len(settings) > 25
    for i in settings:  # every setting sits under its help
        assert lines[i - 1].startswith("# "), lines[i]
    assert "Intensity window" in r.output and "(--window)" in r.output and "# Learning rate, taken as is" in r.output
    f = tmp_path / "printed.toml"
    f.write_text(r.output)
    where = {"data": "dicom:x", "out": str(tmp_path / "run")}
    values = config.cli_values({"window": "lung", "no_cache": True, "quiet": True, "lr": 0.1, "task": "simclr",
                                "data_opts": ("frames=middle",), "task_opts": ("temperature=0.2",)},
                               {"window", "no_cache", "quiet", "lr", "task", "data_opts", "task_opts"})
    from_cli = config.resolve({**values, **where})
    from_file = config.resolve(where, str(f))
    assert from_file == from_cli
    assert from_file.cache_dir == "" and from_file.progress is False
    assert from_file.source_options == {"window": "lung", "frames": "middle"}
    assert config.print_config({}, str(f)) == r.output  # printing it again gives the same file


def test_config_that_is_not_utf8_is_one_line(tmp_path, cli):
    f = tmp_path / "latin1.toml"
    f.write_bytes('task = "simclr"\n# Réglages\n'.encode("latin-1"))
    one_line_error(cli("pretrain", "--config", f, "--print-config"), "is not UTF-8 text")


@pytest.mark.parametrize("task, vit_lr", [("simclr", 1e-3), ("moco", 1e-3), ("vicreg", 1e-3), ("barlowtwins", 1e-3),
                                          ("rotation", 3e-3), ("autoencoder", 3e-3),
                                          ("denoising", 3e-3), ("inpainting", 3e-3)])
def test_lars_tasks_train_a_vit_like_backbone_with_adamw(task, vit_lr):
    """The LARS tasks' engine defaults are for CNNs; with a ViT-like (token) backbone their
    ``token_engine_defaults`` replace them, and a setting given on the command line still wins."""
    base = {"task": task, "data": "folder:DATA", "out": "OUT", "image_size": 32}
    cnn = config.resolve({**base, "backbone": "timm:resnet10t"})
    assert cnn.optimizer == "lars" and cnn.weight_decay < 1e-5
    vit = config.resolve({**base, "backbone": "timm:vit_tiny_patch16_224", "backbone_options": {"patch_size": 8}})
    assert (vit.optimizer, vit.base_lr, vit.lr_scaling, vit.weight_decay) == ("adamw", vit_lr, "linear", 0.05)
    given = config.resolve({**base, "backbone": "timm:vit_tiny_patch16_224", "optimizer": "lars", "base_lr": 0.5})
    assert (given.optimizer, given.base_lr, given.lr_scaling, given.weight_decay) == ("lars", 0.5, "sqrt", 1e-6)
    assert config.resolve({**base, "backbone": "timm:convnext_atto"}).optimizer == "lars"  # not a token backbone


@pytest.mark.parametrize("task, optimizer, made_for", [("rotation", "adamw", "lars"), ("byol", "sgd", "adamw")])
def test_another_optimizer_without_an_lr_is_one_line(task, optimizer, made_for, cli):
    """A task's default LR belongs to its optimizer (rotation's LARS 2.4 would blow AdamW up): choosing
    another optimizer without an LR is refused in one line; with one it runs."""
    args = ("pretrain", "--task", task, "--data", "folder:X", "--print-config", "--optimizer", optimizer)
    one_line_error(cli(*args), f"is for {made_for}; with --optimizer {optimizer} give --base-lr")
    ok = cli(*args, "--base-lr", "0.01")
    assert ok.exit_code == 0 and re.search(r"^base_lr = 0\.01$", ok.stdout, re.M), ok.stderr


@pytest.mark.parametrize("task, optimizer, decay, scaling", [("simclr", "adamw", 0.05, "linear"),
                                                             ("byol", "lars", 1e-6, "sqrt"),
                                                             ("rotation", "sgd", 1e-4, "linear")])
def test_another_optimizer_takes_its_own_weight_decay_and_lr_rule(task, optimizer, decay, scaling):
    """simclr with --optimizer adamw kept LARS's weight decay 1e-6 and sqrt rule; byol with --optimizer lars
    AdamW's 0.05, about 30,000 times LARS's. The user's own values still win."""
    base = {"task": task, "data": "folder:DATA", "out": "OUT", "optimizer": optimizer, "base_lr": 0.01}
    cfg = config.resolve(base)
    assert (cfg.weight_decay, cfg.lr_scaling) == (decay, scaling)
    own = config.resolve({**base, "weight_decay": 0.3, "lr_scaling": "none"})
    assert (own.weight_decay, own.lr_scaling) == (0.3, "none")


def test_lr_and_base_lr_are_not_both_given(tmp_path, capsys):
    """--base-lr beside a config file's (or the command line's) lr was silently ignored."""
    base = {"task": "simclr", "data": "folder:DATA", "out": "OUT"}
    with pytest.raises(UsageError, match="^--lr is the learning rate as is; --base-lr and --lr-scaling would be "
                                         "ignored: give --lr, or --base-lr with --lr-scaling$"):
        config.resolve({**base, "lr": 0.1, "base_lr": 0.5, "lr_scaling": "none"})
    f = tmp_path / "c.toml"
    f.write_text("lr = 0.1\nweight_decay = 0.01\n")
    cfg = config.resolve({**base, "base_lr": 0.5}, str(f))
    assert (cfg.lr, cfg.base_lr, cfg.weight_decay) == (None, 0.5, 0.01)
    assert capsys.readouterr().err == "note: --base-lr on the command line replaces the config file's lr = 0.1\n"
    assert config.resolve(base, str(f)).lr == 0.1  # the file alone: its lr


def test_print_config_shows_the_vit_defaults(cli):
    out = cli("pretrain", "--task", "simclr", "--data", "folder:X", "--backbone", "timm:vit_tiny_patch16_224",
              "--image-size", "32", "--print-config").output
    # shown commented (the task's choice, refitted when the file is used with another backbone or optimizer)
    assert re.search(r'^# optimizer = "adamw"  \(refitted unless set\)$', out, re.M)
    assert re.search(r"^# base_lr = 0\.001  \(refitted unless set\)$", out, re.M)


@pytest.mark.parametrize("task, small", [("mae", {"patch_size": 8, "depth": 6}), ("simclr", {})])
def test_the_default_backbone_is_fitted_to_small_images(task, small):
    """mae's default ViT-Tiny gets 8-px patches below 96 px (also 6 blocks below 64 px),
    recorded in the config; not from 96 px, not on a backbone the user named or with --init, and the
    user's own --backbone-opt win key by key."""
    base = {"task": task, "data": "folder:DATA", "out": "OUT"}
    assert config.resolve({**base, "image_size": 32}).backbone_options == small
    assert config.resolve({**base, "image_size": 56}).backbone_options == small
    assert config.resolve({**base, "image_size": 64}).backbone_options == {k: v for k, v in small.items() if k != "depth"}
    assert config.resolve({**base, "image_size": 96}).backbone_options == {}
    assert config.resolve({**base, "image_size": 36}).backbone_options == {}  # 8 does not divide it
    named = config.resolve({**base, "image_size": 32, "backbone": "timm:vit_tiny_patch16_224"})
    assert named.backbone_options == {}
    assert config.resolve({**base, "image_size": 32, "init": "weights.safetensors"}).backbone_options == {}
    if small:
        mine = config.resolve({**base, "image_size": 32, "backbone_options": {"patch_size": 4}})
        assert mine.backbone_options == {**small, "patch_size": 4}


def test_simmim_default_backbone_is_a_resnet_below_96_px_and_its_vit_from_96():
    """default_backbone_for: simmim builds a ResNet-18 below 96 px (measured), the ViT-Tiny from 96 px, as
    --print-config and run.json record; a named backbone or one named by --init's weights wins."""
    base = {"task": "simmim", "data": "folder:DATA", "out": "OUT"}
    for size, expected in ((32, "timm:resnet18"), (95, "timm:resnet18"), (96, "timm:vit_tiny_patch16_224"),
                           (224, "timm:vit_tiny_patch16_224")):
        cfg = config.resolve({**base, "image_size": size})
        assert (cfg.backbone, cfg.backbone_options) == (expected, {}), size
    named = config.resolve({**base, "image_size": 32, "backbone": "timm:vit_tiny_patch16_224"})
    assert named.backbone == "timm:vit_tiny_patch16_224"
    assert config.resolve({**base, "image_size": 32, "init": "timm:vit_small_patch16_224.augreg_in21k"}).backbone \
        == "timm:vit_small_patch16_224"
    assert config.resolve({**base, "image_size": 32, "init": "weights.safetensors"}).backbone == "timm:resnet18"


@pytest.mark.parametrize("size, backbone, options, lr", [
    (32, None, {}, 3e-3), (224, None, {}, 1e-4), (32, "timm:resnet10t", {}, 3e-3),
    (32, "timm:vit_tiny_patch16_224", {"patch_size": 8}, 1e-4),
    (64, "timm:swin_tiny_patch4_window7_224", {"window_size": 4}, 1e-4),
    (64, "timm:swinv2_cr_tiny_ns_224", {}, 1e-4),
])
def test_simmim_engine_defaults_follow_the_backbone_family(size, backbone, options, lr):
    """backbone_engine_defaults: the paper's AdamW 1e-4 for ViTs and Swin (which is not a TokenBackbone, so
    token_engine_defaults could not say it), the measured 3e-3 for CNNs; the command line still wins."""
    base = {"task": "simmim", "data": "folder:DATA", "out": "OUT", "image_size": size,
            **({"backbone": backbone, "backbone_options": options} if backbone else {})}
    cfg = config.resolve(base)
    assert (cfg.optimizer, cfg.base_lr, cfg.weight_decay) == ("adamw", lr, 0.05)
    assert config.resolve({**base, "base_lr": 3e-4}).base_lr == 3e-4


def test_init_from_a_run_directory_builds_the_architecture_that_run_recorded(tmp_path):
    """--init RUN_DIR without --backbone: the backbone and options of that run (its weights'
    architecture, e.g. a fitted 6-block ViT), under the user's --backbone-opt; --backbone still wins."""
    first = tmp_path / "first"
    first.mkdir()
    recorded = {"patch_size": 8, "depth": 6, "global_pool": "avg", "fc_norm": False}
    (first / "run.json").write_text(json.dumps({"config": {"backbone": "timm:vit_small_patch16_224",
                                                           "backbone_options": recorded}}))
    base = {"task": "mae", "data": "folder:DATA", "out": "OUT", "image_size": 64, "init": str(first)}
    cont = config.resolve(base)
    assert (cont.backbone, cont.backbone_options) == ("timm:vit_small_patch16_224", recorded)
    assert config.resolve({**base, "backbone_options": {"drop_path_rate": 0.1}}).backbone_options == {
        **recorded, "drop_path_rate": 0.1}
    named = config.resolve({**base, "backbone": "timm:vit_tiny_patch16_224"})
    assert (named.backbone, named.backbone_options) == ("timm:vit_tiny_patch16_224", {})


def test_a_config_made_in_code_without_a_backbone_builds_what_pretrain_resolves():
    """RunConfig(backbone=None) given straight to the engine gets the same fitted default as the CLI."""
    from sslkit.engine.setup import with_backbone
    from sslkit.run import RunConfig

    made = with_backbone(RunConfig(task="mae", data="folder:DATA", out="OUT", image_size=32))
    resolved = config.resolve({"task": "mae", "data": "folder:DATA", "out": "OUT", "image_size": 32})
    assert (made.backbone, made.backbone_options) == (resolved.backbone, resolved.backbone_options)
    assert made.backbone_options == {"patch_size": 8, "depth": 6}


def test_option_help_is_the_comment_ending_each_field_line():
    """``--print-config`` shows a task option's help: the ``# comment`` ending its field's line (a
    ``#`` in a string default is not one; a base dataclass's fields keep theirs)."""
    import dataclasses

    from sslkit.options import option_help

    @dataclasses.dataclass
    class Base:
        width: int = 4  # channels of the head

    @dataclasses.dataclass
    class Opts(Base):
        colour: str = "#fff"
        # a comment on its own line helps nothing
        ratio: float = 0.5  # fraction masked, in (0, 1)
        def describe(self) -> str:
            ratio: float = self.ratio  # not a field's line
            return str(ratio)

    assert option_help(Opts) == {"width": "channels of the head", "ratio": "fraction masked, in (0, 1)"}
    assert option_help(None) == {}


def test_every_builtin_task_option_has_help_in_print_config(cli):
    import dataclasses

    from sslkit import registry
    from sslkit.options import option_help

    for task in registry.list_tasks():
        options = registry.get_task(task).Options
        helps = option_help(options)
        missing = [f.name for f in dataclasses.fields(options) if not helps.get(f.name)] if options else []
        assert not missing, f"{task}: options without a help comment: {missing}"
    r = cli("pretrain", "--print-config", "--task", "simmim")
    assert "# simmim option (int | None): " in r.output


def test_print_config_lists_the_sources_options_with_their_defaults(tmp_path, cli):
    """The source's options that are not set are listed commented, with their default and help, so a user
    sees what ``--data-opt`` takes; the file still loads back to the same settings."""
    r = cli("pretrain", "--print-config", "--task", "simclr", "--data", "dicom:/scans", "--data-opt", "frames=middle")
    assert r.exit_code == 0, r.output
    table = r.output.split("[source_options]")[1].split("[augment_options]")[0]
    assert 'frames = "middle"' in table and '# frames = "all"  (default)' not in table
    assert "# workers = 0  (default)" in table and "# dicom option (int): header-reading processes" in table
    assert "# modality = \"\"  (default)" in table and "(--modality)" in table
    f = tmp_path / "printed.toml"
    f.write_text(r.output)
    assert config.print_config({}, str(f)) == r.output
    assert config.resolve({"out": str(tmp_path / "run")}, str(f)).source_options == {"frames": "middle"}
    typo = cli("pretrain", "--print-config", "--task", "simclr", "--data", "dicom:/scans", "--data-opt", "frame=middle")
    assert typo.exit_code == 2 and "source 'dicom': unknown option 'frame' (did you mean 'frames'?)" in typo.stderr
    bare = cli("pretrain", "--print-config", "--task", "simclr", "--data", str(tmp_path / "not-yet"))
    assert bare.exit_code == 0 and "(default)" not in bare.output  # no source known yet: nothing listed
    unknown = cli("pretrain", "--print-config", "--task", "simclr", "--data", "dicomm:/scans")
    assert unknown.exit_code == 2 and "unknown data source 'dicomm' (did you mean 'dicom'?)" in unknown.stderr


def test_print_config_refuses_what_the_printed_file_would_be_refused_for(tmp_path, cli):
    """--print-config checks --augment-opt against the task's own views (a typo, a value out of range, a
    field the task refuses) and the run's cross-field checks, so the file it prints always loads back."""
    typo = cli("pretrain", "--print-config", "--task", "simclr", "--augment-opt", "jiter_p=0.3")
    assert typo.exit_code == 2 and "unknown option 'jiter_p' (did you mean 'jitter_p'?)" in typo.stderr
    out_of_range = cli("pretrain", "--print-config", "--task", "simclr", "--augment-opt", "jitter_p=3")
    assert out_of_range.exit_code == 2 and "jitter_p must be a probability in [0, 1], got 3.0" in out_of_range.stderr
    turned = cli("pretrain", "--print-config", "--task", "rotation", "--augment-opt", "rot90_p=0.5")
    assert turned.exit_code == 2 and "would make its labels ambiguous" in turned.stderr
    no_init = cli("pretrain", "--print-config", "--task", "simclr", "--init-lr-scale", "0.5")
    assert no_init.exit_code == 2 and "applies to continued pretraining only; give --init too" in no_init.stderr
    fetch = cli("pretrain", "--print-config", "--task", "simclr", "--allow-download")
    assert fetch.exit_code == 2 and "--allow-download lets --init fetch Hub weights; give --init too" in fetch.stderr
    good = cli("pretrain", "--print-config", "--task", "jigsaw", "--augment-opt", "blur_p=0.5")
    assert good.exit_code == 0, good.output
    f = tmp_path / "printed.toml"
    f.write_text(good.output)
    assert config.resolve({"data": str(tmp_path), "out": str(tmp_path / "run")}, str(f)).augment_options == {
        "blur_p": "0.5"}
