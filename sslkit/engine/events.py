"""Events of a run for callbacks: loggers, trackers, anything that observes training.

A callback is an object with any of these methods (subclass :class:`Callback`, which
has them all, doing nothing)::

    on_run_start(run: RunInfo)             the run directory, config, step to start from
    on_step_end(step: int, metrics: dict)  after every optimizer step (1-based ``step``);
                                           ``metrics``: epoch, loss, lr, img_per_s, the task's
                                           scalars, grad_norm with clipping (floats)
    on_checkpoint(path: Path)              a checkpoint folder was written
    on_run_end(summary: dict)              always, also after a failure (``summary["status"]``)

Callbacks run on rank 0 only unless their class sets ``all_ranks = True``. A callback
that raises (``sys.exit()`` included; Ctrl-C and sslkit's own stop signals go through) is
reported in one line naming it, and not called again; the run goes on. But sslkit's own
callbacks are never switched off: a write of theirs that fails (a full disk) stops the run in
one line, as a checkpoint that cannot be written does, and any other exception of theirs is
raised as it is (:meth:`Events._builtin_failed`). A plugin's callback is also switched off when it
writes sslkit's own files (:data:`OWN_FILES`, ``checkpoints/``), found by ``os.stat`` around
each of its calls (not around sslkit's own callbacks'): a small file sslkit wrote (run.json,
config.toml, data_report.json) is put back as it was. A method named ``on_...`` that is no
event is refused when the callback is built (:func:`unknown_event_message`): sslkit would
never call it. Plugins register callback factories with the ``register_callbacks`` hook;
``--callbacks`` picks them by name (:func:`sslkit.engine.callbacks.create_callbacks`).
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslkit.errors import UsageError, first_line, unknown_name_message
from sslkit.run import CHECKPOINTS, DATA_REPORT, RUN_FILES, RUN_JSON

EVENTS = ("on_run_start", "on_step_end", "on_checkpoint", "on_run_end")
#: sslkit's own files in a run directory (with every file under ``checkpoints/``): no callback writes them
#: but sslkit's own (the built-in ``csv`` writes ``metrics.csv``: :data:`sslkit.engine.callbacks.BUILTIN_WRITES`)
OWN_FILES = RUN_FILES
#: the own files that sslkit keeps a copy of (as it last wrote them), to put back when a callback changed one
RESTORABLE = (RUN_JSON, "config.toml", DATA_REPORT)
_KEEP_MAX = 1 << 20  # bytes: a larger file of RESTORABLE is not kept
#: on_step_end calls are watched at every this many steps (each watch costs ~20 stat calls: tens of
#: microseconds on a local disk, more on a network file system); the other events at every call
STEP_WATCH_EVERY = 50


@dataclass(frozen=True)
class RunInfo:
    """What ``on_run_start`` receives. ``info`` is the ``run.json`` record (task, backbone,
    ``config``, ``input_spec``, dataset counts, environment); ``start_step`` is 0 for a new
    run and the checkpoint's step on resume; ``total_steps`` the schedule's horizon."""

    out: Path
    info: dict[str, Any]
    start_step: int
    total_steps: int
    rank: int
    world_size: int

    @property
    def resumed(self) -> bool:
        return self.start_step > 0

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config", {})


class Callback:
    """Base class of run callbacks; override the events you need (see the module docstring)."""

    #: called on every rank (True) or on rank 0 only (False, the default)
    all_ranks: bool = False

    def on_run_start(self, run: RunInfo) -> None:
        """The run directory exists, the state is restored, no step has run yet."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Optimizer step ``step`` (1-based) is done and its scalars are read."""

    def on_checkpoint(self, path: Path) -> None:
        """Checkpoint folder ``path`` is complete on disk."""

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """The run ended: ``status`` (finished, interrupted, diverged, failed), ``steps``,
        ``final_loss``, ``encoder`` (path of ``encoder.safetensors`` when written)."""


def handled_events(callback: Any) -> list[str]:
    """The events ``callback`` has a method for, other than :class:`Callback`'s do-nothing ones."""
    return [e for e in EVENTS if callable(getattr(callback, e, None))
            and inspect.getattr_static(callback, e, None) is not vars(Callback)[e]]


def unknown_event_message(label: str, callback: Any) -> str | None:
    """One line when ``callback`` has a method named ``on_...`` that is no event (a misspelled
    ``on_step_ended``: sslkit would never call it), with the closest event; else None."""
    unknown = []
    for name in _own_methods(type(callback)):
        if name.startswith("on_") and name not in EVENTS:
            unknown.append(name)
    if not unknown:
        return None
    more = f" (and {', '.join(unknown[1:])})" if unknown[1:] else ""
    return (f"callback {label} (class {type(callback).__name__}) has a method sslkit never calls: "
            + unknown_name_message("event", unknown[0], EVENTS, f"{more}; rename it"))


def _own_methods(cls: type) -> list[str]:
    """The methods the callback's own classes define: its class and, above it, the classes that
    subclass :class:`Callback` (not another framework's base whose ``on_train_batch_end`` sslkit never
    calls, nor attributes set on the instance)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is Callback or klass is object or (klass is not cls and not issubclass(klass, Callback)):
            continue
        names += [name for name, value in vars(klass).items() if name not in names
                  and (callable(value) or isinstance(value, (staticmethod, classmethod)))]
    return names


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class RunFiles:
    """``os.stat`` signatures (size, mtime, inode) of sslkit's own files in run folder ``out``,
    nothing read: the files of OWN_FILES, ``checkpoints/`` and its newest checkpoint (a few
    microseconds each), and with ``full`` every checkpoint (around the events that come with
    checkpoints). The folders are listed again only when one of them changed. The RESTORABLE
    files' bytes are kept as sslkit wrote them."""

    def __init__(self, out: Path) -> None:
        self.out = str(out)
        self.seen: dict[str, Any] = {}
        self.kept: dict[str, bytes] = {}
        self.paths: list[tuple[str, str]] = []  # (key, path) of every file and folder watched
        self.quick: list[tuple[str, str]] = []  # those but the checkpoints before the newest
        self.folders: dict[str, Any] = {}  # key -> signature of the folders when they were listed

    def _list(self) -> None:
        join, folder = os.path.join, os.path.join(self.out, CHECKPOINTS)
        self.paths = [(name, join(self.out, name)) for name in OWN_FILES] + [(CHECKPOINTS + "/", folder)]
        self.folders = {CHECKPOINTS + "/": _signature(folder)}
        try:
            with os.scandir(folder) as entries:
                steps = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            steps = []
        self.quick = list(self.paths)
        newest = [step for step in steps if step.startswith("step-")][-1:]
        for step in steps:
            key, path = f"{CHECKPOINTS}/{step}/", join(folder, step)
            self.folders[key] = _signature(path)
            try:
                with os.scandir(path) as entries:
                    inside = [(key, path)] + [(key + e.name, e.path) for e in entries]
            except OSError:
                inside = [(key, path)]
            self.paths += inside
            if [step] == newest:
                self.quick += inside

    def snapshot(self, full: bool = True) -> dict[str, Any]:
        """``{key: signature}``: every file watched (``full``), or all but the older checkpoints."""
        for _ in range(2):
            sig = {key: _signature(path) for key, path in (self.paths if full else self.quick)}
            if self.paths and all(sig.get(key, old) == old for key, old in self.folders.items()):
                break
            self._list()  # a folder changed: files came or went
        return sig

    def current(self, full: bool) -> dict[str, Any]:
        """A snapshot before the callbacks' calls; a RESTORABLE file sslkit changed since is kept anew."""
        now = self.snapshot(full)
        for name in RESTORABLE:
            if now[name] != self.seen.get(name, ()):
                self.kept.pop(name, None)
                if now[name] is not None and now[name][0] <= _KEEP_MAX:
                    try:
                        with open(os.path.join(self.out, name), "rb") as f:
                            self.kept[name] = f.read()
                    except OSError:
                        pass
        self.seen = now
        return now

    def restore(self, names: list[str]) -> list[str]:
        """Put back the RESTORABLE ``names`` as sslkit last wrote them; the names put back."""
        from sslkit.output_file import write_atomic

        done = []
        for name in names:
            if name in self.kept:
                data = self.kept[name]
                try:
                    write_atomic(Path(self.out, name), lambda tmp: tmp.write_bytes(data), overwrite=True)
                except Exception:  # e.g. a full disk: the line says it was not put back
                    continue
                done.append(name)
        return done


class Events:
    """Sends each event to the active callbacks in order: ``(label, callback)`` pairs, or
    ``(label, callback, builtin)`` where ``builtin`` marks sslkit's own callbacks (the built-in
    ``csv`` writes metrics.csv). On rank 0, from the ``on_run_start`` event (whose ``RunInfo.out``
    is the run folder), it watches sslkit's own files around each call of every other callback
    (:class:`RunFiles`; ``on_step_end`` at every :data:`STEP_WATCH_EVERY` steps): none with the default
    ``--callbacks csv``."""

    def __init__(self, callbacks: list[tuple], rank: int = 0) -> None:
        chosen = [c for c in callbacks if rank == 0 or getattr(c[1], "all_ranks", False)]
        self.active = [(c[0], c[1]) for c in chosen]
        self.builtin = {c[0] for c in chosen if len(c) > 2 and c[2]}
        self.rank = rank
        self.files: RunFiles | None = None
        self.out: Path | None = None  # the run folder (on_run_start)
        self.step = 0  # the step of the newest event: where a run that a built-in's failed write stops

    def emit(self, event: str, *args: Any) -> None:
        if event == "on_run_start":
            self.out, self.step = args[0].out, args[0].start_step
            if self.rank == 0 and any(c[0] not in self.builtin for c in self.active):
                self.files = RunFiles(args[0].out)
        elif event == "on_step_end":
            self.step = args[0]
        full = event != "on_step_end"  # every checkpoint's files around the (few) other events
        before = None  # the files as the next watched call finds them
        calls, at = list(self.active), len(self.active)
        try:
            for at, (label, cb) in enumerate(calls):
                method = getattr(cb, event, None)
                if method is None:
                    continue
                watched = (self.files is not None and label not in self.builtin
                           and (full or args[0] % STEP_WATCH_EVERY == 0))
                if watched and before is None:
                    before = self.files.current(full)
                self._call(label, cb, method, event, args)
                before = self._check_files(label, cb, event, before, full) if watched else None
            at = len(calls)
        finally:  # a built-in's failed start stops the run: the callbacks after it never started, so they get
            if event == "on_run_start":  # no on_run_end either
                for label, cb in calls[at + 1:]:
                    self._disable(label, cb)

    def _call(self, label: str, cb: Any, method: Any, event: str, args: tuple) -> None:
        try:
            method(*args)
        except (OSError, UsageError) as exc:  # a write that failed: a full disk, mostly
            if label in self.builtin:
                self._builtin_failed(label, event, args, exc)
            else:
                self._report(label, cb, event, exc)
        except (Exception, SystemExit) as exc:  # a logger must not take the run down, nor its sys.exit()
            if label in self.builtin:  # a bug of sslkit's own: raised as it is (see _builtin_failed)
                raise
            self._report(label, cb, event, exc)

    def _report(self, label: str, cb: Any, event: str, exc: BaseException) -> None:
        self._disable(label, cb)
        print(f"sslkit: callback {label} raised {type(exc).__name__} in {event}: {first_line(exc)}; "
              f"disabled for the rest of this run", file=sys.stderr, flush=True)

    def _builtin_failed(self, label: str, event: str, args: tuple, exc: OSError | UsageError) -> None:
        """sslkit's own callbacks are never switched off: ``metrics.csv`` is the run's own record (one
        row per step), and a row a disabled callback did not write would be lost for good while the run
        ended "finished". So a write of one that fails (an OSError: a full disk) stops the run as a
        checkpoint that cannot be written does: one line (a UsageError, exit 2), run.json "failed",
        the checkpoints kept, ``--resume`` logs the steps after the last one again. Any other exception
        of a built-in is a bug of sslkit's own: raised as it is, with its traceback, not hidden in a line
        while the run goes on without its record. In ``on_run_end`` of a run that failed (the error that
        stopped it, a full disk often, is the one reported) a failed write is a line on stderr."""
        if isinstance(exc, UsageError):  # write_atomic's line: cannot write 'PATH': why
            what = str(exc)
        else:
            where = repr(exc.filename) if exc.filename else f"in {str(self.out)!r} (callback {label})"
            what = f"cannot write {where}: {exc.strerror or first_line(exc)}"
        if event == "on_run_end" and args[0].get("status") in ("failed", "diverged"):
            print(f"sslkit: callback {label} in on_run_end: {what}", file=sys.stderr, flush=True)
            return
        raise UsageError(f"{what}; {self._stop_words(what)}") from None

    def _stop_words(self, why: str) -> str:
        """Where the run stops and what it keeps: the words of a checkpoint that cannot be written."""
        from sslkit.checkpoint import last_kept  # torch: imported when needed

        last = last_kept(Path(self.out, CHECKPOINTS)) if self.out is not None else "no earlier checkpoint exists"
        fix = "free space" if any(w in why.lower() for w in ("space", "quota")) else "fix that"
        return f"the run stops at step {self.step}, {last}: {fix}, then --resume"

    def _disable(self, label: str, cb: Any) -> None:
        if (label, cb) in self.active:
            self.active.remove((label, cb))

    def _check_files(self, label: str, cb: Any, event: str, before: dict[str, Any], full: bool) -> dict[str, Any]:
        """After ``cb``'s call: sslkit's own files it changed are one line, ``cb`` is disabled and
        what can be is put back. Returns the snapshot the next callback's call starts from."""
        after = self.files.snapshot(full)
        if after == before:
            return before
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:
            self._disable(label, cb)
            restored = self.files.restore(changed)
            lost = [k for k in changed if k not in restored]
            print(f"sslkit: callback {label} changed sslkit's own {', '.join(changed)} in {event}, which no "
                  f"callback may write; disabled for the rest of this run"
                  + (f"; put back: {', '.join(restored)}" if restored else "")
                  + (f"; not put back (sslkit keeps no copy): {', '.join(lost)}" if lost else ""),
                  file=sys.stderr, flush=True)
            after = self.files.snapshot(full)
        self.files.seen = after
        return after
