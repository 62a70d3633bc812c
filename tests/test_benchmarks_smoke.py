"""The GPU speed benchmarks run end to end in a tiny CPU configuration (the numbers mean
nothing here; a GPU session runs ``benchmarks/gpu_checks.sh``). Each prints one table row
per (batch, mode); on the CPU the graphs mode falls back and says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--device", "cpu", "--batch-sizes", "2", "--steps", "1", "--warmup", "1", "--profile-steps", "0",
         "--image-size", "32", "--modes", "eager,graphs", "--no-compile", "--precision", "fp32"]
FALLBACK = "not captured: CUDA graphs need a CUDA device, this run is on cpu"


def bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, script, *SMOKE, *args], cwd=REPO / "benchmarks", capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("note: --capture graphs:") == 1  # said once
    return proc.stdout


def table_rows(out: str, label: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {label} |")]


def test_mae_mfu_smoke():
    out = bench("mae_mfu.py", "--backbone", "timm:vit_tiny_patch16_224")
    rows = table_rows(out, "MAE vit_tiny_patch16_224")
    assert [(r[1], r[2]) for r in rows] == [("2", "eager"), ("2", "graphs")]
    assert rows[0][8] == "" and rows[1][8] == FALLBACK
    assert all(float(r[4].replace(",", "")) >= 0 and r[3].endswith(" ms") for r in rows)


def test_simclr_r50_speed_smoke_with_the_timm_reference():
    out = bench("simclr_r50_speed.py", "--backbone", "timm:resnet18")
    rows = table_rows(out, "SimCLR resnet18")
    assert [(r[1], r[2]) for r in rows] == [("2", "eager"), ("2", "graphs")] and rows[1][8] == FALLBACK
    timm_rows = [line for line in out.splitlines() if line.startswith("| 4 | False |")]
    assert len(timm_rows) == 1 and "(batch 2)" in timm_rows[0]


def test_gpu_checks_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_checks.sh")]).returncode == 0
