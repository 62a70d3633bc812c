"""Stop signals and messages of one process and of a torchrun group.

* One process stops as soon as the step in flight ends: a signal during step k checkpoints
  step k (not k + 2, when the flag was read with the next step's scalars, one step late), also
  while a checkpoint is written, and the resumed run repeats the uninterrupted one exactly.
* Under torchrun a pre-emption signal to rank 0 alone while the data decodes stops both
  processes together at the first step (rank 1 crashed in gloo while rank 0 exited); one in the
  loop stops both after the step in flight and one more, with the resume line naming torchrun.
* Errors and notes are printed where ``RANK`` is 0 or unset only; every rank still exits 2.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sslkit import checkpoint
from tests.conftest import make_images
from tests.test_ddp import free_port
from tests.test_engine import TINY_VIT, install_probe

EXIT_REQUEUE = 75


def args(images: Path, out: Path, *extra: str) -> list[str]:
    """24 images, batch 4: 6 steps per epoch, 2 epochs = 12 steps; checkpoints every 4 steps."""
    return ["pretrain", "--task", "probe", "--data", f"folder:{images}", "--out", str(out), "--image-size", "16",
            "--batch-size", "4", "--epochs", "2", "--checkpoint-every", "4", "--seed", "3", "--deterministic",
            "--no-cache", "--quiet", "--warmup-epochs", "0.5", "--task-opt", "loss=ntxent",
            *[a for k, v in {**TINY_VIT, "patch_size": 8}.items() for a in ("--backbone-opt", f"{k}={v}")], *extra]


def rows(run: Path) -> list[tuple[str, str, str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stops")
    return {"images": make_images(root / "img", n_per_class=12, size=20), "probe": install_probe(root / "probe"),
            "root": root}


@pytest.fixture
def incli(setting, cli, monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(setting["probe"]))
    from sslkit import plugins

    plugins.reset()
    return cli


@pytest.fixture(scope="module")
def reference(setting) -> list:
    from click.testing import CliRunner

    from sslkit import plugins
    from sslkit.cli import main

    out = setting["root"] / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(setting["probe"]))
        plugins.reset()
        proc = CliRunner().invoke(main, args(setting["images"], out), catch_exceptions=False)
    plugins.reset()
    assert proc.exit_code == 0, proc.stderr
    got = rows(out)
    assert [int(r[0]) for r in got] == list(range(1, 13)) and len({r[2] for r in got}) > 1
    return got


@pytest.mark.parametrize("when, step", [("during step", 3), ("during step", 1), ("writing checkpoint", 4)])
def test_one_process_stops_at_the_step_in_flight_and_resumes_exactly(setting, reference, incli, monkeypatch,
                                                                   tmp_path, when, step):
    """SIGUSR1 during (1-based) step ``step``, sent as that step is launched (as the audit's
    injector sends it), or while the checkpoint of step ``step`` is written: the run stops there,
    with its checkpoint at ``step``, exit 75; the same command with --resume auto repeats every
    loss and LR of the uninterrupted run."""
    from sslkit.engine import loop

    out = tmp_path / "run"
    name = "train_step" if when == "during step" else "_checkpoint"
    real = getattr(loop, name)

    def injected(s, state, *a, **k):
        if state.step == (step - 1 if name == "train_step" else step):
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(s, state, *a, **k)

    monkeypatch.setattr(loop, name, injected)
    proc = incli(*args(setting["images"], out, "--resume", "auto"))
    assert proc.exit_code == EXIT_REQUEUE, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        f"interrupted: checkpoint at step {step} saved in {out}; continue with: sslkit pretrain --resume {out} "
        f"(exit {EXIT_REQUEUE}: requeue me)")
    assert [int(r[0]) for r in rows(out)] == list(range(1, step + 1))  # no step past the one in flight
    assert checkpoint.list_checkpoints(out / "checkpoints")[-1].name == f"step-{step:08d}"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["summary"]["steps"] == step and info["summary"]["requeue"]

    monkeypatch.setattr(loop, name, real)
    again = incli(*args(setting["images"], out, "--resume", "auto"))
    assert again.exit_code == 0, again.stderr[-2000:]
    assert rows(out) == reference  # every step once, the same loss and LR to the last digit
    assert json.loads((out / "run.json").read_text())["resumes"][-1]["from_step"] == step


def test_a_stop_that_comes_with_the_last_step_lets_the_run_finish(setting, incli, monkeypatch, tmp_path):
    """Nothing is left to stop after the last step: run.json says finished (a requeue would only
    find the run done) and the command exits 0."""
    from sslkit.engine import loop

    real = loop.train_step

    def injected(s, state, *a, **k):
        if state.step == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(s, state, *a, **k)

    monkeypatch.setattr(loop, "train_step", injected)
    out = tmp_path / "run"
    proc = incli(*args(setting["images"], out))
    assert proc.exit_code == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("done: 12 steps (the --epochs bound)")
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("rank, printed", [("0", True), ("", True), ("1", False)])
def test_errors_and_notes_are_printed_by_rank_0_only(cli, tmp_path, monkeypatch, capsys, rank, printed):
    """With 8 processes every user error came 8 times; rank 1 now exits 2 without a word."""
    from PIL import Image

    from sslkit.data.pipeline import load_data

    monkeypatch.setenv("RANK", rank)
    proc = cli("pretrain", "--task", "simclr", "--data", str(tmp_path / "missing"), "--out", tmp_path / "run")
    assert proc.exit_code == 2
    assert proc.stderr.strip().splitlines() == ([proc.stderr.strip()] if printed else [])
    assert not printed or proc.stderr.startswith("error: ")
    bad = cli("pretrain", "--epochs", "0")  # click's own error
    assert bad.exit_code == 2 and bool(bad.stderr.strip()) == printed

    for group, n in (("a", 41), ("b", 21)):  # --val-fraction 0.3 can only hold out a whole patient
        (tmp_path / group).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / group / f"{i}.png")
    capsys.readouterr()
    held = load_data(f"folder:{tmp_path}", 8, cache_dir="", val_fraction=0.3, seed=1, progress=False,
                     source_options={"group": r"^(\w)/"})
    assert held.split["val_samples"] == 41
    note = "note: --val-fraction 0.3 held out 66% of the samples (41 of 62, 1 of 2 groups)"
    assert (note in capsys.readouterr().err) == printed


def test_a_deferred_preemption_raises_where_the_group_can_unwind(monkeypatch):
    """Under torchrun a pre-loop signal is only noted (the processes agree at the first step);
    inside unwinding(), where the others learn of it from the store, it raises at once."""
    from sslkit.preempt import Preempted, pending, preemptible, unwinding

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with preemptible():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert pending() == "SIGUSR1"  # no exception: this process goes on to the first step
        with pytest.raises(Preempted, match="SIGUSR1"):
            with unwinding():
                pass
    assert pending() is None
    with pytest.raises(Preempted, match="SIGTERM"):
        with preemptible(), unwinding():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                pass
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(Preempted, match="SIGTERM"):  # one process: at once, as before
        with preemptible():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                pass


INJECT = """
import os, signal, sys

import sslkit.engine.loop as loop
import sslkit.engine.setup as setup

when = os.environ["SIG_AT"]
if os.environ["RANK"] == "0" and when == "decode":  # rank 0 alone, while the data decodes
    real_load = setup.load_run_data

    def load(*a, **k):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real_load(*a, **k)

    setup.load_run_data = load
elif os.environ["RANK"] == "0":  # rank 0 alone, as 0-based step SIG_AT is launched
    real_step = loop.train_step

    def step(s, state, *a, **k):
        if state.step == int(when):
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(s, state, *a, **k)

    loop.train_step = step
from sslkit.cli import main

sys.argv[0] = "sslkit"
main()
"""


def torchrun(tmp_path: Path, sig_at: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """2 CPU processes, timm:resnet10t at 32 px, batch 4, at most 4 steps; SIGUSR1 to rank 0 alone."""
    images = tmp_path / "img" if (tmp_path / "img").is_dir() else make_images(tmp_path / "img", 8, size=32)
    script = tmp_path / "inject.py"
    script.write_text(textwrap.dedent(INJECT))
    out = tmp_path / f"run-{sig_at}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIG_AT": sig_at, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(script), "pretrain", "--task", "simclr", "--backbone", "timm:resnet10t", "--data", f"folder:{images}",
           "--image-size", "32", "--batch-size", "4", "--max-steps", "4", "--device", "cpu", "--no-cache", "--quiet",
           "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600), out


def test_torchrun_preemption_of_rank_0_alone(tmp_path):
    """Before the first step: both processes stop together (exit 0, so torchrun does not restart
    the group), run.json says interrupted for the job script, one line says so. In the loop,
    during step 2 on rank 0 alone: both stop after step 3 (the step in flight and one more),
    with a checkpoint there, and the resume line names the torchrun command, not a 1-process run."""
    proc, out = torchrun(tmp_path, "decode")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "gloo" not in text.lower(), text[-3000:]
    assert text.count("stopped before training started") == 1, text[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "SIGUSR1: stopped before training started, nothing to checkpoint "
        "(exit 0 under torchrun, so it does not restart the group: requeue me)")
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["summary"]["steps"] == 0 and info["summary"]["requeue"]
    assert checkpoint.list_checkpoints(out / "checkpoints") == []

    proc, out = torchrun(tmp_path, "1")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("interrupted")] == [
        f"interrupted: checkpoint at step 3 saved in {out}; continue with: the same torchrun command with --resume "
        f"{out} (exit 0 under torchrun, so it does not restart the group: requeue me)"]
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-00000003"]
    assert json.loads((out / "run.json").read_text())["summary"]["steps"] == 3
