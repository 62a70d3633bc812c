"""Options that each work alone but went wrong together (an audit of option combinations): ``--init`` of
another task's checkpoint, ``--resume auto`` with ``out`` in ``--config``, ``--print-config`` with what the run
refuses or with ``--resume``, and a resume given the run's own ``--channels-last`` or ``--data`` spelled otherwise."""

from __future__ import annotations

import json
import shutil
import tomllib

import pytest

from tests.conftest import make_images


TINY = ("--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "4", "--device", "cpu",
        "--quiet", "--no-cache")


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _run(cli, task, data, out, *extra, steps=2):
    result = cli("pretrain", "--task", task, "--data", data, "--out", out, "--max-steps", steps, *TINY, *extra)
    assert result.exit_code == 0, result.output
    return result


def _task_parts(run) -> dict:
    return json.loads((run / "run.json").read_text())["init"]["task_parts"]


def test_init_from_a_checkpoint_of_another_tasks_run_restores_no_task_parts(cli, tmp_path):
    """``--init RUN/checkpoints/step-N`` of a SimCLR run into BYOL put a BatchNorm counter of SimCLR's
    projector into BYOL's; it is refused as ``--init RUN`` is. The same task's checkpoint still restores."""
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    _run(cli, "simclr", data, tmp_path / "a")
    step = tmp_path / "a" / "checkpoints" / "step-2"
    byol = _run(cli, "byol", data, tmp_path / "b", "--init", step)
    assert ("init: task parts from random (task parts not restored: the init run's task is 'simclr', "
            "not 'byol')") in byol.stderr.splitlines()
    assert _task_parts(tmp_path / "b")["restored"] == []
    _run(cli, "simclr", data, tmp_path / "c", "--init", step)
    parts = _task_parts(tmp_path / "c")
    assert parts["restored"] == ["projector"] and parts["from"] == "a/checkpoints/step-00000002", parts


def test_resume_auto_takes_out_from_the_config_file(cli, tmp_path):
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    config = tmp_path / "c.toml"
    config.write_text(f'task = "simclr"\ndata = "{data}"\nout = "{tmp_path / "ra"}"\nmax_steps = 1\n'
                      f'batch_size = 4\nimage_size = 32\ndevice = "cpu"\nbackbone = "timm:test_resnet"\n')
    first = cli("pretrain", "--config", config, "--resume", "auto", "--quiet", "--no-cache")
    assert first.exit_code == 0, first.output
    again = cli("pretrain", "--config", config, "--resume", "auto", "--max-steps", "2", "--quiet", "--no-cache")
    assert again.exit_code == 0, again.output
    assert "this session trained 1 of them (from step 1)" in again.output
    assert json.loads((tmp_path / "ra" / "run.json").read_text())["summary"]["steps"] == 2
    no_out = tmp_path / "no-out.toml"
    no_out.write_text(f'task = "simclr"\ndata = "{data}"\n')
    assert _one_line(cli("pretrain", "--config", no_out, "--resume", "auto")) == (
        "error: --resume auto needs the run directory: --out RUN_DIR")


@pytest.mark.parametrize("args", [("--cache-size", "16"), ("--precision", "fp16")], ids=["cache-size", "fp16-cpu"])
def test_print_config_refuses_what_the_run_refuses_before_decoding(cli, tmp_path, args):
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    run = cli("pretrain", "--task", "simclr", "--data", data, "--out", tmp_path / "run", "--max-steps", "1",
              *TINY, *args)
    line = _one_line(run)
    assert line.startswith(f"error: {args[0]} "), line
    printed = cli("pretrain", "--task", "simclr", *TINY, *args, "--print-config")
    assert _one_line(printed) == line
    assert printed.stdout == ""
    assert not (tmp_path / "run").exists()


def test_print_config_with_resume_is_refused_naming_the_runs_own_config(cli, tmp_path):
    """It printed SimCLR's defaults with out = the run: not that run's settings, which its config.toml holds."""
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    run = tmp_path / "a"
    _run(cli, "simclr", data, run, steps=1)
    refused = cli("pretrain", "--print-config", "--task", "simclr", "--resume", run)
    assert _one_line(refused) == (
        f"error: --print-config prints a new run's settings, not those of run {str(run)!r} (--resume): they are "
        f"in {str(run / 'config.toml')!r}; print them with --config {run / 'config.toml'} --print-config")
    assert refused.stdout == ""
    own = cli("pretrain", "--config", run / "config.toml", "--print-config")
    assert own.exit_code == 0, own.output
    assert tomllib.loads(own.stdout)["backbone"] == "timm:test_resnet"


def test_resume_accepts_the_channels_last_the_run_used(cli, tmp_path):
    """A CNN run without ``--channels-last`` ran channels-last (run.json ``optimization``): giving it again
    on resume is the same run; the other value is still refused."""
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    run = tmp_path / "a"
    _run(cli, "simclr", data, run, steps=1)
    assert json.loads((run / "run.json").read_text())["optimization"]["channels_last"] is True
    assert _one_line(cli("pretrain", "--resume", run, "--no-channels-last", "--max-steps", "2")) == (
        "error: --resume continues the run exactly as it was configured: channels_last was True, not False; "
        "start a new run to change it")
    resumed = cli("pretrain", "--resume", run, "--channels-last", "--max-steps", "2", "--quiet", "--no-cache")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "run.json").read_text())["summary"]["steps"] == 2


def test_resume_accepts_the_runs_bare_data_with_its_scheme(cli, tmp_path, monkeypatch):
    """A run started with the bare ``data`` (sniffed as ``folder``) resumes with ``--data folder:data``, relative
    or absolute; another folder with the same images is still refused."""
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "data", n_per_class=4, size=40)
    shutil.copytree(tmp_path / "data", tmp_path / "other")
    _run(cli, "simclr", "data", "a", steps=1)
    assert _one_line(cli("pretrain", "--resume", "a", "--data", "folder:other", "--max-steps", "2")) == (
        "error: --resume continues the run exactly as it was configured: data was 'data', not 'folder:other'; "
        "start a new run to change it")
    for steps, data in ((2, "folder:data"), (3, f"folder:{tmp_path / 'data'}")):
        resumed = cli("pretrain", "--resume", "a", "--data", data, "--max-steps", steps, "--quiet", "--no-cache")
        assert resumed.exit_code == 0, resumed.output
        assert json.loads((tmp_path / "a" / "run.json").read_text())["summary"]["steps"] == steps


def test_init_mismatch_says_whose_shapes_it_shows(cli, tmp_path):
    """With the data's channels unknown the check probes a 1-channel model first: its shapes are not the
    RGB run's, so the line says so; with ``--channels 3`` it shows the 3-channel model's, as before."""
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(weights))
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    args = ("pretrain", "--task", "simclr", "--data", data, "--out", tmp_path / "x", "--backbone", "timm:resnet18",
            "--backbone-opt", "cifar_stem=true", "--init", weights, "--image-size", "32", "--device", "cpu")
    head = ("error: --init w.safetensors does not fit timm:resnet18: 1 tensors cannot be adapted: conv1.weight "
            "(64, 3, 7, 7) vs ")
    hint = "; --backbone names the architecture the weights were made for"
    assert _one_line(cli(*args)) == (f"{head}(64, 1, 3, 3){hint} (shapes of a 1-channel model: the data's "
                                     f"channel count is not known before decoding; --channels N checks the "
                                     f"N-channel one)")
    assert _one_line(cli(*args, "--channels", "3")) == f"{head}(64, 3, 3, 3){hint}"


def test_allow_data_change_acts_on_a_resume_only(cli, tmp_path, monkeypatch):
    """A new run refuses --allow-data-change (there is no earlier data; it did nothing, silently); --resume auto
    takes it on every requeue: the first start ignores it, a later resume gets it."""
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    args = ["--task", "simclr", "--backbone", "timm:test_resnet", "--data", data, "--image-size", "32",
            "--batch-size", "4", "--device", "cpu", "--quiet"]
    new = cli("pretrain", *args, "--out", tmp_path / "a", "--max-steps", "1", "--allow-data-change")
    assert new.exit_code == 2 and new.stderr.strip().splitlines() == [
        "error: config: allow_data_change (--allow-data-change) lets --resume continue on changed data; a new run "
        "has no earlier data: leave it out"]
    assert not (tmp_path / "a").exists()
    for steps in (1, 2):
        auto = cli("pretrain", *args, "--out", tmp_path / "b", "--max-steps", str(steps), "--resume", "auto",
                   "--allow-data-change")
        assert auto.exit_code == 0, auto.output
    assert json.loads((tmp_path / "b" / "run.json").read_text())["summary"]["steps"] == 2


def test_sync_bn_with_one_process_says_it_has_no_effect(cli, tmp_path, monkeypatch):
    """--sync-bn on a run of one process did nothing and said nothing (its help names torchrun): one note."""
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = make_images(tmp_path / "data", n_per_class=4, size=40)
    args = ["--task", "simclr", "--backbone", "timm:test_resnet", "--data", data, "--image-size", "32",
            "--batch-size", "4", "--device", "cpu", "--quiet", "--max-steps", "1"]
    note = ("note: --sync-bn shares BatchNorm statistics between the processes of a torchrun run; this one has one "
            "process: no effect")
    synced = cli("pretrain", *args, "--out", tmp_path / "a", "--sync-bn")
    assert synced.exit_code == 0, synced.output
    assert synced.stdout.splitlines().count(note) == 1, synced.stdout
    assert note not in cli("pretrain", *args, "--out", tmp_path / "b").stdout
