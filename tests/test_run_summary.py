"""What a user reads during and after ``sslkit pretrain``: the progress lines and bar, the summary line,
the stop-signal notes and run.json's session records (each session's steps and time, the run's total)."""

from __future__ import annotations

import io
import json
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import install_plugin, make_images


REPO = Path(__file__).resolve().parents[1]
# 16 images, batch 8: 2 steps per epoch
TINY = ["--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8", "--seed", "1"]

LATE = '''
"""Test task: a metric that is one number for two steps, then a vector of 4."""
import torch

from sslkit.api import MultiView, Task, hookimpl, recipe


class LateVector(Task):
    def __init__(self, backbone, options, spec):
        super().__init__(backbone, options, spec)
        self.calls = 0

    def views(self, spec):
        return MultiView([recipe("simclr", spec.image_size)] * 2, spec.mean, spec.std)

    def forward(self, views):
        x1, x2 = views
        self.calls += 1
        calls = float(self.calls) if self.calls < 3 else torch.ones(4)
        return {"loss": (self.encoder(x1) - self.encoder(x2)).pow(2).mean(), "calls": calls}


@hookimpl
def register_tasks(register):
    register("late_vector", LateVector)
'''


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("summary") / "img", n_per_class=8, size=32)


def _info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _step_lines(stderr: str, task: str = "simclr") -> list[int]:
    return [int(m.group(1)) for m in re.finditer(rf"^{task} step (\d+)/\d+ ", stderr, re.M)]


def test_a_resumed_session_says_its_own_steps_and_run_json_times_every_session(images, tmp_path, cli):
    run = tmp_path / "run"
    first = cli("pretrain", "--task", "simclr", "--data", f"folder:{images}", "--out", run, "--max-steps", 4, *TINY)
    assert first.exit_code == 0, first.output
    assert re.fullmatch(rf"done: 4 steps \(the --max-steps bound\) in \d+\.\d s, \d+\.\d img/s, final loss "
                        rf"\d\.\d{{4}}; run saved in {re.escape(str(run))}", first.stdout.strip().splitlines()[-1])
    # 4 steps to a file: a line every ceil(4 / 10) = 1 step
    assert _step_lines(first.stderr) == [1, 2, 3, 4]
    info = _info(run)
    own = info["first_session"]
    assert own["steps"] == 4 and own["seconds"] == info["summary"]["seconds"] > 0
    assert info["summary"]["total_seconds"] == own["seconds"] and info["summary"]["untimed_sessions"] == 0

    again = cli("pretrain", "--resume", run, "--max-steps", 15)
    assert again.exit_code == 0, again.output
    line = again.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"done: 15 steps \(the --max-steps bound\); this session trained 11 of them \(from step 4\) "
                     r"in (\d+\.\d) s, (\d+\.\d) img/s; final loss \d\.\d{4}; run saved in .*", line)
    assert m, line
    # 15 steps: a line every ceil(15 / 10) = 2 steps, and the last
    assert _step_lines(again.stderr) == [6, 8, 10, 12, 14, 15]
    info = _info(run)
    summary, (resumed,) = info["summary"], info["resumes"]
    assert info["first_session"] == own  # kept as the first session recorded it
    assert summary["steps"] == 15 and summary["steps_this_session"] == 11 and summary["from_step"] == 4
    assert resumed["from_step"] == 4 and resumed["steps"] == 11 and resumed["seconds"] == summary["seconds"]
    assert float(m.group(1)) == round(summary["seconds"], 1)
    assert float(m.group(2)) == round(summary["img_per_s"], 1)
    assert summary["img_per_s"] == pytest.approx(11 * 8 / summary["seconds"], rel=0.05)  # this session's images
    assert summary["total_seconds"] == round(own["seconds"] + resumed["seconds"], 2)
    assert summary["untimed_sessions"] == 0


def test_a_run_recorded_before_session_times_resumes_and_counts_what_it_can(images, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("pretrain", "--task", "simclr", "--data", f"folder:{images}", "--out", run, "--max-steps", 2,
               "--quiet", *TINY).exit_code == 0
    info = _info(run)
    old_seconds = info["summary"]["seconds"]
    del info["first_session"]  # as an earlier version wrote it
    for key in ("from_step", "total_seconds", "untimed_sessions"):
        del info["summary"][key]
    (run / "run.json").write_text(json.dumps(info))
    r = cli("pretrain", "--resume", run, "--max-steps", 3, "--quiet")
    assert r.exit_code == 0, r.output
    info = _info(run)
    # the old summary was the first session's (no resume before it): its time counts
    assert info["first_session"] == {"steps": 2, "seconds": old_seconds}
    assert info["summary"]["total_seconds"] == round(old_seconds + info["resumes"][0]["seconds"], 2)

    # a run killed in its first session, by an earlier version: that session's time is unknown
    info = _info(run)
    del info["first_session"]
    del info["summary"]
    info["resumes"][0] = {k: v for k, v in info["resumes"][0].items() if k not in ("steps", "seconds")}
    info["status"] = "running"
    (run / "run.json").write_text(json.dumps(info))
    r = cli("pretrain", "--resume", run, "--max-steps", 4, "--quiet")
    assert r.exit_code == 0, r.output
    info = _info(run)
    assert "first_session" not in info and info["summary"]["untimed_sessions"] == 2
    assert info["summary"]["total_seconds"] == info["resumes"][1]["seconds"] > 0


def test_a_metric_that_stops_being_a_scalar_later_is_one_line_and_earlier_rows_are_logged(images, tmp_path, cli,
                                                                                          monkeypatch):
    root = install_plugin(tmp_path / "plugins", "sslkit_latevector", "latevector", LATE)
    monkeypatch.syspath_prepend(str(root))
    run = tmp_path / "run"
    r = cli("pretrain", "--task", "late_vector", "--data", f"folder:{images}", "--out", run, "--max-steps", 5,
            "--quiet", *TINY)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert lines[0] == ("error: task 'late_vector' (plugin 'latevector') returned the metric 'calls' of shape (4,); "
                        "every value besides 'loss' is one number for metrics.csv: a Python int/float or a "
                        "1-element tensor")
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]  # step 2 completed: its row is there
    assert _info(run)["status"] == "failed"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_shows_each_steps_own_values_with_its_count(monkeypatch):
    from sslkit.engine.log import Progress

    screen = _Terminal()
    monkeypatch.setattr("sys.stderr", screen)  # a terminal
    progress = Progress("simclr", 20, 0, True)
    progress.bar.mininterval = 0  # draw at every update
    for step in range(1, 21):
        progress.update({"step": step, "epoch": 0, "loss": step / 1000, "lr": 0.1, "img_per_s": 10.0 * step})
    progress.close()
    frames = [f for f in screen.getvalue().split("\r") if "loss=" in f]
    assert len(frames) >= 20
    for frame in frames:
        step = int(re.search(r"(\d+)/20", frame).group(1))
        assert f"loss={step / 1000:.4f}" in frame and f"img_s={10 * step}" in frame, frame


def test_plain_progress_lines_come_every_tenth_of_the_run_rounded_up():
    from sslkit.engine.log import log_interval

    assert [log_interval(n) for n in (1, 9, 10, 11, 15, 19, 20, 21, 999, 1000, 1001, 5000)] == \
        [1, 1, 1, 2, 2, 2, 2, 3, 100, 100, 100, 100]


def test_each_stop_signals_note_says_what_applies_to_it(capsys):
    from sslkit.engine.signals import StopSignal

    StopSignal()._handle(signal.SIGINT, None)
    sigint = capsys.readouterr().out.strip()
    assert sigint == "SIGINT: stopping after this step and writing a checkpoint (Ctrl-C again to abort now)"
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        StopSignal()._handle(sig, None)
        note = capsys.readouterr().out.strip()
        assert note == (f"{sig.name}: stopping after this step and writing a checkpoint, then exiting 75 "
                        f"so that the job can be requeued")


def test_readme_names_every_status_run_json_can_hold():
    text = (REPO / "README.md").read_text()
    section = text.split("### `sslkit pretrain`", 1)[1].split("\n### ", 1)[0]
    sources = "".join((REPO / "sslkit" / "engine" / f).read_text() for f in ("session.py", "setup.py"))
    statuses = {"starting", "running", "finished", "interrupted", "failed", "diverged"}
    assert all(f'"{s}"' in sources for s in statuses)  # each is one the engine writes
    listing = re.search(r"`run.json`'s `status` is (.*?)\.\s", section, re.S)
    assert listing, "no list of statuses"
    assert {s for s in statuses if f"`{s}`" in listing.group(1)} == statuses
