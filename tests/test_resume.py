"""Exact resume: a run killed (SIGKILL) or interrupted (SIGINT) mid-epoch and resumed
repeats the uninterrupted run's per-step losses exactly (CPU, deterministic algorithms).
The killed and interrupted runs are real ``sslkit`` processes; the reference run and the
resumes are the CLI in-process (the same command lines, ~5 s of imports less each)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sslkit.cli import main
from tests.conftest import make_images

SSLKIT = str(Path(sys.executable).parent / "sslkit")
# 32 images, batch 6 -> 5 steps per epoch; 3 epochs = 15 steps; checkpoints every 2 steps,
# so kills land mid-epoch and resumes start mid-epoch.
ARGS = ["--task", "simclr", "--backbone", "timm:resnet10t", "--image-size", "16", "--batch-size", "6",
        "--epochs", "3", "--checkpoint-every", "2", "--seed", "3", "--deterministic", "--quiet",
        "--task-opt", "proj_hidden_dim=32", "--task-opt", "proj_dim=16", "--warmup-epochs", "0.5"]
TOTAL = 15


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("resume") / "img", n_per_class=16, size=28)


def losses(run: Path) -> list[tuple[int, int, str, str]]:
    """(step, epoch, loss, lr) per row, as written (exact decimal strings)."""
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), int(r["epoch"]), r["loss"], r["lr"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference_run(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = CliRunner().invoke(main, ["pretrain", "--data", f"folder:{images}", "--out", str(out), *ARGS],
                              catch_exceptions=False)
    assert proc.exit_code == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> list:
    rows = losses(reference_run)
    assert [r[0] for r in rows] == list(range(1, TOTAL + 1))
    assert len({r[2] for r in rows}) > 1
    return rows


def start_and_stop(images: Path, out: Path, sig: int, after_rows: int) -> subprocess.CompletedProcess:
    """Start a run, send ``sig`` once metrics.csv has ``after_rows`` rows, wait for the exit."""
    proc = subprocess.Popen([SSLKIT, "pretrain", "--data", f"folder:{images}", "--out", str(out), *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) - 1 >= after_rows:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigkill_then_resume_repeats_every_loss(images, reference, tmp_path, cli):
    out = tmp_path / "run"
    killed = start_and_stop(images, out, signal.SIGKILL, after_rows=5)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = len(losses(out))
    assert done_before < TOTAL
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    proc = cli("pretrain", "--resume", out, "--quiet")
    assert proc.exit_code == 0, proc.stderr
    rows = losses(out)
    assert rows == reference  # every step once, same loss and LR to the last digit
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["resumes"][0]["from_step"] in range(2, done_before + 1)
    assert (out / "encoder.safetensors").exists()


def test_sigint_checkpoints_exits_0_and_resume_repeats_every_loss(images, reference, tmp_path, cli):
    out = tmp_path / "run"
    stopped = start_and_stop(images, out, signal.SIGINT, after_rows=4)
    assert stopped.returncode == 0, stopped.stderr
    assert "--resume" in stopped.stdout and "interrupted" in stopped.stdout
    rows = losses(out)
    step = rows[-1][0]
    assert 4 <= step < TOTAL
    assert (out / "checkpoints" / f"step-{step:08d}").is_dir()  # checkpoint at the very step it stopped
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not (out / "encoder.safetensors").exists()

    # the same data order and augmentations continue mid-epoch; any CLI form of resume works
    proc = cli("pretrain", "--out", out, "--resume", "--quiet")
    assert proc.exit_code == 0, proc.stderr
    assert losses(out) == reference


def test_resuming_a_finished_run_changes_nothing(reference_run, cli):
    before = (reference_run / "metrics.csv").read_text()
    again = cli("pretrain", "--resume", reference_run)
    assert again.exit_code == 0 and "already finished (15 steps)" in again.output
    assert (reference_run / "metrics.csv").read_text() == before


def test_resume_refuses_changes_that_would_break_exactness(reference_run, tmp_path, cli):
    before = (reference_run / "run.json").read_text()
    bad = cli("pretrain", "--resume", reference_run, "--batch-size", "8")
    assert bad.exit_code == 2
    assert len(bad.output.strip().splitlines()) == 1 and "batch_size was 6, not 8" in bad.output
    assert (reference_run / "run.json").read_text() == before
    ok = cli("pretrain", "--resume", reference_run, "--device", "cpu", "--keep-checkpoints", "1")
    assert ok.exit_code == 0  # how, not what, it computes may change
    missing = cli("pretrain", "--resume", tmp_path / "nothing")
    assert missing.exit_code == 2 and "no sslkit run" in missing.output


MAE_ARGS = ["--task", "mae", "--backbone", "timm:vit_tiny_patch16_224", "--backbone-opt", "patch_size=8",
            "--backbone-opt", "depth=1", "--backbone-opt", "embed_dim=32", "--backbone-opt", "num_heads=2",
            "--image-size", "16", "--batch-size", "8", "--epochs", "2", "--checkpoint-every", "2",
            "--keep-checkpoints", "10", "--seed", "3", "--deterministic", "--quiet", "--device", "cpu",
            "--task-opt", "decoder_dim=32", "--task-opt", "decoder_heads=2", "--task-opt", "target=pixels"]


def test_a_run_recorded_before_an_option_existed_resumes_with_the_value_it_used(images, tmp_path, cli):
    """mae's ``target`` came after runs regressed pixels: a run.json without it resumes with
    pixels (``Task.legacy_option_values``) and repeats the uninterrupted run; a checkpoint that
    does not fit the model a run.json describes is one line and exit 2, not a traceback."""
    run = tmp_path / "run"
    assert cli("pretrain", "--data", f"folder:{images}", "--out", run, *MAE_ARGS).exit_code == 0
    reference = losses(run)
    assert [r[0] for r in reference] == list(range(1, 9))
    # as if stopped after step 4 by a version that recorded no target
    for ckpt in (run / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1].split(".")[0]) > 4:
            ckpt.unlink() if ckpt.is_file() else __import__("shutil").rmtree(ckpt)
    rows = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(rows[:5]) + "\n")
    info = json.loads((run / "run.json").read_text())
    del info["config"]["task_options"]["target"]
    info["status"] = "running"  # as a killed run leaves it
    (run / "run.json").write_text(json.dumps(info))
    assert cli("pretrain", "--resume", run, "--quiet").exit_code == 0
    assert losses(run) == reference
    info["config"]["task_options"]["target"] = "hog"
    info["status"] = "running"
    (run / "run.json").write_text(json.dumps(info))
    bad = cli("pretrain", "--resume", run, "--quiet")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and "does not fit" in lines[0] and "decoder_pred" in lines[0]


VIT = ["--backbone", "timm:vit_tiny_patch16_224", "--backbone-opt", "patch_size=8", "--backbone-opt", "depth=1"]


@pytest.mark.parametrize("task,backbone,chosen", [
    ("simmim", ["--backbone", "timm:resnet10t"], {"target": "pixels", "mask_patch": 8}),
    ("mae", VIT, {"target": "hog", "decoder_dim": 96, "min_scale": 0.5}),
    ("dino", ["--backbone", "timm:resnet10t"], {"local_crops": 0, "local_size": 28}),
    ("denoising", ["--backbone", "timm:resnet10t"], {"mask_patch": 8}),
    ("moco", ["--backbone", "timm:resnet10t"], {"temperature": 1.0, "momentum": 0.99, "proj_hidden_dim": 4096,
                                                "proj_dim": 256}),  # v3's, chosen by the task (not the printed v2's)
])
def test_run_json_records_the_option_values_the_task_chose(task, backbone, chosen, images, tmp_path, cli):
    """Options left at their default (None: chosen from the image size or the backbone) are recorded
    with the value the run used, so ``--resume`` rebuilds that task even if a later version would
    choose otherwise; a value the user gave stands."""
    run = tmp_path / "run"
    key, value = {"simmim": ("mask_ratio", 0.5), "mae": ("decoder_dim", 64), "dino": ("local_crops", 0),
                  "denoising": ("noise_std", 0.3), "moco": ("version", 3)}[task]
    result = cli("pretrain", "--task", task, "--data", f"folder:{images}", "--out", run, *backbone,
                 "--image-size", 64, "--batch-size", 4, "--max-steps", 1, "--epochs", 1, "--quiet",
                 "--device", "cpu", "--task-opt", f"{key}={value}")
    assert result.exit_code == 0, result.stderr
    options = json.loads((run / "run.json").read_text())["config"]["task_options"]
    expected = {**chosen, key: value}
    assert {k: options[k] for k in expected} == expected
    assert None not in options.values()


def test_resume_takes_the_runs_own_task_options_typed_and_none_as_the_tasks_choice(images, tmp_path, cli):
    """The command line that started a run resumes it: ``--task-opt mask_ratio=0.6`` is the float run.json
    holds, and ``decoder_dim=none`` (the task's choice) matches the value the task chose and recorded; a
    misspelt key is the did-you-mean line, a changed value still refused."""
    run = tmp_path / "run"
    args = ["pretrain", "--task", "mae", "--data", f"folder:{images}", "--out", run, *VIT, "--image-size", 32,
            "--batch-size", 4, "--epochs", 1, "--quiet", "--device", "cpu",
            "--task-opt", "mask_ratio=0.6", "--task-opt", "decoder_dim=none"]
    assert cli(*args, "--max-steps", 2).exit_code == 0
    assert json.loads((run / "run.json").read_text())["config"]["task_options"]["decoder_dim"] == 96
    resumed = cli(*args, "--max-steps", 3, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert [r[0] for r in losses(run)] == [1, 2, 3]
    typo = cli("pretrain", "--resume", run, "--task-opt", "mask_ratoi=0.6")
    assert typo.exit_code == 2 and "unknown option 'mask_ratoi' (did you mean 'mask_ratio'?)" in typo.stderr
    changed = cli("pretrain", "--resume", run, "--task-opt", "mask_ratio=0.5")
    assert changed.exit_code == 2 and "not {'mask_ratio': 0.5}" in changed.stderr


@pytest.mark.parametrize("task, option, earlier", [("mae", "target", "pixels"), ("simmim", "target", "pixels"),
                                                   ("simmim", "visible_weight", 0.0),
                                                   ("inpainting", "visible_weight", 0.0)])
def test_an_option_whose_default_changed_takes_the_earlier_value_on_a_resume(task, option, earlier):
    """A run.json recorded before ``option`` existed resumes with the value those runs computed with
    (``Task.legacy_option_values``), not the new default; one recorded with it keeps its own."""
    from sslkit.config_resume import fill_legacy_options
    from sslkit.registry import get_task

    assert getattr(get_task(task).Options(), option) != earlier  # the default did change
    saved = {"task": task, "task_options": {}}
    fill_legacy_options(saved)
    every = {"mae": {"target": "pixels"}, "simmim": {"target": "pixels", "visible_weight": 0.0},
             "inpainting": {"visible_weight": 0.0}}[task]  # each task's whole list of earlier values
    assert saved["task_options"] == every and saved["task_options"][option] == earlier
    own = {"task": task, "task_options": {option: "x"}}
    fill_legacy_options(own)
    assert own["task_options"][option] == "x"
