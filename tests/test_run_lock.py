"""One process per run directory: a second `sslkit pretrain` on a running run is refused
in one line; once the holder dies (SIGKILL) the lock is free, and the next start removes
the temporary files the killed process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sslkit import checkpoint, plugins
from tests.conftest import make_images, run_sslkit
from tests.test_engine import TINY_VIT, install_probe

SSLKIT = str(Path(sys.executable).parent / "sslkit")


def test_second_process_refused_lock_freed_when_the_holder_dies_orphans_removed(tmp_path, cli, monkeypatch):
    env = {"PYTHONPATH": str(install_probe(tmp_path / "probe"))}
    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    out = tmp_path / "run"
    cmd = ["pretrain", "--task", "probe", "--data", f"folder:{images}", "--out", str(out), "--image-size", "16",
           "--batch-size", "4", "--max-steps", "100000", "--checkpoint-every", "1", "--no-cache", "--quiet",
           *[a for k, v in {**TINY_VIT, "patch_size": 8}.items() for a in ("--backbone-opt", f"{k}={v}")]]
    first = subprocess.Popen([SSLKIT, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.05)
        second = run_sslkit("pretrain", "--resume", out, "--quiet", env=env)
        assert first.poll() is None  # the first run was still training all along
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert "in use by another sslkit process" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)

    ckpts = out / "checkpoints"
    step = int(checkpoint.list_checkpoints(ckpts)[-1].name.split("-")[1])
    (ckpts / ".tmp-killed").mkdir(exist_ok=True)  # what a kill mid-checkpoint leaves (plus any real ones)
    (ckpts / ".tmp-killed" / checkpoint.MODEL_FILE).write_bytes(b"partial")
    (out / ".tmp-run.json").write_text("{")
    monkeypatch.syspath_prepend(env["PYTHONPATH"])  # the resume in-process: the same command, ~5 s less
    plugins.reset()
    again = cli("pretrain", "--resume", out, "--max-steps", str(step + 2), "--quiet")
    assert again.exit_code == 0, again.stderr  # the dead holder's lock is no obstacle
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert "removed .tmp-killed" in again.stdout
