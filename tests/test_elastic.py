"""Multi-node and elastic runs on one machine (CPU, gloo): two torchrun "nodes" meeting
through a c10d rendezvous on localhost, and ``torchrun --nnodes 1:2 --max-restarts 2``
surviving a killed worker (the group restarts and ``--resume auto`` continues from the
last checkpoint) train with the losses of one process on the same global batch (the probe task here:
no random views, no BatchNorm; with those, augmentations are seeded per rank and BatchNorm is per
process unless --sync-bn). Both
share a disk cache (built once, under a lock). Short here; longer with ``-m slow``."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, make_images
from tests.test_ddp import free_port
from tests.test_engine import TINY_VIT, install_probe

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
#: what an elastic torchrun needs (README): each rendezvous round gets a fresh worker store.
#: With torch's default shared store, the restarted group read the dead group's gloo
#: addresses from it and failed with "connectFullMesh ... Connection refused".
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def sslkit_args(images: Path, out: Path, epochs: int) -> list[str]:
    """Global batch 8, NT-Xent over it, SGD (updates track gradients), checkpoints every 2 steps."""
    return ["pretrain", "--task", "probe", "--data", f"folder:{images}", "--out", str(out), "--image-size", "16",
            "--batch-size", "8", "--epochs", str(epochs), "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0",
            "--task-opt", "loss=ntxent", "--deterministic", "--checkpoint-every", "2", "--quiet",
            "--resume", "auto", *[a for k, v in {**TINY_VIT, "patch_size": 8}.items()
                                  for a in ("--backbone-opt", f"{k}={v}")]]


def losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The probe plugin, 16 images and one cache, shared by every run in this file."""
    tmp = tmp_path_factory.mktemp("elastic")
    probe = install_probe(tmp / "probe")
    env = {**os.environ, "PYTHONPATH": str(probe), "OMP_NUM_THREADS": "1", "SSLKIT_CACHE_DIR": str(tmp / "cache")}
    return {"env": env, "images": make_images(tmp / "img", n_per_class=8, size=20), "tmp": tmp, "single": {}}


def single_process(world: dict, epochs: int) -> list[tuple[int, float]]:
    """The reference: one process, the same global batch (run once per length in this file)."""
    if epochs not in world["single"]:
        out = world["tmp"] / f"one-{epochs}"
        proc = subprocess.run([str(Path(sys.executable).parent / "sslkit"),
                               *sslkit_args(world["images"], out, epochs)],
                              env=world["env"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        world["single"][epochs] = losses(out)
    return world["single"][epochs]


def rendezvous(port: int, run_id: str) -> list[str]:
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
            "--rdzv-conf", "join_timeout=300,last_call_timeout=1", "--monitor-interval", "0.2"]


def two_nodes(world: dict, epochs: int) -> Path:
    out, port = world["tmp"] / f"two-{epochs}", free_port()
    cmd = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", *rendezvous(port, "two-nodes"),
           "-m", "sslkit", *sslkit_args(world["images"], out, epochs)]
    nodes = [subprocess.Popen(cmd, env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [n.communicate(timeout=900) for n in nodes]
    for n, (_, err) in zip(nodes, results):
        assert n.returncode == 0, err[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["environment"]["world_size"] == 2 and info["optimization"]["batch_per_process"] == 4
    assert sum(out.count("done: ") for out, _ in results) == 1  # one summary, from rank 0
    return out


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def worker_of_rank(agent: int, rank: int) -> int | None:
    for pid in children(agent):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def elastic_with_a_kill(world: dict, epochs: int, kill_after_rows: int) -> Path:
    out, port = world["tmp"] / f"elastic-{epochs}", free_port()
    cmd = [*TORCHRUN, "--nnodes", "1:2", "--nproc-per-node", "2", "--max-restarts", "2", *rendezvous(port, "elastic"),
           "-m", "sslkit", *sslkit_args(world["images"], out, epochs)]
    log = world["tmp"] / f"elastic-{epochs}.log"  # a file, not a pipe: nobody reads a pipe while the run goes on
    with open(log, "w") as sink:
        agent = subprocess.Popen(cmd, env={**world["env"], **ELASTIC_ENV}, stdout=sink, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # its own process group, killed whole on a timeout
    metrics, killed, deadline = out / "metrics.csv", None, time.monotonic() + 600
    while killed is None and time.monotonic() < deadline and agent.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) - 1 >= kill_after_rows:
            killed = worker_of_rank(agent.pid, 1)
            if killed:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    try:
        agent.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)  # torchrun and its workers
        agent.wait()
        raise
    assert killed, "the run ended before a worker could be killed"
    assert agent.returncode == 0, log.read_text()[-3000:]
    return out


def test_two_nodes_on_localhost_match_one_process(world):
    out = two_nodes(world, epochs=1)  # 16 images / 8: 2 steps
    # the first 2 steps of the kill test's 16-step reference: no warm-up, so step 1's LR is
    # the base LR whatever the run's length, and the losses of steps 1 and 2 are the same
    single = single_process(world, epochs=8)[:2]
    got = losses(out)
    assert [s for s, _ in got] == [1, 2]
    assert [v for _, v in got] == pytest.approx([v for _, v in single], rel=1e-4, abs=1e-5)
    assert len(list((world["tmp"] / "cache").glob("*/pixels.npy"))) == 1  # one cache entry, shared


def test_killed_worker_restarts_the_group_which_resumes_exactly(world):
    out = elastic_with_a_kill(world, epochs=8, kill_after_rows=3)  # 16 steps, checkpoints every 2
    got, single = losses(out), single_process(world, epochs=8)
    assert [s for s, _ in got] == list(range(1, 17))  # every step once, the re-run ones replaced
    assert [v for _, v in got] == pytest.approx([v for _, v in single], rel=1e-4, abs=1e-5)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["resumes"] and info["resumes"][0]["from_step"] >= 2
    assert "resumes" in info  # the restarted group continued from a checkpoint, not from scratch


@pytest.mark.slow
def test_longer_two_node_and_elastic_runs(world):
    single = single_process(world, epochs=6)
    for got in (losses(two_nodes(world, epochs=6)), losses(elastic_with_a_kill(world, epochs=6, kill_after_rows=7))):
        assert [s for s, _ in got] == list(range(1, 13))
        assert [v for _, v in got] == pytest.approx([v for _, v in single], rel=1e-4, abs=1e-5)


def test_slurm_example_parses_as_torchrun_and_sslkit_expect():
    """examples/slurm/pretrain.sbatch: its torchrun line is accepted by torchrun's parser and
    the sslkit part by `sslkit pretrain` (resolved without running), with the SLURM options
    a pre-emptible, requeued job needs."""
    from torch.distributed.run import get_args_parser

    text = (REPO / "examples" / "slurm" / "pretrain.sbatch").read_text()
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text and "srun" in text
    assert all(f"export {k}={v}" in text for k, v in ELASTIC_ENV.items())  # what the elastic test needed
    line = re.search(r"srun [^\n]*torchrun \\\n(.*?)\nrc=", text, re.S).group(1).replace("\\\n", " ")
    for var, value in {"$SLURM_JOB_NUM_NODES": "2", "$GPUS": "4", "$HEAD": "node1", "$SLURM_JOB_ID": "7",
                       "$RUN": "/tmp/run", "$DATA": "folder:/tmp/x"}.items():
        line = line.replace(f'"{var}', f'"{value}').replace(var, value)
    args = get_args_parser().parse_args(shlex.split(line))
    assert args.nnodes == "2" and args.max_restarts == 2 and "SIGUSR1" in args.signals_to_handle
    assert args.module and args.training_script == "sslkit"
    sslkit = args.training_script_args
    assert sslkit[:3] == ["pretrain", "--resume", "auto"]
