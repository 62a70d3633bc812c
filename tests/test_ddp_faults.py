"""Faults of a two-process (gloo, CPU) run, launched as torchrun launches it (RANK, WORLD_SIZE,
MASTER_ADDR/PORT) through a wrapper that injects them: a first decode on rank 0 longer than the
process group's timeout, a user error in that decode, a full disk at a checkpoint; and a file
system without ``flock`` under the run and cache locks. Each way of waiting or stopping runs by default once;
its other sites (the fingerprint's, metrics.csv's) are marked slow: two processes each, ~25 s on 2 cores."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sslkit.engine.data_setup import CACHE_LOCK, cache_build_lock
from sslkit.engine.lock import RunLock
from sslkit.errors import UsageError
from tests.conftest import make_images
from tests.test_ddp import free_port

WRAPPER = '''
import errno, fcntl, os, signal, sys, time
rank = int(os.environ["RANK"])
import torch
import sslkit.distributed as d
import sslkit.engine.data_setup as ds
d.init.__defaults__ = (float(os.environ["T_TIMEOUT_MIN"]),)  # the group's collective timeout, in minutes
load = ds.load_data
if rank == 0 and os.environ.get("T_SLOW_DECODE_S"):
    def slow(*a, **k):
        time.sleep(float(os.environ["T_SLOW_DECODE_S"]))
        return load(*a, **k)
    ds.load_data = slow
if rank == 0 and os.environ.get("T_DECODE_ERROR"):
    def bad(*a, **k):
        time.sleep(60 * float(os.environ["T_TIMEOUT_MIN"]) + 3)
        raise ds.UsageError(os.environ["T_DECODE_ERROR"])
    ds.load_data = bad
if rank == 0 and os.environ.get("T_DECODE_SIGNAL"):
    def signalled(*a, **k):
        os.kill(os.getpid(), getattr(signal, os.environ["T_DECODE_SIGNAL"]))
        time.sleep(60 * float(os.environ["T_TIMEOUT_MIN"]) + 3)
        return load(*a, **k)
    ds.load_data = signalled
if rank == 0 and os.environ.get("T_SLOW_FINGERPRINT_S"):  # the dataset fingerprint, read by rank 0 alone
    import sslkit.engine.setup as su
    fingerprint = su.fingerprint
    def slow_fingerprint(*a, **k):
        time.sleep(float(os.environ["T_SLOW_FINGERPRINT_S"]))
        return fingerprint(*a, **k)
    su.fingerprint = slow_fingerprint
if rank == 0 and os.environ.get("T_FINGERPRINT_ERROR"):
    import sslkit.engine.setup as su
    def bad_fingerprint(*a, **k):
        time.sleep(60 * float(os.environ["T_TIMEOUT_MIN"]) + 3)
        raise OSError(errno.EIO, os.environ["T_FINGERPRINT_ERROR"])
    su.fingerprint = bad_fingerprint
if rank == 1 and os.environ.get("T_FLOCK_LOG"):
    flock = fcntl.flock
    def logged(fd, op):
        with open(os.environ["T_FLOCK_LOG"], "a") as f:
            f.write(f"{op}\\n")
        return flock(fd, op)
    fcntl.flock = logged
if os.environ.get("T_CKPT_FAIL_AT"):
    save = torch.save
    def failing(obj, f, *a, **k):
        if isinstance(obj, dict) and "rng" in obj and obj.get("step") == int(os.environ["T_CKPT_FAIL_AT"]):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)
    torch.save = failing
if rank == 1 and os.environ.get("T_DROP_LAST"):  # one file skipped on rank 1 alone (for want of memory, say)
    loaded = ds.load_data
    def dropped(*a, **k):
        data = loaded(*a, **k)
        p = data.prepared
        p.pixels, p.refs = p.pixels[:-1], p.refs[:-1]
        return data
    ds.load_data = dropped
if rank == 0 and os.environ.get("T_CSV_FAIL_AT"):  # rank 0's metrics.csv row of that step: a full disk
    import sslkit_plugins.callbacks.csv as csv_callback
    step_end = csv_callback.CsvMetrics.on_step_end
    def full(self, step, metrics):
        if step == int(os.environ["T_CSV_FAIL_AT"]):
            with self._writing():
                raise OSError(errno.ENOSPC, "No space left on device")
        return step_end(self, step, metrics)
    csv_callback.CsvMetrics.on_step_end = full
if rank == 0 and os.environ.get("T_INFO_FAIL"):  # rank 0's run.json as training starts: a full disk
    import sslkit.engine.session as session
    def no_room(s):
        raise session.UsageError(f"cannot write {str(s.out / 'run.json')!r}: No space left on device")
    session.write_info = no_room
if rank == 0 and os.environ.get("T_CSV_START_FAIL"):  # a resume's metrics.csv rewrite: a full disk
    import sslkit_plugins.callbacks.csv as csv_callback
    def no_room(self, step):
        raise OSError(errno.ENOSPC, "No space left on device")
    csv_callback.CsvMetrics._keep_until = no_room
from sslkit.cli import main
sys.argv[0] = "sslkit"
main()
'''


def two_ranks(tmp_path: Path, *args: str, **inject: str) -> list[subprocess.CompletedProcess]:
    """``sslkit pretrain`` (timm:resnet10t, 32 px, global batch 4) as ranks 0 and 1; the faults in ``inject``."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    images = tmp_path / "img"
    if not images.exists():
        make_images(images, n_per_class=4, size=32)
    port = free_port()
    cmd = [sys.executable, str(wrapper), "pretrain", "--task", "simclr", "--backbone", "timm:resnet10t",
           "--data", f"folder:{images}", "--image-size", "32", "--batch-size", "4", "--device", "cpu", "--quiet",
           *args]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "GROUP_RANK": "0",  # one node
               "T_TIMEOUT_MIN": "0.1",
               "SSLKIT_CACHE_DIR": str(tmp_path / "cache"), **inject}
        env.pop("TORCHELASTIC_RUN_ID", None)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        done = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(cmd, p.returncode, out, err) for p, (out, err) in zip(procs, done)]


#: the group's timeout where no fault waits on it: 0.1 min is also the store's connect timeout, and a rank 0 slow
#: to start on a busy machine made rank 1's connect time out once and retry, logging c10d warnings on its stderr
STEADY = {"T_TIMEOUT_MIN": "1"}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_rank0_decoding_longer_than_the_group_timeout_is_waited_for_and_read_in_a_shared_lock(tmp_path):
    """The group's timeout is 6 s here and rank 0 decodes for 9 s: rank 1 used to fail in the
    barrier ("Timed out waiting ... for recv"); it waits, then reads the cache under a shared lock."""
    log = tmp_path / "flock-rank1.log"
    r0, r1 = two_ranks(tmp_path, "--max-steps", "2", "--out", str(tmp_path / "run"),
                       T_SLOW_DECODE_S="9", T_FLOCK_LOG=str(log))
    assert r0.returncode == 0, r0.stderr[-3000:]
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert "done: 2 steps" in r0.stdout
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"
    ops = [int(line) for line in log.read_text().split()]
    assert ops and all(op & fcntl.LOCK_SH and not op & fcntl.LOCK_EX for op in ops), ops  # a reader: never exclusive


@pytest.mark.slow  # the same wait or stop as rank 0's slow decode, which runs by default
def test_rank0s_dataset_fingerprint_longer_than_the_group_timeout_is_waited_for(tmp_path):
    """Rank 0 alone reads the files for run.json's fingerprint and tells the others; the group's
    timeout is 6 s here and it takes 9 s: rank 1 waits for it without the collective's timeout
    (it failed in the broadcast: "Timed out waiting ... for recv")."""
    r0, r1 = two_ranks(tmp_path, "--max-steps", "2", "--out", str(tmp_path / "run"), T_SLOW_FINGERPRINT_S="9")
    assert r0.returncode == 0, r0.stderr[-3000:]
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dataset"]["fingerprint"]


@pytest.mark.slow  # the same wait or stop as the user error in rank 0's decode, which runs by default
def test_a_failure_in_rank0s_fingerprint_stops_both_ranks(tmp_path):
    """Rank 0's fingerprint fails after the group's timeout: rank 1, waiting for it, stops with a line
    saying so (no gloo timeout, no traceback of its own); rank 0 shows its error."""
    r0, r1 = two_ranks(tmp_path, "--max-steps", "2", "--out", str(tmp_path / "run"), T_FINGERPRINT_ERROR="injected")
    assert r0.returncode != 0 and "injected" in r0.stderr, r0.stderr[-3000:]
    assert r1.returncode == 2, r1.stderr[-3000:]
    assert "Traceback" not in r1.stderr and "imed out" not in r1.stderr, r1.stderr[-3000:]
    assert len(error_lines(r1.stderr)) <= 1, r1.stderr[-3000:]


def test_a_user_error_in_rank0s_decode_stops_both_ranks_printed_once(tmp_path):
    r0, r1 = two_ranks(tmp_path, "--max-steps", "2", "--out", str(tmp_path / "run"),
                       T_DECODE_ERROR="injected: no usable images")
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr[-2000:], r1.stderr[-2000:])
    assert error_lines(r0.stderr) == ["error: injected: no usable images"], r0.stderr[-2000:]
    assert r1.stderr.strip() == "", r1.stderr[-2000:]  # no second copy, no traceback, no gloo timeout


def test_a_preemption_during_rank0s_decode_stops_both_ranks_at_once(tmp_path):
    """SIGUSR1 to rank 0 alone while it decodes: it unwinds, and rank 1, waiting, learns of it and
    stops too (it used to die in the barrier with a gloo "Connection closed by peer")."""
    r0, r1 = two_ranks(tmp_path, "--max-steps", "2", "--out", str(tmp_path / "run"), T_DECODE_SIGNAL="SIGUSR1")
    assert (r0.returncode, r1.returncode) == (75, 75), (r0.stderr[-2000:], r1.stderr[-2000:])
    assert "SIGUSR1: stopped before training started" in r0.stderr and "Traceback" not in r0.stderr
    assert r1.stderr.strip() == "", r1.stderr[-2000:]


def test_a_full_disk_at_a_checkpoint_stops_every_rank_at_that_step(tmp_path):
    """Rank 0's checkpoint of step 4 fails (ENOSPC): rank 1 used to go on into step 5's all-reduce
    and die with a gloo traceback. Both exit 2 at step 4, the line printed once, step 2 kept."""
    out = tmp_path / "run"
    r0, r1 = two_ranks(tmp_path, "--max-steps", "6", "--checkpoint-every", "2", "--no-cache", "--out", str(out),
                       T_CKPT_FAIL_AT="4", **STEADY)
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr[-2000:], r1.stderr[-2000:])
    assert error_lines(r0.stderr) == [
        f"error: cannot write checkpoint step-00000004 in {out / 'checkpoints'}: No space left on device; "
        f"the last good checkpoint, step-00000002, is kept"], r0.stderr[-2000:]
    assert r1.stderr.strip() == "", r1.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed"
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows][-1] == 4  # nobody trained past the failed checkpoint


@pytest.mark.slow  # the same wait or stop as the full disk at a checkpoint, which runs by default
def test_a_full_disk_at_a_metrics_row_stops_every_rank_at_that_step(tmp_path):
    """Rank 0 alone writes metrics.csv: its row of step 3 fails (ENOSPC). Both ranks stop there in one
    line printed once (rank 1 does not go on into the next all-reduce), run.json says failed, the last
    checkpoint (step 2) is kept and --resume completes the run with every step's row once."""
    out = tmp_path / "run"
    r0, r1 = two_ranks(tmp_path, "--max-steps", "6", "--checkpoint-every", "2", "--no-cache", "--out", str(out),
                       T_CSV_FAIL_AT="3", **STEADY)
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr[-2000:], r1.stderr[-2000:])
    assert error_lines(r0.stderr) == [
        f"error: cannot write {str(out / 'metrics.csv')!r}: No space left on device; the run stops at step 3, the "
        f"last good checkpoint, step-00000002, is kept: free space, then --resume"], r0.stderr[-2000:]
    assert r1.stderr.strip() == "", r1.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]] == [1, 2]

    r0, r1 = two_ranks(tmp_path, "--resume", str(out), "--no-cache")
    assert (r0.returncode, r1.returncode) == (0, 0), (r0.stderr[-2000:], r1.stderr[-2000:])
    assert [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]] == list(range(1, 7))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow  # the same wait or stop as the unwritable run.json, which runs by default
def test_a_resumes_metrics_csv_that_cannot_be_rewritten_stops_every_rank_before_a_step(tmp_path):
    """The resume's metrics.csv rewrite (on_run_start, rank 0 alone) fails: rank 1 used to go on into the
    first step's all-reduce and die with a gloo traceback. Both exit 2 before any step, rank 0's line once."""
    out = tmp_path / "run"
    r0, r1 = two_ranks(tmp_path, "--max-steps", "2", "--no-cache", "--out", str(out))
    assert (r0.returncode, r1.returncode) == (0, 0), (r0.stderr[-2000:], r1.stderr[-2000:])
    kept = (out / "metrics.csv").read_bytes()
    r0, r1 = two_ranks(tmp_path, "--resume", str(out), "--max-steps", "4", "--no-cache", T_CSV_START_FAIL="1",
                       **STEADY)
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr[-2000:], r1.stderr[-2000:])
    assert error_lines(r0.stderr) == [
        f"error: cannot write {str(out / 'metrics.csv')!r}: No space left on device; the run stops at step 2, the "
        f"last good checkpoint, step-00000002, is kept: free space, then --resume"], r0.stderr[-2000:]
    assert r1.stderr.strip() == "", r1.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert (out / "metrics.csv").read_bytes() == kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]


def test_a_run_json_that_cannot_be_written_as_training_starts_stops_every_rank(tmp_path):
    """Rank 0 alone writes run.json: a full disk there (after the data is decoded, before the first step) used
    to leave rank 1 in the first step's all-reduce (a gloo traceback). Both exit 2, rank 0's line once."""
    r0, r1 = two_ranks(tmp_path, "--max-steps", "2", "--no-cache", "--out", str(tmp_path / "run"), T_INFO_FAIL="1",
                       **STEADY)
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr[-2000:], r1.stderr[-2000:])
    assert error_lines(r0.stderr) == [
        f"error: cannot write {str(tmp_path / 'run' / 'run.json')!r}: No space left on device"], r0.stderr[-2000:]
    assert r1.stderr.strip() == "", r1.stderr[-2000:]


def no_flock(monkeypatch, code: int) -> None:
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_is_one_line_not_another_process(tmp_path, monkeypatch, code):
    no_flock(monkeypatch, code)
    with pytest.raises(UsageError) as run_lock:
        RunLock(tmp_path).acquire()
    message = str(run_lock.value)
    assert "does not support file locks" in message and os.strerror(code) in message and "--out" in message
    assert "in use" not in message and "\n" not in message
    with pytest.raises(UsageError) as cache_lock:
        with cache_build_lock(str(tmp_path / "cache")):
            pytest.fail("the lock was not taken")
    message = str(cache_lock.value)
    assert "does not support file locks" in message and "--no-cache" in message and "\n" not in message


def test_a_held_run_lock_is_still_another_process(tmp_path, monkeypatch):
    no_flock(monkeypatch, errno.EWOULDBLOCK)
    (tmp_path / ".sslkit.lock").write_text("4242")
    with pytest.raises(UsageError, match=r"in use by another sslkit process \(pid 4242\)"):
        RunLock(tmp_path).acquire()


def test_the_cli_on_a_cache_without_locks_is_one_line_exit_2(tmp_path, cli, monkeypatch):
    images = make_images(tmp_path / "img", n_per_class=2, size=32)
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(tmp_path / "cache"))
    no_flock(monkeypatch, errno.ENOSYS)
    result = cli("pretrain", "--task", "simclr", "--backbone", "timm:resnet10t", "--data", f"folder:{images}",
                 "--out", tmp_path / "run", "--image-size", 32, "--batch-size", 4, "--max-steps", 1, "--quiet")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot lock the decoded-pixel cache in {str(tmp_path / 'cache')!r}: its file system does not "
        f"support file locks (Function not implemented; e.g. Lustre mounted without flock, NFS without lockd); "
        f"choose another folder with --cache DIR, or use --no-cache"]


def test_readers_share_the_cache_lock_a_filler_excludes_them(tmp_path):
    cache = tmp_path / "cache"
    with cache_build_lock(str(cache), shared=True):
        other = os.open(cache / CACHE_LOCK, os.O_RDWR)  # another open file description: another process's
        try:
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a second reader is not kept waiting
            fcntl.flock(other, fcntl.LOCK_UN)
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a filler waits for the readers
        finally:
            os.close(other)
    with cache_build_lock(str(cache)):
        other = os.open(cache / CACHE_LOCK, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # nobody reads while it is filled
        finally:
            os.close(other)


def test_only_rank0s_node_reads_the_cache_under_a_shared_lock(monkeypatch):
    """On another node the cache folder may be its own (--cache /tmp/...): there one process fills it and
    the others wait, instead of every rank decoding the same data at once under a shared lock."""
    from sslkit.engine.data_setup import reads_shared

    monkeypatch.delenv("GROUP_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [reads_shared(r) for r in (0, 1)] == [False, False]  # the node unknown: one reader at a time
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # another launcher: the first 2 ranks share rank 0's node
    assert [reads_shared(r) for r in (0, 1, 2)] == [False, True, False]
    monkeypatch.setenv("GROUP_RANK", "0")
    assert reads_shared(3)
    monkeypatch.setenv("GROUP_RANK", "1")
    assert not reads_shared(3)


def test_processes_that_hold_different_samples_stop_before_a_step(tmp_path):
    """Without a disk cache each process decodes for itself: one file skipped on rank 1 alone gave the two
    different step counts (the one with more then waited in a collective until its timeout); now both stop
    in one line naming the counts, before any step."""
    r0, r1 = two_ranks(tmp_path, "--max-steps", "4", "--no-cache", "--out", str(tmp_path / "run"), T_DROP_LAST="1")
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr[-3000:], r1.stderr[-3000:])
    assert error_lines(r0.stderr) == [
        "error: the processes of this run hold different samples (process 0: 8, process 1: 7): a file decoded on "
        "one and skipped on another (for want of memory, or changed while read); free memory or fix the files, "
        "then run the command again"], r0.stderr[-3000:]
    assert "Traceback" not in r0.stderr + r1.stderr and "step 1/" not in r0.stderr + r1.stderr
