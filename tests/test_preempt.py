"""Pre-emption and run bounds through the CLI: SIGTERM / SIGUSR1 checkpoint at the end of
the step and exit 75 (requeue); the same command line with ``--resume auto`` continues
exactly; a full disk at a checkpoint is one line (exit 2) with the last good checkpoint
kept; ``--resume --overwrite`` and an unwritable ``--out`` are refused before any work;
``--max-steps``/``--epochs`` compose and a finished run extends by resuming with a larger
bound; the LR is scaled from the batch actually used; a log file gets plain lines.

The signal is sent to the real ``sslkit`` executable; every other run is the CLI in-process
(``incli``: the probe plugin on ``sys.path``), the same command line without ~5 s of imports."""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from click.testing import CliRunner

from sslkit import checkpoint, plugins
from sslkit.cli import main
from tests.conftest import make_images
from tests.test_engine import TINY_VIT, install_probe

SSLKIT = str(Path(sys.executable).parent / "sslkit")
EXIT_REQUEUE = 75
# 24 images, batch 4: 6 steps per epoch, 2 epochs = 12 steps; checkpoints every 4 steps (and none at epoch ends)
TOTAL = 12


def args(images: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--task", "probe", "--data", f"folder:{images}", "--out", str(out), "--image-size", "16",
            "--batch-size", "4", "--epochs", "2", "--checkpoint-every", "4", "--seed", "5", "--deterministic",
            "--no-cache", "--quiet", "--warmup-epochs", "0.5", "--task-opt", "loss=ntxent",
            *[a for k, v in {**TINY_VIT, "patch_size": 8}.items() for a in ("--backbone-opt", f"{k}={v}")], *extra]


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preempt")
    probe = install_probe(root / "probe")
    return {"images": make_images(root / "img", n_per_class=12, size=20), "env": {"PYTHONPATH": str(probe)},
            "root": root}


def rows(run: Path) -> list[tuple[str, str, str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


@pytest.fixture
def incli(setting, cli, monkeypatch):
    """``cli`` with the probe plugin installed (as ``setting["env"]`` installs it in a subprocess)."""
    monkeypatch.syspath_prepend(setting["env"]["PYTHONPATH"])
    plugins.reset()
    return cli


@pytest.fixture(scope="module")
def reference(setting) -> list:
    out = setting["root"] / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(setting["env"]["PYTHONPATH"])
        plugins.reset()
        proc = CliRunner().invoke(main, args(setting["images"], out, "--resume", "auto"), catch_exceptions=False)
    plugins.reset()
    assert proc.exit_code == 0, proc.stderr  # auto: a fresh run
    got = rows(out)
    assert [int(r[0]) for r in got] == list(range(1, TOTAL + 1)) and len({r[2] for r in got}) > 1
    return got


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_exits_for_requeue_and_resume_auto_repeats_every_loss(setting, reference, tmp_path,
                                                                                sig, incli):
    import os

    out = tmp_path / "run"
    after = random.Random(int(sig)).randint(2, 6)  # a pseudo-random step, printed on failure
    proc = subprocess.Popen([SSLKIT, *args(setting["images"], out, "--resume", "auto")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **setting["env"]})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) - 1 >= after:
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, (after, proc.returncode, stderr[-2000:])
    assert f"exit {EXIT_REQUEUE}" in stdout
    step = int(rows(out)[-1][0])
    assert after <= step < TOTAL, (after, step)
    assert (out / "checkpoints" / f"step-{step:08d}").is_dir()  # checkpoint at the step it stopped
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["summary"]["requeue"] is True

    again = incli(*args(setting["images"], out, "--resume", "auto"))  # the same line
    assert again.exit_code == 0, again.stderr
    assert rows(out) == reference  # every step once, the same loss and LR to the last digit
    assert json.loads((out / "run.json").read_text())["resumes"][-1]["from_step"] == step
    done = incli(*args(setting["images"], out, "--resume", "auto"))  # a third requeue
    assert done.exit_code == 0 and "already finished" in done.stdout


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(setting, tmp_path, incli, monkeypatch):
    """The second checkpoint's state.pt write fails with ENOSPC (torch.save patched)."""
    import errno

    import torch

    real, calls = torch.save, [0]

    def save(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    proc = incli(*args(setting["images"], out))
    assert proc.exit_code == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
    assert "step-00000008" in lines[0] and "step-00000004, is kept" in lines[0]
    ckpts = out / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step-00000004"]
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no partial folder left
    path, _, state, skipped = checkpoint.load_latest(ckpts)
    assert state["step"] == 4 and not skipped
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_refused_before_any_work(setting, tmp_path, incli):
    cache = tmp_path / "cache"
    both = incli(*args(setting["images"], tmp_path / "x", "--resume", "--overwrite"))
    assert both.exit_code == 2 and len(both.stderr.strip().splitlines()) == 1
    assert "--resume" in both.stderr and "--overwrite" in both.stderr
    unwritable = incli(*[a for a in args(setting["images"], Path("/proc/sslkit-run/x")) if a != "--no-cache"],
                       "--cache", cache)
    assert unwritable.exit_code == 2 and len(unwritable.stderr.strip().splitlines()) == 1, unwritable.stderr
    assert "not writable" in unwritable.stderr
    assert not cache.exists()  # refused before a single image was decoded


def test_max_steps_alone_both_bounds_and_extension(setting, tmp_path, incli):
    out = tmp_path / "run"
    base = [a for a in args(setting["images"], out) if a not in ("--epochs", "2")]
    alone = incli(*base, "--max-steps", "15")  # more than the default 10 epochs? no:
    assert alone.exit_code == 0, alone.stderr                            # 15 steps is 2.5 epochs of 6
    assert len(rows(out)) == 15 and "(the --max-steps bound)" in alone.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["horizon"] == {"epochs": None, "max_steps": 15, "total_steps": 15, "bound": "max_steps",
                               "schedule": "cosine"}

    longer = incli("pretrain", "--resume", out, "--max-steps", "18", "--quiet")
    assert longer.exit_code == 0, longer.stderr
    assert [int(r[0]) for r in rows(out)] == list(range(1, 19))  # extended from the step-15 checkpoint
    info = json.loads((out / "run.json").read_text())
    last = info["resumes"][-1]
    assert (last["from_step"], last["total_steps"]) == (15, 18) and info["horizon"]["total_steps"] == 18

    both = tmp_path / "both"
    proc = incli(*args(setting["images"], both, "--max-steps", "100"))
    assert proc.exit_code == 0 and "(the --epochs bound)" in proc.stdout  # 2 epochs = 12 steps < 100
    assert len(rows(both)) == TOTAL


def test_lr_scaled_from_the_batch_used_and_plain_log_lines(setting, tmp_path, incli):
    out = tmp_path / "run"
    a = [x for x in args(setting["images"], out, "--max-steps", "3", "--base-lr", "0.256")
         if x not in ("--quiet", "--epochs", "2")]
    a[a.index("--batch-size") + 1] = "1000"  # one step per epoch of the 24 images
    proc = incli(*a)
    assert proc.exit_code == 0, proc.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["optimization"]["effective_batch"] == 24  # clamped to the 24 images
    assert info["optimization"]["lr"] == pytest.approx(0.256 * 24 / 256)  # not 0.256 * 1000 / 256
    assert "probe step 1/3 epoch 0 loss" in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr  # not a terminal: plain lines, no redrawn bar (decoding or training)
    assert "probe step 3/3 epoch 2 loss" in proc.stderr


def test_a_checkpoint_write_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch.save reports a full disk as '[enforce fail at inline_container.cc:672] . unexpected pos N vs M'
    (seen on a full tmpfs); with the disk (nearly) full the line says so, with the free space."""
    import shutil
    from collections import namedtuple

    import pytest
    import torch

    from sslkit.errors import UsageError

    def save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 11099520 vs 11099472")

    monkeypatch.setattr(torch, "save", save)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(UsageError) as err:
        checkpoint.save(tmp_path / "ck", 3, {"w": torch.zeros(2)}, {"step": 3})
    assert str(err.value) == (f"cannot write checkpoint step-00000003 in {tmp_path / 'ck'}: no space left on device "
                              f"(1.0 MiB free; [enforce fail at inline_container.cc:672] . unexpected pos 11099520 vs "
                              f"11099472); no earlier checkpoint exists")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 0, 2**30))  # space left: another cause
    with pytest.raises(UsageError) as err:
        checkpoint.save(tmp_path / "ck", 3, {"w": torch.zeros(2)}, {"step": 3})
    assert "no space" not in str(err.value) and "unexpected pos" in str(err.value)


def test_a_cache_the_disk_cannot_hold_is_refused_with_real_sizes(tmp_path, monkeypatch):
    """The sizes in the refusal are readable at any scale (a small cache on a nearly full disk said
    'needs 0.00 GB, ... has 0.00 GB free')."""
    import shutil
    from collections import namedtuple

    import pytest

    from sslkit.data import prepare
    from sslkit.errors import UsageError
    from sslkit.progress import human_bytes

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(2**30, 0, 300 * 2**10))
    with pytest.raises(UsageError) as err:
        prepare.check_room(tmp_path, 3 * 2**20, (48, 1, 32, 32), 1, 32)
    assert f"48 images at 32 px needs 3.0 MiB, {str(tmp_path)!r} has 300.0 KiB free;" in str(err.value)
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 2**30, 3 * 2**40)] == ["0 B", "1023 B", "1.0 KiB", "5.0 GiB",
                                                                               "3.0 TiB"]


def test_preemption_before_the_first_step_exits_for_requeue(setting, tmp_path):
    """SIGTERM while the data is still decoding (a first pass over thousands of scans takes minutes)
    exits 75 as a pre-emption in the loop does, not 143, so the job script requeues it; nothing is
    left but the empty run folder, and the same ``--resume auto`` command then trains."""
    import os

    import numpy as np
    from PIL import Image

    data = tmp_path / "many"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(data / f"{i}.png", compress_level=0)
    out = tmp_path / "run"
    cmd = [c for c in [SSLKIT, *args(data, out, "--resume", "auto")] if c != "--quiet"]  # progress: 'decoding'
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **setting["env"]})
    seen = []
    for line in proc.stderr:  # decoding reports its start on a line of its own
        seen.append(line)
        if line.startswith("decoding"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, ("".join(seen) + stderr)[-2000:]
    assert stderr.strip().splitlines()[-1] == ("SIGTERM: stopped before training started, nothing to checkpoint "
                                               f"(exit {EXIT_REQUEUE}: requeue me)")
    assert not out.exists() or not any(out.iterdir())  # no lock file, no run.json: a requeue starts it afresh


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_preemption_while_torch_is_imported_exits_for_requeue(tmp_path, torchrun):
    """The handler was installed only after torch was imported and the settings resolved: a SIGTERM
    in those first seconds (7 s on a loaded node) killed the command (exit 143), which a job script
    does not requeue. Here the signal arrives as torch's import starts. Under torchrun the status
    is 0: torchrun restarts a group whose worker exits otherwise (--max-restarts), and it would
    train on past the pre-emption."""
    import os

    script = f"""
import os, signal, sys


class PreemptAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torch."):  # torch's import under way (the CLI's dispatch only asks where torch is)
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None


sys.meta_path.insert(0, PreemptAtTorch())
from sslkit.cli import main
assert "torch" not in sys.modules
sys.argv = ["sslkit", "pretrain", "--task", "simclr", "--data", {str(tmp_path)!r}, "--out", {str(tmp_path / "run")!r}]
main()
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, "TORCHELASTIC_RUN_ID": "job-1"} if torchrun else env)
    assert proc.returncode == (0 if torchrun else EXIT_REQUEUE), proc.stderr[-2000:]
    words = "exit 0 under torchrun, so it does not restart the group" if torchrun else f"exit {EXIT_REQUEUE}"
    assert proc.stderr.strip().splitlines() == [
        f"SIGTERM: stopped before training started, nothing to checkpoint ({words}: requeue me)"]


def test_a_preempted_worker_under_torchrun_exits_0(monkeypatch):
    """A worker's 75 is a crash to torchrun, which restarts the group with --max-restarts: trained
    on past the pre-emption (the group resumed and ran to its end, run.json 'finished')."""
    from sslkit.preempt import requeue_exit

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert requeue_exit() == EXIT_REQUEUE
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    assert requeue_exit() == 0


def test_a_preemption_after_the_loop_lets_the_run_finish(monkeypatch):
    """Once the loop's own handler is gone (batch-norm recompute, the final encoder, run.json), a
    SIGTERM unwound the finished run as 'stopped before training started'; it is noted and ignored.
    Before the loop, a second signal does not cut the first one's unwinding short."""
    import os

    from sslkit.engine.signals import Preempted, StopSignal, preemptible

    with preemptible():
        with StopSignal():
            pass  # the loop ran
        os.kill(os.getpid(), signal.SIGTERM)  # while the final files are written: no exception
        time.sleep(0.05)
    unwound = []
    with pytest.raises(Preempted):
        with preemptible():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # during the cleanup: ignored
                time.sleep(0.05)
                unwound.append(True)
    assert unwound == [True]
