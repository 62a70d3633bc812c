"""CUDA paths of the engine: fp16 with GradScaler (and its state resumed exactly), bf16 +
torch.compile, channels_last for CNNs, an NCCL launch under torchrun with --sync-bn, and an
ONNX export of a GPU-trained run, and ``--capture graphs`` (the step captured, a bit-identical
resume, MAE + compile captured, fp16 falling back in one line). Skipped where no CUDA GPU is
present (CI has none); run on a GPU machine with ``pytest tests/test_gpu.py`` (or
``bash benchmarks/gpu_checks.sh``, which runs the capture tests and the speed benchmarks)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.testing import crashed_copy
from tests.conftest import make_images, run_sslkit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CNN = ["--task", "simclr", "--backbone", "timm:resnet10t", "--image-size", "32", "--batch-size", "8",
       "--task-opt", "proj_hidden_dim=64", "--task-opt", "proj_dim=32", "--device", "cuda", "--quiet"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("gpu") / "img", n_per_class=16, size=40)


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def finished(run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished"
    assert all(math.isfinite(float(r["loss"])) for r in rows(run))
    return info


def test_fp16_scaler_state_is_checkpointed_and_resumed_exactly(images, tmp_path):
    from sslkit import checkpoint

    ref = tmp_path / "ref"
    proc = run_sslkit("pretrain", "--data", f"folder:{images}", "--out", ref, *CNN, "--precision", "fp16",
                      "--epochs", "3", "--checkpoint-every", "2", "--keep-checkpoints", "0", "--seed", "5",
                      "--deterministic")
    assert proc.returncode == 0, proc.stderr
    info = finished(ref)
    assert info["total_steps"] == 12 and info["optimization"]["channels_last"] is True

    ckpts = sorted((ref / "checkpoints").iterdir())
    _, state = checkpoint.load(ckpts[2])
    assert state["step"] == 6
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0  # GradScaler state saved

    crashed = crashed_copy(ref, tmp_path / "crashed", keep=3)  # a crash right after step 6
    proc = run_sslkit("pretrain", "--resume", crashed, "--quiet")
    assert proc.returncode == 0, proc.stderr
    again = rows(crashed)
    assert [int(r["step"]) for r in again] == list(range(1, 13))
    assert [(r["loss"], r["lr"]) for r in again] == [(r["loss"], r["lr"]) for r in rows(ref)]


def test_bf16_compile_channels_last_cnn(images, tmp_path):
    out = tmp_path / "run"
    proc = run_sslkit("pretrain", "--data", f"folder:{images}", "--out", out, *CNN, "--precision", "bf16",
                      "--compile", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    info = finished(out)
    assert info["optimization"]["channels_last"] is True
    assert info["environment"]["cuda"] and info["environment"]["device"].startswith("cuda")
    assert float(rows(out)[-1]["img_per_s"]) > 0


def test_mae_vit_bf16_compile(images, tmp_path):
    out = tmp_path / "run"
    proc = run_sslkit("pretrain", "--task", "mae", "--data", f"folder:{images}", "--out", out,
                      "--backbone", "timm:vit_tiny_patch16_224", "--image-size", "32", "--backbone-opt", "patch_size=8",
                      "--batch-size", "8", "--epochs", "2", "--device", "cuda", "--precision", "bf16", "--compile",
                      "--quiet")
    assert proc.returncode == 0, proc.stderr
    info = finished(out)
    assert info["optimization"]["channels_last"] is False  # token backbones stay contiguous


def test_torchrun_nccl_sync_bn_then_onnx_export(images, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "sslkit", "pretrain", "--data", f"folder:{images}", "--out", str(out), *CNN, "--sync-bn",
           "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    info = finished(out)
    assert info["environment"]["world_size"] == 1 and info["config"]["sync_bn"] is True

    onnx = tmp_path / "encoder.onnx"
    proc = run_sslkit("export", out, "--out", onnx)  # exports on CPU and checks parity against torch
    assert proc.returncode == 0, proc.stderr
    assert onnx.stat().st_size > 1_000_000


def capture_notes(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("note: --capture")]


def test_capture_graphs_resumes_bit_identically_and_tracks_eager(images, tmp_path):
    """--capture graphs (bf16, accumulation, clipping, --deterministic): the step is
    captured (no note), a crash-and-resume repeats every loss and LR exactly (the resumed
    session warms up eagerly, then captures anew), and the losses follow the eager run's."""
    args = [*CNN, "--precision", "bf16", "--epochs", "3", "--checkpoint-every", "2", "--keep-checkpoints", "0",
            "--seed", "5", "--deterministic", "--accumulate", "2", "--batch-size", "4", "--grad-clip", "1.0"]
    ref, eager = tmp_path / "ref", tmp_path / "eager"
    proc = run_sslkit("pretrain", "--data", f"folder:{images}", "--out", ref, *args, "--capture", "graphs")
    assert proc.returncode == 0, proc.stderr
    assert capture_notes(proc) == []  # captured: nothing to say
    finished(ref)
    proc = run_sslkit("pretrain", "--data", f"folder:{images}", "--out", eager, *args)
    assert proc.returncode == 0, proc.stderr
    got, want = rows(ref), rows(eager)
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    for g, w in zip(got, want):  # same random numbers and kernels; bf16 leaves room for rounding
        assert math.isclose(float(g["loss"]), float(w["loss"]), rel_tol=2e-2), (g, w)

    # "died" after step 4: the resumed session runs 3 warm-up steps, then replays
    crashed = crashed_copy(ref, tmp_path / "crashed", keep=2)
    proc = run_sslkit("pretrain", "--resume", crashed, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [(r["step"], r["loss"], r["lr"]) for r in rows(crashed)] == [(r["step"], r["loss"], r["lr"]) for r in got]


def test_capture_graphs_mae_vit_bf16_compile(images, tmp_path):
    out = tmp_path / "run"
    proc = run_sslkit("pretrain", "--task", "mae", "--data", f"folder:{images}", "--out", out,
                      "--backbone", "timm:vit_tiny_patch16_224", "--image-size", "32", "--backbone-opt", "patch_size=8",
                      "--batch-size", "8", "--epochs", "2", "--device", "cuda", "--precision", "bf16", "--compile",
                      "--capture", "graphs", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert capture_notes(proc) == []
    finished(out)
    assert len({r["loss"] for r in rows(out)}) > 1  # replays see new batches and new masks


def test_capture_graphs_fp16_falls_back_with_one_line(images, tmp_path):
    out = tmp_path / "run"
    proc = run_sslkit("pretrain", "--data", f"folder:{images}", "--out", out, *CNN, "--precision", "fp16",
                      "--epochs", "1", "--capture", "graphs")
    assert proc.returncode == 0, proc.stderr
    assert capture_notes(proc) == ["note: --capture graphs: fp16's gradient scaler reads the device every step "
                                   "(use --precision bf16); the step runs eagerly"]
    finished(out)


def test_prefetch_to_cuda_gives_the_same_batches():
    """The data path: pinned uint16 batches copied one step ahead on their own stream."""
    from sslkit.engine.transfer import prefetch_to

    host = [torch.randint(0, 65536, (4, 3, 8, 8), dtype=torch.int32).to(torch.uint16).pin_memory() for _ in range(4)]
    got = [b.cpu() for b in prefetch_to(iter(host), torch.device("cuda"))]
    assert len(got) == 4 and all(g.dtype == torch.uint16 and torch.equal(g, h) for g, h in zip(got, host))


def test_eval_attention_on_cuda_draws_the_cpu_maps(images, tmp_path):
    """``eval attention --device cuda`` computes the saliency the CPU default does, and draws its grid."""
    from sslkit.eval.attention import evaluate_attention, saliency
    from sslkit.run import load_run

    run = tmp_path / "run"
    assert run_sslkit("pretrain", "--data", f"folder:{images}", "--out", run, *CNN[:-3], "--max-steps", "1",
                      "--epochs", "1", "--device", "cuda", "--quiet").returncode == 0
    encoder = load_run(run).build_encoder()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    on_cpu, on_gpu = saliency(encoder, x), saliency(encoder.to("cuda"), x.to("cuda"))
    assert on_cpu[0] == on_gpu[0] and torch.allclose(on_cpu[1], on_gpu[1].cpu(), atol=0.02)  # cuDNN: TF32
    report = evaluate_attention(str(run), str(images), str(tmp_path / "cuda.png"), 4, progress=False, device="cuda")
    assert report["files"] == [str(tmp_path / "cuda.png")] and (tmp_path / "cuda.png").stat().st_size > 5000


def test_knn_votes_on_cuda_equal_the_cpus():
    """``eval knn`` scores on the encoder's device: a GPU's votes are the CPU's."""
    from sslkit.eval.knn import knn_votes

    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(3000, 64)), rng.normal(size=(700, 64))
    labels = rng.integers(0, 5, size=3000)
    cpu = knn_votes(train, labels, test, 5, (20, 200), chunk=256)
    gpu = knn_votes(train, labels, test, 5, (20, 200), chunk=256, device="cuda")
    for k in (20, 200):
        assert np.allclose(cpu[k], gpu[k], atol=1e-4), k
