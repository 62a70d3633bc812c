"""What a run writes as its metrics: a metrics.csv row that cannot be written (a full disk) stops the
run in one line and ``--resume`` completes the file; a resume keeps only metrics.csv's well-formed rows;
a scalar a task first returns at a later step gets its column; lines end with "\\n"; TensorBoard holds
each step once after a resume from step 0. The callbacks are driven directly where that shows the
behaviour (milliseconds); the full-disk run is the CLI in-process on a tiny ResNet."""

from __future__ import annotations

import builtins
import csv
import errno
import json
import os
import re
from pathlib import Path

import pytest

from sslkit.engine.events import Events, RunInfo
from sslkit.errors import UsageError
from sslkit_plugins.callbacks import csv as csv_callback
from sslkit_plugins.callbacks.csv import CsvMetrics
from tests.conftest import make_images

HEADER = "step,epoch,loss,lr,img_per_s"
ARGS = ["--task", "simclr", "--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8",
        "--max-steps", "8", "--checkpoint-every", "2", "--seed", "1", "--quiet"]


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metrics(step: int, **extra: float) -> dict[str, float]:
    return {"epoch": 0, "loss": 1.0 + step / 8, "lr": 0.5, "img_per_s": 100.0, **extra}


class DiskFills:
    """A text file on a disk with ``room`` bytes left: ``flush`` writes what fits, then raises ENOSPC as
    a full disk does (the row cut where the disk filled up); ``close`` flushes again (and fails again)."""

    def __init__(self, path, mode: str, room: int) -> None:
        self.raw, self.room, self.buffered = builtins.open(path, mode + "b"), room, b""

    def write(self, text: str) -> int:
        self.buffered += text.encode()
        return len(text)

    def flush(self) -> None:
        fits, self.buffered = self.buffered[:self.room], self.buffered[self.room:]
        self.raw.write(fits)
        self.raw.flush()
        self.room -= len(fits)
        if self.buffered:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.raw.close()


def test_a_full_disk_stops_the_run_in_one_line_and_resume_logs_every_step_once(tmp_path, monkeypatch, cli):
    images = make_images(tmp_path / "img", n_per_class=8, size=32)
    out = tmp_path / "run"

    def full_disk_open(path, mode="r", **kw):
        if Path(path).name == "metrics.csv" and mode in ("w", "a"):
            return DiskFills(path, mode, room=len(HEADER) + 1 + 5 * 40)  # ~4-5 rows of ~45 bytes
        return builtins.open(path, mode, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(csv_callback, "open", full_disk_open, raising=False)
        failed = cli("pretrain", "--data", f"folder:{images}", "--out", out, *ARGS)
    assert failed.exit_code == 2, failed.output
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    match = re.fullmatch(r"error: cannot write '(.+)': No space left on device; the run stops at step (\d+), "
                         r"the last good checkpoint, (step-\d+), is kept: free space, then --resume", lines[0])
    assert match, lines[0]
    step = int(match[2])
    assert match[1] == str(out / "metrics.csv") and 3 <= step < 8
    assert match[3] == f"step-{(step - 1) // 2 * 2:08d}"  # the newest checkpoint before the failed row
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == match[3]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "encoder.safetensors").exists()

    resumed = cli("pretrain", "--resume", out, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    rows = rows_of(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))  # every step's row once, the cut one re-logged
    assert all(None not in r and all(r.values()) for r in rows)  # no cell missing, none too many
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_resume_whose_metrics_csv_cannot_be_rewritten_is_recorded_failed(tmp_path, monkeypatch, cli):
    """The resume's metrics.csv rewrite (on_run_start) ran before the session recorded failures: a full disk
    there stopped the run in one line, but run.json kept the status the resume found ("interrupted")."""
    images = make_images(tmp_path / "img", n_per_class=8, size=32)
    out = tmp_path / "run"
    assert cli("pretrain", "--data", f"folder:{images}", "--out", out, *ARGS).exit_code == 0
    for ckpt in (out / "checkpoints").glob("step-*"):  # as if interrupted after step 4
        if int(ckpt.name.split("-")[1].split(".")[0]) > 4:
            ckpt.unlink() if ckpt.is_file() else __import__("shutil").rmtree(ckpt)
    (out / "metrics.csv").write_text("".join((out / "metrics.csv").read_text().splitlines(True)[:5]))
    info = json.loads((out / "run.json").read_text())
    info["status"] = "interrupted"
    (out / "run.json").write_text(json.dumps(info))
    kept = {p: p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()}
    metrics_before = (out / "metrics.csv").read_bytes()

    def full_disk_open(path, mode="r", **kw):  # the rewrite's temporary file: no room
        if mode == "w":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return builtins.open(path, mode, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(csv_callback, "open", full_disk_open, raising=False)
        failed = cli("pretrain", "--resume", out, "--quiet")
    assert failed.exit_code == 2, failed.output
    assert failed.stderr.strip().splitlines() == [
        f"error: cannot write {str(out / 'metrics.csv')!r}: No space left on device; the run stops at step 4, the "
        f"last good checkpoint, step-00000004, is kept: free space, then --resume"]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert {p: p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()} == kept
    assert (out / "metrics.csv").read_bytes() == metrics_before

    resumed = cli("pretrain", "--resume", out, "--quiet")  # room again
    assert resumed.exit_code == 0, resumed.output
    assert [int(r["step"]) for r in rows_of(out / "metrics.csv")] == list(range(1, 9))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


class Row:
    """A callback whose ``on_step_end`` raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def on_step_end(self, step, metrics):
        raise self.exc

    def on_run_end(self, summary):
        raise self.exc


def test_a_builtin_callback_is_never_switched_off(tmp_path, capsys):
    """An OSError of sslkit's own callback stops the run (one line); a bug in it is raised as it is;
    a plugin's callback is still reported and switched off; on_run_end of a failed run only notes it."""
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.csv"))
    events = Events([("'csv' (plugin 'csv')", Row(full), True), ("'x' (plugin 'x')", Row(full), False)])
    events.emit("on_run_start", RunInfo(tmp_path, {}, 4, 10, 0, 1))
    with pytest.raises(UsageError) as stop:
        events.emit("on_step_end", 6, {"loss": 1.0})
    assert str(stop.value) == (f"cannot write {str(tmp_path / 'metrics.csv')!r}: No space left on device; the run "
                               f"stops at step 6, the last good checkpoint, step-00000004, is kept: free space, "
                               f"then --resume")
    assert [label for label, _ in events.active] == ["'csv' (plugin 'csv')", "'x' (plugin 'x')"]

    events.emit("on_run_end", {"status": "failed", "steps": 6})  # the error that stopped the run is reported
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"sslkit: callback 'csv' (plugin 'csv') in on_run_end: cannot write "
                      f"{str(tmp_path / 'metrics.csv')!r}: No space left on device")
    assert len(err) == 2 and "callback 'x' (plugin 'x') raised OSError" in err[1], err
    assert [label for label, _ in events.active] == ["'csv' (plugin 'csv')"]

    bug = Events([("'csv' (plugin 'csv')", Row(KeyError("loss")), True)])
    with pytest.raises(KeyError):
        bug.emit("on_step_end", 1, {})
    assert len(bug.active) == 1


def write_bytes(path: Path, *lines: bytes) -> None:
    path.write_bytes(b"".join(lines))


def resume_at(out: Path, step: int) -> CsvMetrics:
    cb = CsvMetrics()
    cb.on_run_start(RunInfo(out, {}, step, 10, 0, 1))
    return cb


@pytest.mark.parametrize("tail, at", [
    (b"\0" * 200_000, 3),  # a power loss: the file's size grew, its data never came (one long line of NULs)
    (b"2", 1),  # a row cut after its first byte: not a row with step 2 and empty cells
])
def test_resume_keeps_only_well_formed_rows(tmp_path, capsys, tail, at):
    good = [b"1,0,1.5,0.5,10.0\r\n", b"2,0,1.25,0.5,10.0\r\n", b"3,0,1.125,0.5,10.0\r\n"]  # CRLF: an older file
    write_bytes(tmp_path / "metrics.csv", HEADER.encode() + b"\r\n", *good[:at], tail)
    cb = resume_at(tmp_path, at)
    cb.on_step_end(at + 1, metrics(at + 1))
    cb.on_run_end({"status": "finished"})
    text = (tmp_path / "metrics.csv").read_bytes()
    assert text == (HEADER.encode() + b"\n" + b"".join(g.replace(b"\r\n", b"\n") for g in good[:at])
                    + f"{at + 1},0,{1 + (at + 1) / 8:.9g},0.5,100.0\n".encode())
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: {tmp_path / 'metrics.csv'}: dropped 1 damaged line(s) (a cut row or NUL bytes: "
                   f"what a full disk, a crash or a power loss leaves)"]


def test_resume_drops_duplicate_short_and_non_numeric_rows_and_says_which_steps_have_none(tmp_path, capsys):
    write_bytes(tmp_path / "metrics.csv", HEADER.encode() + b"\n",
                b"1,0,1.5,0.5,10.0\n", b"2,0,1.25,0.5,10.0\n",
                b"2,0,1.25,0.5,10.0\n",  # a step twice
                b"3,0\n",  # too few fields
                b"x,0,1.1,0.5,10.0\n",  # no integer step
                b"4,0,1.1,0.5,10.0,7\n",  # too many fields
                b"5,0,1.0,\x00.5,10.0\n",  # NUL bytes inside
                b"6,0,0.9,0.5,10.0\n",
                b"7,0,0.8,0.5,10.0\n")  # past the checkpoint: logged again, not damage
    resume_at(tmp_path, 6).on_run_end({"status": "finished"})
    assert [r["step"] for r in rows_of(tmp_path / "metrics.csv")] == ["1", "2", "6"]
    assert capsys.readouterr().err.splitlines() == [
        f"note: {tmp_path / 'metrics.csv'}: dropped 5 damaged line(s) (a cut row or NUL bytes: what a full disk, a "
        f"crash or a power loss leaves); 3 of steps 1-6 have no row"]


def test_a_scalar_first_returned_later_gets_its_column_and_a_resume_reads_it_back(tmp_path, capsys):
    cb = CsvMetrics()
    cb.on_run_start(RunInfo(tmp_path, {}, 0, 10, 0, 1))
    cb.on_step_end(1, metrics(1))
    cb.on_step_end(2, metrics(2, z_norm=0.25))
    cb.on_step_end(3, metrics(3, z_norm=0.5, a_acc=0.75))
    cb.on_step_end(4, metrics(4, a_acc=1.0))  # a scalar the task does not return at every step: an empty cell
    text = (tmp_path / "metrics.csv").read_text()
    assert "\r" not in text
    assert text.splitlines()[0] == HEADER + ",a_acc,z_norm"
    rows = rows_of(tmp_path / "metrics.csv")
    assert [(r["step"], r["a_acc"], r["z_norm"]) for r in rows] == [
        ("1", "", ""), ("2", "", "0.25"), ("3", "0.75", "0.5"), ("4", "1", "")]

    # killed after step 4 (no on_run_end); resumed from the checkpoint at step 3
    again = resume_at(tmp_path, 3)
    again.on_step_end(4, metrics(4, z_norm=2.0))
    again.on_run_end({"status": "finished"})
    assert [(r["step"], r["a_acc"], r["z_norm"]) for r in rows_of(tmp_path / "metrics.csv")] == [
        ("1", "", ""), ("2", "", "0.25"), ("3", "0.75", "0.5"), ("4", "", "2")]
    assert capsys.readouterr().err == ""


def test_a_new_run_writes_lf_line_endings(tmp_path):
    cb = CsvMetrics()
    cb.on_run_start(RunInfo(tmp_path, {}, 0, 2, 0, 1))
    cb.on_step_end(1, metrics(1))
    cb.on_run_end({"status": "finished"})
    assert (tmp_path / "metrics.csv").read_bytes() == f"{HEADER}\n1,0,1.125,0.5,100.0\n".encode()


def test_close_after_a_failed_write_reports_nothing_more(tmp_path, monkeypatch):
    """The row a full disk refused is still buffered: closing writes it again and fails again; the
    first error is the one reported."""
    monkeypatch.setattr(csv_callback, "open", lambda path, mode="r", **kw: DiskFills(path, mode, room=40),
                        raising=False)
    cb = CsvMetrics()
    cb.on_run_start(RunInfo(tmp_path, {}, 0, 2, 0, 1))
    with pytest.raises(OSError) as full:
        cb.on_step_end(1, metrics(1))
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(tmp_path / "metrics.csv")
    cb.on_run_end({"status": "failed"})  # no second error
    assert cb.file is None


def test_tensorboard_resumed_from_step_0_logs_each_step_once(tmp_path):
    """A run killed before its first checkpoint restarts at step 0: the steps it had logged are dropped."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslkit_plugins.callbacks.tensorboard import TensorBoard

    for session, steps in ((1, (1, 2, 3)), (2, (1, 2, 3, 4, 5))):
        tb = TensorBoard()
        tb.on_run_start(RunInfo(tmp_path, {}, 0, 5, 0, 1))
        for step in steps:
            tb.on_step_end(step, {"loss": float(step + 10 * session)})
        tb.writer.close()  # the first session killed: no on_run_end
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, s + 20) for s in range(1, 6)]


class Started:
    """A plugin's callback that keeps what on_run_start gave it and needs it in on_run_end."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_run_start(self, run):
        self.events.append("on_run_start")
        self.out = run.out

    def on_run_end(self, summary):
        self.events.append(f"on_run_end {summary['status']} {self.out}")


def test_a_failed_start_ends_only_the_callbacks_that_started(tmp_path, capsys):
    """A built-in's on_run_start that cannot write stops the run; a callback after it never got on_run_start,
    so it gets no on_run_end either (it read state on_run_start sets: an AttributeError line); one before
    it started and ends."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.csv"))

    class FailingStart(Row):
        def on_run_start(self, run):
            raise self.exc

    before, after = Started(), Started()
    events = Events([("'b' (plugin 'b')", before, False), ("'csv' (plugin 'csv')", FailingStart(full), True),
                     ("'a' (plugin 'a')", after, False)])
    with pytest.raises(UsageError):
        events.emit("on_run_start", RunInfo(tmp_path, {}, 4, 10, 0, 1))
    events.emit("on_run_end", {"status": "failed", "steps": 4})
    assert before.events == ["on_run_start", f"on_run_end failed {tmp_path}"]
    assert after.events == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "callback 'csv' (plugin 'csv') in on_run_end: cannot write" in err[0], err
