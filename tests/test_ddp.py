"""Two-process DDP (gloo, CPU) follows the single-process run on the same global batch,
contrastive negatives span the global batch (gathered with gradients), and only rank 0
writes files."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import make_images
from tests.test_engine import TINY_VIT, install_probe

WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "shutil.rmtree",
                "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, probe_root: str, cfg: dict, log_dir: str) -> None:
    """One DDP process: records every file-system write it makes under the run directory."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, probe_root)
    torch.set_num_threads(1)
    out = os.path.realpath(cfg["out"])
    writes: list[str] = []

    def under_out(arg) -> bool:
        return isinstance(arg, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(arg)).startswith(out)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and under_out(path):
                writes.append(f"open {path}")
        elif event in WRITE_EVENTS and any(under_out(a) for a in args):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    from sslkit import plugins
    from sslkit.engine import pretrain
    from sslkit.run import RunConfig

    plugins.reset()
    summary = pretrain(RunConfig(**cfg))
    Path(log_dir, f"rank{rank}.json").write_text(json.dumps({"writes": writes, "summary": summary}))


def losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_process_gloo_equals_one_process_and_only_rank0_writes(tmp_path, monkeypatch):
    probe_root = install_probe(tmp_path / "probe_plugin")
    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    # global batch 8 (4 per process), NT-Xent over the global batch, SGD so updates track gradients
    cfg = dict(task="probe", data=f"folder:{images}", image_size=16, epochs=2, batch_size=8, optimizer="sgd",
               lr=0.1, warmup_epochs=0.0, task_options={"loss": "ntxent"}, progress=False, deterministic=True,
               checkpoint_every=1, cache_dir="", backbone_options={**TINY_VIT, "patch_size": 8})
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    ddp_out = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, free_port(), str(probe_root), {**cfg, "out": str(ddp_out)}, str(log_dir)),
             nprocs=2, join=True)

    monkeypatch.syspath_prepend(str(probe_root))
    from sslkit import plugins
    from sslkit.engine import pretrain
    from sslkit.run import RunConfig

    plugins.reset()
    one = pretrain(RunConfig(**cfg, out=str(tmp_path / "one")))
    assert one["steps"] == 4

    multi, single = losses(ddp_out), losses(tmp_path / "one")
    assert len(multi) == len(single) == 4
    assert multi == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert len(set(single)) > 1  # the model moved
    from safetensors.torch import load_file

    a, b = load_file(str(ddp_out / "encoder.safetensors")), load_file(str(tmp_path / "one" / "encoder.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

    logs = {r: json.loads((log_dir / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert logs[1]["writes"] == [], logs[1]["writes"][:5]
    assert any("metrics.csv" in w for w in logs[0]["writes"])  # the hook does see rank 0's writes
    assert logs[0]["summary"]["main"] and not logs[1]["summary"]["main"]
    info = json.loads((ddp_out / "run.json").read_text())
    assert info["environment"]["world_size"] == 2 and info["optimization"]["batch_per_process"] == 4
    state = torch.load(sorted((ddp_out / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # every rank's RNG state, for an exact resume


def test_torchrun_cli(tmp_path):
    """The documented launch: torchrun --nproc-per-node 2 -m sslkit pretrain ..."""
    probe_root = install_probe(tmp_path / "probe_plugin")
    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(probe_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "sslkit", "pretrain", "--task", "probe", "--data", f"folder:{images}", "--out", str(out),
           "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--quiet", "--task-opt", "loss=ntxent",
           *[a for k, v in {**TINY_VIT, "patch_size": 8}.items() for a in ("--backbone-opt", f"{k}={v}")]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done: 2 steps") == 1  # the summary line comes from rank 0 only
    assert len(losses(out)) == 2
    assert json.loads((out / "run.json").read_text())["environment"]["world_size"] == 2
