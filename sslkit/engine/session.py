"""One pretraining session, start to finish: :func:`pretrain`.

Checks the configuration, joins the process group, builds the run (:mod:`.setup`),
writes the run directory, restores a checkpoint (:mod:`.state`), trains (:mod:`.loop`)
under the stop signals (:mod:`.signals`) with the callbacks (:mod:`.events`), then
writes ``encoder.safetensors`` and the final ``run.json``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sslkit import checkpoint, distributed
from sslkit.engine import state as run_state
from sslkit.engine.batchnorm import recompute_batchnorm
from sslkit.engine.callbacks import create_callbacks
from sslkit.engine.events import Events, RunInfo
from sslkit.engine.lock import RunLock
from sslkit.engine.log import note
from sslkit.engine.loop import train
from sslkit.engine.step_log import Diverged
from sslkit.engine.model_setup import check_precision
from sslkit.engine.schedules import horizon
from sslkit.engine.setup import Setup, build, on_main, resolve_device, seed_everything
from sslkit.engine.signals import StopSignal
from sslkit.errors import UsageError
from sslkit.output_file import file_sha256, read_json, write_atomic, write_json_atomic
from sslkit.pseudonym import file_key
from sslkit.registry import get_task, resolve_data
from sslkit.run import DATA_REPORT, ENCODER_FILE, RUN_JSON, RunConfig, check_run_dir, prepare_run_dir
from sslkit.run_record import write_config_toml


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) pretraining as ``cfg`` says; returns the final summary.

    Under torchrun every process calls this; rank 0 alone writes the run directory.
    """
    if cfg.resume:
        old = read_json(Path(cfg.out) / RUN_JSON)
        left = _steps_left(cfg, old) if old.get("status") == "finished" else None
        if left is not None and left < 0:
            done = old["summary"]["steps"]
            raise _bound_below(cfg.out, done, done + left)
        if old.get("status") == "finished" and not left:  # nothing left to do
            return {**old.get("summary", {}), "already_finished": True,
                    "main": int(os.environ.get("RANK", "0")) == 0}
    get_task(cfg.task)
    resolve_data(cfg.data)  # fail on a bad --data before touching anything
    callbacks = create_callbacks(cfg.callbacks)  # built before decoding: one that cannot start is one line
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device.type)
    if cfg.sync_bn and distributed.launched() and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU implementation)")
    created = distributed.init(device.type)
    flags = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    lock = RunLock(Path(cfg.out))
    try:
        # a folder that is not the user's to use (not empty, not a run) is refused before a lock file is made in
        # it; a second process on the run: refused now (build checks the folder again, under the lock)
        on_main(lambda: lock.acquire() if check_run_dir(cfg).is_dir() else None)
        return run(build(cfg, device), lock, callbacks)
    finally:
        lock.release()
        torch.use_deterministic_algorithms(flags[0])  # leave the process as it was (library use)
        torch.backends.cudnn.benchmark = flags[1]
        if created:
            distributed.teardown()


def _bound_below(out: str, done: int, allowed: int) -> UsageError:
    """The refusal of a resume whose ``--epochs``/``--max-steps`` allow fewer steps than were done."""
    return UsageError(f"run {out} already has {done} steps, more than the {allowed} that "
                      f"--epochs/--max-steps now allow; give a larger bound to extend it")


def _steps_left(cfg: RunConfig, old: dict[str, Any]) -> int | None:
    """Steps that resuming finished run ``old`` with ``cfg``'s bounds would train (negative: the
    bound is below what was done); None when ``old`` does not say."""
    per_epoch, done = old.get("steps_per_epoch"), old.get("summary", {}).get("steps")
    if not per_epoch or done is None:
        return None
    return horizon(cfg.epochs, cfg.max_steps, int(per_epoch))[0] - int(done)


def _started(s: Setup, state: run_state.RunState, old: dict[str, Any]) -> None:
    """Rank 0's run.json as training starts (a resume's continues ``old``, read by _prepare under the lock)."""
    if s.cfg.resume:
        continued_record(s, state, old)
    write_info(s)


def _start(s: Setup, events: Events, info: RunInfo) -> None:
    """``on_run_start`` on every rank. Under torchrun rank 0 alone runs sslkit's own callbacks: a failed write
    there (a resume's metrics.csv rewrite on a full disk) stops every rank before a step, with rank 0's line
    (:func:`~sslkit.engine.setup.on_main`), not rank 0 alone while the others wait in the first all-reduce."""
    if not s.main:  # its all-ranks callbacks (a failure of a third-party one is reported, not raised)
        events.emit("on_run_start", info)
    on_main(lambda: events.emit("on_run_start", info))


def run(s: Setup, lock: RunLock | None = None, callbacks: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """Train a built run to its end (or a stop signal); write the encoder and run.json.
    ``lock``: the run directory's lock, taken (rank 0) once the directory exists; ``callbacks``:
    :func:`~sslkit.engine.callbacks.create_callbacks` of ``--callbacks`` (built here when None)."""
    if s.world > 1:  # different augmentations per rank; the model is already identical
        seed_everything(s.cfg.seed + 7919 * s.rank)
    old = on_main(lambda: _prepare(s, lock))  # everything asked is valid: only now is the run directory written
    state = run_state.restore(s)
    if state.step > s.total:
        raise _bound_below(s.cfg.out, state.step, s.total)
    on_main(lambda: _started(s, state, old))  # a full disk there stops every rank, not rank 0 alone
    events = Events(create_callbacks(s.cfg.callbacks) if callbacks is None else callbacks, s.rank)
    summary: dict[str, Any] = {"steps": state.step}
    status, began = "failed", (state.step, time.perf_counter())
    with StopSignal() as stop:
        try:  # on_run_start too: a resume's metrics.csv that cannot be rewritten (a full disk) is a failed run
            _start(s, events, RunInfo(s.out, s.info, state.step, s.total, s.rank, s.world))
            summary = train(s, state, events, stop)
            status = "interrupted" if summary["interrupted"] else "finished"
            summary["stopped_by"] = "signal" if summary["interrupted"] else s.schedule.bound
        except Diverged as exc:
            status = "diverged"
            raise UsageError(str(exc)) from None
        finally:
            if status != "finished":
                _end(s, events, status, summary, _session(summary, state, began))
    if status == "finished" and getattr(s.task, "recompute_batchnorm", False):
        # every rank, on the same images: with --sync-bn the layers all-reduce
        recomputed = recompute_batchnorm(s.task.encoder, s.loader, s.spec.mean, s.spec.std, s.device, s.cfg.seed)
        if recomputed:
            s.info["batchnorm_recomputed"] = recomputed
    if status == "finished" and s.main:
        try:
            write_atomic(s.out / ENCODER_FILE, lambda tmp: save_file(
                {k: v.detach().contiguous().cpu() for k, v in s.task.encoder.state_dict().items()}, str(tmp)))
            s.info["encoder_sha256"] = file_sha256([s.out / ENCODER_FILE])  # checked wherever it is read
        except UsageError as exc:  # a full disk: run.json says the run failed; its checkpoints stay
            _end(s, events, "failed", summary, _session(summary, state, began))
            raise UsageError(f"{exc}; the run's checkpoints are kept: free space, then --resume") from None
    if status == "finished":
        _end(s, events, status, summary, _session(summary, state, began))
    return summary


def _session(summary: dict[str, Any], state: run_state.RunState, began: tuple[int, float]) -> dict[str, Any]:
    """This session's record: the steps it trained and its training time (the loop's own count when it returned;
    ``began``: the step and clock it started at)."""
    seconds = summary.get("seconds", round(time.perf_counter() - began[1], 2))
    return {"steps": state.step - began[0], "seconds": seconds}


def record_session(info: dict[str, Any], session: dict[str, Any], resumed: bool) -> None:
    """Put this session's steps and seconds in run.json: its ``resumes`` entry, or ``first_session``."""
    resumes = info.get("resumes")
    if not resumed:
        info["first_session"] = session
    elif isinstance(resumes, list) and resumes and isinstance(resumes[-1], dict):
        resumes[-1].update(session)


def run_time(info: dict[str, Any]) -> dict[str, Any]:
    """The run's training time over its sessions (``total_seconds``), and how many sessions left none to count
    (``untimed_sessions``: killed, or run by an sslkit that did not record it)."""
    sessions = [info.get("first_session"), *(info.get("resumes") or [])]
    timed = [x["seconds"] for x in sessions if isinstance(x, dict) and isinstance(x.get("seconds"), (int, float))]
    return {"total_seconds": round(sum(timed), 2), "untimed_sessions": len(sessions) - len(timed)}


def continued_record(s: Setup, state: run_state.RunState, old: dict[str, Any]) -> None:
    """A resume's run.json: the run's ``run_id``, and the first session's ``environment`` and
    processes kept as they were; this session's own (command, processes, threads, versions, whether
    augmentations were re-seeded) appended to ``resumes``."""
    this = {"from_step": state.step, "total_steps": s.total, "reseeded": state.reseeded,
            "processes": s.world, "batch_per_process": s.micro_batch,
            "allow_data_change": s.cfg.allow_data_change, "environment": s.info["environment"]}
    resumes = old.get("resumes")
    s.info["resumes"] = (resumes if isinstance(resumes, list) else []) + [this]
    if old.get("run_id"):  # a run recorded before run.json had one gets one now
        s.info["run_id"] = old["run_id"]
    if isinstance(old.get("environment"), dict):
        s.info["environment"] = old["environment"]
    first = first_session(old)
    if first is not None:
        s.info["first_session"] = first
    first = old.get("optimization")
    if isinstance(first, dict):
        s.info["optimization"].update({k: first[k] for k in ("processes", "batch_per_process") if k in first})


def first_session(old: dict[str, Any]) -> dict[str, Any] | None:
    """The first session's steps and seconds as run.json ``old`` recorded them; for a run recorded before
    ``first_session`` existed, its ``summary`` when no resume came after that session (else None: unknown)."""
    if isinstance(old.get("first_session"), dict):
        return old["first_session"]
    last = old.get("summary")
    if old.get("resumes") or old.get("status") not in ("finished", "interrupted") or not isinstance(last, dict):
        return None
    steps, seconds = last.get("steps"), last.get("seconds")
    ok = isinstance(steps, int) and isinstance(seconds, (int, float))
    return {"steps": steps, "seconds": seconds} if ok else None


def _end(s: Setup, events: Events, status: str, summary: dict[str, Any], session: dict[str, Any]) -> None:
    """The final run.json (rank 0: with ``session``, this session's steps and seconds) and the ``on_run_end``
    event."""
    if s.main:
        s.info["status"] = status
        record_session(s.info, session, s.cfg.resume)
        if status in ("finished", "interrupted"):
            summary.update(run_time(s.info))
            s.info["summary"] = {k: v for k, v in summary.items() if k != "main"}
        try:
            write_info(s)
        except UsageError:  # a full disk: the error that stopped the run is the one to report
            if status == "finished":
                raise
    encoder = s.out / ENCODER_FILE
    events.emit("on_run_end", {**{k: v for k, v in summary.items() if k != "main"}, "status": status,
                               "encoder": encoder if status == "finished" and s.main else None})


#: data_report.json's statement of how it names files
FILES_NAMED_BY = ("a keyed hash of the path below the data root (names there can carry patient names); "
                  "'sslkit data inspect DATA' prints each unusable file's path with its key")


def _prepare(s: Setup, lock: RunLock | None) -> dict[str, Any]:
    """Create the run directory, take its lock, then (checked again under the lock: another
    process may have started a run there while this one decoded) clear it with --overwrite;
    remove temporary files a killed run left behind; write run.json (a new run: status ``starting``, first, so
    that a write failing after it leaves a run folder that ``--overwrite`` and ``--resume auto`` take, never one
    sslkit refuses as not its own), then data_report.json and config.toml (the settings that rerun the run:
    ``sslkit pretrain --config RUN/config.toml --out NEW``). Returns the run.json a resume continues, read once
    here under the lock (``{}`` for a new run)."""
    check_run_dir(s.cfg).mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire()
    prepare_run_dir(s.cfg)
    if lock is not None:
        for folder in (s.out, s.checkpoint_dir):
            for name in checkpoint.remove_orphans(folder):
                note(f"note: removed {name}, left in {folder} by an interrupted write")
    old = read_json(s.out / RUN_JSON) if s.cfg.resume else {}
    if not s.cfg.resume:  # run.json first: a folder a failed write leaves is a run (--overwrite, --resume auto take it)
        write_json_atomic(s.out / RUN_JSON, {**s.info, "status": "starting"})
    try:
        _write_records(s, old)
    except UsageError:  # a full disk, a file-size limit: the record says so where it can still be written
        if not s.cfg.resume:
            with contextlib.suppress(UsageError):
                write_json_atomic(s.out / RUN_JSON, {**s.info, "status": "failed"})
        raise
    return old


def _write_records(s: Setup, old: dict[str, Any]) -> None:
    """data_report.json and config.toml (``old``: the run.json a resume continues)."""
    prepared = s.data.prepared
    write_json_atomic(s.out / DATA_REPORT, {
        "samples": len(prepared), "skipped": len(prepared.skipped),
        "skipped_files": [{"file": file_key(p), "reason": r} for p, r in prepared.skipped],
        "files_named_by": FILES_NAMED_BY,
        "notes": [{"sample": i, "note": n} for i, n in getattr(s.data.source, "notes", list)()],
    })
    why, s.info["config_toml_sha256"] = write_config_toml(s.out, s.info["config"], old.get("config_toml_sha256"))
    if why:
        note(f"note: {why}")


def write_info(s: Setup) -> None:
    """``run.json`` (rank 0)."""
    if s.main:
        write_json_atomic(s.out / RUN_JSON, s.info)
