"""The one tolerant reader of a run's JSON records, and what its callers make of a damaged one;
the modes of the files :func:`write_atomic` leaves."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sslkit.config_backbone import recorded_backbone
from sslkit.init.continued import _run_checkpoint
from sslkit.output_file import created_mode, read_json, write_atomic, write_json_atomic


@pytest.mark.parametrize("text", [None, "", "{not json", "[1, 2]", '"a string"', "\xff\xfe"])
def test_read_json_gives_an_empty_record_for_a_missing_or_damaged_file(tmp_path, text):
    path = tmp_path / "run.json"
    if text is not None:
        path.write_bytes(text.encode("latin-1"))
    assert read_json(path) == {}


def test_read_json_reads_what_write_json_atomic_wrote(tmp_path):
    write_json_atomic(tmp_path / "run.json", {"task": "mae", "config": {"backbone": "timm:x"}})
    assert read_json(tmp_path / "run.json") == {"task": "mae", "config": {"backbone": "timm:x"}}


@pytest.mark.parametrize("text", ["[1, 2]", '{"config": [1]}', '{"config": {"backbone_options": 3}}', "{"])
def test_a_damaged_init_run_json_is_no_recorded_backbone_and_no_task_parts(tmp_path, text):
    (tmp_path / "run.json").write_text(text)
    assert recorded_backbone(tmp_path / "run.json") is None
    tensors, name, why = _run_checkpoint(tmp_path, "mae")
    assert (tensors, name) == ({}, "")
    assert why == "task parts not restored: the init run's task is None, not 'mae'"


def test_a_recorded_backbone_is_read_from_run_json(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(
        {"task": "mae", "config": {"backbone": "timm:vit_tiny_patch16_224", "backbone_options": {"depth": 6}}}))
    assert recorded_backbone(tmp_path / "run.json") == ("timm:vit_tiny_patch16_224", {"depth": 6})


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after."""
    saved = []

    def set_mask(mask: int) -> None:
        saved.append(os.umask(mask))

    yield set_mask
    if saved:
        os.umask(saved[0])


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_a_new_file_gets_the_mode_open_would_give_it_not_mkstemps_0600(tmp_path, umask, mask):
    umask(mask)
    assert created_mode() == 0o666 & ~mask and created_mode(directory=True) == 0o777 & ~mask
    write_json_atomic(tmp_path / "run.json", {"task": "mae"})
    with open(tmp_path / "plain.json", "w") as f:  # what a plain write gives the same file
        f.write("{}")
    mode = stat.S_IMODE((tmp_path / "run.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~mask


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    out = tmp_path / "encoder.onnx"
    out.write_text("old")
    out.chmod(0o640)  # the user's choice for this file: kept
    write_atomic(out, lambda tmp: tmp.write_text("new"))
    assert out.read_text() == "new" and stat.S_IMODE(out.stat().st_mode) == 0o640


def test_a_run_its_checkpoints_export_and_eval_report_are_readable_by_the_group(cli, gray_folder, tmp_path, umask):
    """Under umask 022 every file a run, its export and its eval leave is 0644 and every folder
    0755, as a team's shared run folder and a serving process under another user need."""
    umask(0o022)
    run = tmp_path / "run"
    r = cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data", f"folder:{gray_folder}",
            "--out", run, "--max-steps", "2", "--batch-size", "4", "--image-size", "32", "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("export", run, "--out", run / "encoder.onnx")
    assert r.exit_code == 0, r.output
    r = cli("eval", "knn", run, "--train", gray_folder, "--test", gray_folder, "--allow-overlap")
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*")}
    assert any(k.startswith("checkpoints/") and k.endswith(".safetensors") for k in modes), sorted(modes)
    assert {"run.json", "encoder.safetensors", "encoder.onnx"} <= set(modes)
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o755 if (run / k).is_dir() else 0o644)}
    assert not wrong, wrong


def test_sigterm_in_any_command_unwinds_and_leaves_no_temporary_file(tmp_path):
    """``timeout``, systemd, SLURM and Kubernetes stop a command with SIGTERM: an export being
    written then left a full-size hidden ``.tmp-*`` file (the audit's case); now it unwinds as Ctrl-C."""
    import os
    import signal
    import time

    import click

    from sslkit.cli import Group
    from sslkit.output_file import write_atomic

    @click.group(cls=Group)
    def group() -> None:
        pass

    @group.command()
    @click.argument("out")
    def write(out: str) -> None:
        def half_then_killed(tmp: Path) -> None:
            tmp.write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # not reached: the signal unwinds here

        write_atomic(Path(out), half_then_killed)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        group.main(["write", str(tmp_path / "model.onnx")])
    assert exit_.value.code == 143 and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command
