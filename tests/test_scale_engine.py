"""Long and small runs: resuming cuts ``metrics.csv`` back a row at a time (a 1M-row file is
never held in memory), and ``--checkpoint-every N`` alone sets the periodic checkpoints (a small
data set, whose epochs end every few steps, would otherwise checkpoint almost every step)."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from pathlib import Path

import pytest

from sslkit.engine.events import RunInfo
from sslkit.testing.runs import checkpoints, crashed_copy
from sslkit_plugins.callbacks.csv import CsvMetrics
from tests.conftest import make_images

HEADER = ["step", "epoch", "loss", "lr", "img_per_s", "z_norm"]


def csv_text(rows, end: str = "\n") -> str:
    """``rows`` as metrics.csv holds them (``\\n`` after each; ``end="\\r\\n"``: the csv module's default, an
    older sslkit's file)."""
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator=end).writerows(rows)
    return buf.getvalue()


def assert_same_text(got: str, expected: str) -> None:
    """``got == expected`` for files of megabytes, failing on the first line that differs (pytest's own
    diff of two 10 MB strings runs for many minutes)."""
    if got != expected:
        pairs = zip(got.splitlines(keepends=True), expected.splitlines(keepends=True))
        first = next(((i, a, b) for i, (a, b) in enumerate(pairs) if a != b), None)
        raise AssertionError(f"first differing line {first}" if first else f"{len(got)} vs {len(expected)} chars")


def text(path: Path) -> str:
    return path.read_bytes().decode()


def row(i: int) -> list:
    return [i, i // 1000, f"{1 / i:.9g}", f"{i * 1e-7:.9g}", "1234.5", f"{i % 97 / 7:.9g}"]


def test_resume_cuts_metrics_csv_back_streaming_with_bounded_memory(tmp_path):
    """200k rows (~10 MB), resumed at step 150000: the file keeps its header and exactly the rows up
    to that step, the next step is appended after them, and the rewrite's peak Python memory is far
    below the file's size (reading every row into a list took ~9x the file)."""
    n, start = 200_000, 150_000
    path = tmp_path / "metrics.csv"
    path.write_text(csv_text([HEADER, *map(row, range(1, n + 1))], end="\r\n"), newline="")  # an older file
    size = path.stat().st_size
    expected = csv_text([HEADER, *map(row, range(1, start + 1))])

    callback = CsvMetrics()
    run = RunInfo(out=tmp_path, info={}, start_step=start, total_steps=n, rank=0, world_size=1)
    tracemalloc.start()
    try:
        callback.on_run_start(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_same_text(text(path), expected)  # its CRLF rows rewritten with LF
    assert peak < size / 10, f"peak {peak} bytes while cutting back a {size}-byte file"
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.csv"]  # no temporary file left

    callback.on_step_end(start + 1, {"epoch": 150, "loss": 0.5, "lr": 0.25, "img_per_s": 10.0, "z_norm": 1.0})
    callback.on_run_end({})
    assert_same_text(text(path), expected + csv_text([[start + 1, 150, "0.5", "0.25", "10.0", "1"]]))


def test_resume_of_an_empty_or_header_only_metrics_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    for content in ("", csv_text([HEADER])):
        path.write_text(content, newline="")
        callback = CsvMetrics()
        callback.on_run_start(RunInfo(out=tmp_path, info={}, start_step=3, total_steps=9, rank=0, world_size=1))
        callback.on_step_end(4, {"epoch": 1, "loss": 2.0, "lr": 0.5, "img_per_s": 3.0, "z_norm": 1.5})
        callback.on_run_end({})
        assert text(path) == csv_text([HEADER, [4, 1, "2", "0.5", "3.0", "1.5"]])


# 16 images, batch 8: 2 steps per epoch; 5 epochs = 10 steps
ARGS = ["--task", "simclr", "--backbone", "timm:resnet10t", "--image-size", "16", "--batch-size", "8",
        "--epochs", "5", "--seed", "3", "--deterministic", "--quiet", "--no-cache", "--device", "cpu",
        "--keep-checkpoints", "0", "--task-opt", "proj_hidden_dim=32", "--task-opt", "proj_dim=16",
        "--warmup-epochs", "0.5"]
TOTAL = 10


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("scale") / "img", n_per_class=8, size=20)


def saved_steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoints(run)]


def losses(run: Path) -> list[tuple[str, str, str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def every_3(images, tmp_path_factory) -> Path:
    from click.testing import CliRunner

    from sslkit.cli import main

    out = tmp_path_factory.mktemp("every") / "run"
    result = CliRunner().invoke(main, ["pretrain", "--data", f"folder:{images}", "--out", str(out), *ARGS,
                                       "--checkpoint-every", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


def test_checkpoint_every_alone_sets_the_periodic_checkpoints(every_3):
    assert saved_steps(every_3) == [3, 6, 9, TOTAL]  # no epoch end (2, 4, ...) adds one; the last step does


def test_without_checkpoint_every_each_epoch_end_checkpoints(images, tmp_path, cli):
    out = tmp_path / "run"
    assert cli("pretrain", "--data", f"folder:{images}", "--out", out, *ARGS, "--max-steps", 7).exit_code == 0
    assert saved_steps(out) == [2, 4, 6, 7]  # every epoch end, and the last step (mid-epoch)


def test_a_resume_from_a_mid_epoch_checkpoint_repeats_the_uninterrupted_run(every_3, tmp_path, cli):
    """Cut back to step 3 (mid-epoch 2) as a crash at step 5 leaves it: metrics.csv still holds
    steps 4 and 5, which the resume drops; it repeats every loss and writes the same checkpoints."""
    reference = losses(every_3)
    assert [int(r[0]) for r in reference] == list(range(1, TOTAL + 1)) and len({r[2] for r in reference}) > 1
    run = crashed_copy(every_3, tmp_path / "run", keep=1)
    lines = text(run / "metrics.csv").splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(lines[:6]), newline="")  # header and steps 1..5
    assert saved_steps(run) == [3]
    result = cli("pretrain", "--resume", run, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert json.loads((run / "run.json").read_text())["resumes"][0]["from_step"] == 3
    assert losses(run) == reference
    assert saved_steps(run) == [3, 6, 9, TOTAL]
