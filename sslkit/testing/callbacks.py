"""``check_callback``: a run callback takes every event of real runs without raising."""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from sslkit.engine.events import EVENTS, OWN_FILES, handled_events, unknown_event_message
from sslkit.output_file import file_sha256
from sslkit.run import CHECKPOINTS
from sslkit.testing.cli import sslkit
from sslkit.testing.data import image_folder
from sslkit.testing.registry import registered_as, resolve, uses_builtins
from sslkit.testing.runs import crashed_copy

#: what the kit trains while the callback listens: a registered built-in task on a tiny CNN
KIT_RUN = ("--task", "simclr", "--backbone", "timm:resnet10t", "--image-size", 32, "--batch-size", 4,
           "--epochs", 1, "--channels", 1, "--seed", 0, "--deterministic", "--no-cache", "--quiet",
           "--device", "cpu", "--checkpoint-every", 2, "--keep-checkpoints", 0)


@uses_builtins("simclr", "timm", "folder", "csv")
def check_callback(callback: Any, *, tmp_path: Path, steps: int = 3) -> dict[str, Any]:
    """Check run callback ``callback`` (a registered name or its factory) through ``sslkit pretrain``.

    Its factory builds an object with at least one of the events (``on_run_start``,
    ``on_step_end``, ``on_checkpoint``, ``on_run_end``; :class:`Callback`'s do-nothing ones
    do not count), no other method named ``on_...`` (a misspelled event: sslkit would never
    call it) and a bool ``all_ranks`` if any.
    Then, listening with ``--callbacks csv,NAME``: a ``steps``-step run (a checkpoint every
    2 steps and at the end) must reach it with every event in order and none may raise
    (sslkit would disable it: a logger that stops logging), nor change sslkit's own files
    (run.json, metrics.csv, config.toml, data_report.json, the encoder, ``checkpoints/``:
    their SHA-256 before and after each of its calls; sslkit disables it too); a copy of that run cut back
    to its first checkpoint, as a crash leaves it, resumed with ``--resume``, likewise
    (``run.resumed`` true, the steps after the checkpoint); and a fresh instance must take
    a run that fails after one step (``on_run_end`` with ``status="failed"``, no
    ``final_loss``, ``encoder`` None) without raising. A factory that is not registered
    is made available under a temporary name for the duration.
    Returns ``{"callback", "events": {event: count}, "resume", "failed"}``; ``events``: the
    events of the new run, for those the callback has a method of its own.
    """
    assert steps >= 3, "check_callback needs steps >= 3 (a checkpoint at step 2 to resume from, and a step after)"
    name, factory = resolve("callbacks", callback)
    assert callable(factory), f"{callback!r}: a callback is registered as a factory (a class or function)"
    sample = factory()
    shown = repr(callback) if isinstance(callback, str) else f"factory {getattr(factory, '__qualname__', factory)}"
    unknown = unknown_event_message(shown, sample)
    assert unknown is None, unknown
    present = handled_events(sample)
    assert present, f"{callback!r} builds {type(sample).__name__}, with none of {', '.join(EVENTS)} " \
                    f"(subclass sslkit.api.Callback and override the events you need)"
    assert isinstance(getattr(sample, "all_ranks", False), bool), f"{callback!r}: all_ranks must be a bool"
    tmp_path = Path(tmp_path)
    label = re.sub(r"[^a-z0-9_]+", "", getattr(factory, "__name__", "").lower()) or "callback"
    temporary = registered_as("callbacks", f"kit-{label}", factory) if name is None else nullcontext(name)
    with temporary as name:
        data = image_folder(tmp_path / "images-1x32", 4 * steps, 32, 1)
        run = tmp_path / "run"
        listen = name if name == "csv" else f"csv,{name}"
        with spying(name) as calls:
            sslkit("pretrain", "--data", f"folder:{data}", "--out", run, "--max-steps", steps, "--callbacks", listen,
                   *KIT_RUN)
        _check_sequence(calls, name, run, 0, steps, "a new run")
        resumed = crashed_copy(run, tmp_path / "run-resumed", keep=1)
        with spying(name) as again:
            sslkit("pretrain", "--resume", resumed, "--quiet")
        _check_sequence(again, name, resumed, 2, steps, "a resumed run")
        failed = _check_failed_run(factory, calls[0][1][0], tmp_path / "run-failed")
    counts = {e: sum(1 for event, _ in calls if event == e) for e in present}
    return {"callback": name, "events": counts, "failed": failed,
            "resume": f"resumed from step 2: on_run_start (resumed), steps 3-{steps}, on_run_end"}


class _Spy:
    """Stands in for the callback: records each event sslkit sends, then passes it on; an
    exception the callback raises is recorded (with its event) and raised again, and so is
    each of sslkit's own files whose content the call changed (``writes``: those it may)."""

    def __init__(self, inner: Any, calls: list, writes: tuple[str, ...] = ()) -> None:
        self._inner, self._calls, self._writes = inner, calls, writes
        self._out: Path | None = None
        self.all_ranks = getattr(inner, "all_ranks", False)

    def __getattr__(self, event: str) -> Any:
        if event not in EVENTS:
            raise AttributeError(event)
        method = getattr(self._inner, event, None)

        def relay(*args: Any) -> None:
            self._calls.append((event, args))
            if method is None:
                return
            if event == "on_run_start":
                self._out = Path(args[0].out)
            before = own_file_hashes(self._out)
            try:
                method(*args)
            except (Exception, SystemExit) as exc:
                self._calls.append(("raised", (event, exc)))
                raise
            finally:
                after = own_file_hashes(self._out)
                changed = sorted(k for k in before.keys() | after.keys()
                                 if before.get(k) != after.get(k) and k not in self._writes)
                if changed:
                    self._calls.append(("wrote", (event, changed)))

        return relay


def own_file_hashes(out: Path | None) -> dict[str, str]:
    """SHA-256 of each of sslkit's own files in run folder ``out`` (every file under ``checkpoints/``)."""
    if out is None:
        return {}
    files = [out / name for name in OWN_FILES] + sorted((out / CHECKPOINTS).glob("*/*"))
    return {str(f.relative_to(out)): file_sha256([f]) for f in files if f.is_file()}


@contextmanager
def spying(name: str) -> Iterator[list]:
    """While open, callback ``name`` is built wrapped in a :class:`_Spy`; yields its record."""
    from sslkit.plugins import Entry, get_plugins

    from sslkit.engine.callbacks import BUILTIN_WRITES

    plugins = get_plugins()
    entries = plugins.entries["callbacks"]
    entry, calls = entries[name], []
    info = plugins.infos.get(entry.plugin)
    writes = BUILTIN_WRITES.get(name, ()) if info is not None and info.builtin else ()
    entries[name] = Entry(lambda: _Spy(entry.obj(), calls, writes), entry.plugin)
    try:
        yield calls
    finally:
        entries[name] = entry


def _check_sequence(calls: list, name: str, run: Path, start: int, steps: int, what: str) -> None:
    wrote = [args for event, args in calls if event == "wrote"]
    assert not wrote, f"callback {name!r} changed sslkit's own {', '.join(wrote[0][1])} in {wrote[0][0]} during " \
                      f"{what} (a callback writes files of its own only; sslkit disables one that does)"
    raised = [args for event, args in calls if event == "raised"]
    assert not raised, f"callback {name!r} raised {type(raised[0][1]).__name__} in {raised[0][0]} during " \
                       f"{what}: {raised[0][1]} (sslkit disables a callback that raises)"
    events = [event for event, _ in calls]
    assert events and events[0] == "on_run_start" and events[-1] == "on_run_end", f"{what}: events {events}"
    info = calls[0][1][0]
    assert (Path(info.out), info.start_step, info.resumed) == (run, start, start > 0), f"{what}: {info}"
    got = [args[0] for event, args in calls if event == "on_step_end"]
    assert got == list(range(start + 1, steps + 1)), f"{what}: on_step_end for steps {got}"
    saved = [Path(args[0]) for event, args in calls if event == "on_checkpoint"]
    assert saved and all(p.parent == run / "checkpoints" and p.is_dir() for p in saved), f"{what}: checkpoints {saved}"
    assert calls[-1][1][0]["status"] == "finished", f"{what}: {calls[-1][1][0]}"


def _check_failed_run(factory: Any, template: Any, out: Path) -> str:
    """A fresh instance through a run that fails after step 1, as the engine sends it."""
    from dataclasses import replace

    out.mkdir(parents=True)
    cb = factory()
    step = {"epoch": 0.0, "loss": 1.0, "lr": 0.001, "img_per_s": 10.0}
    for event, args in (("on_run_start", (replace(template, out=out, start_step=0),)), ("on_step_end", (1, step)),
                        ("on_run_end", ({"steps": 1, "status": "failed", "encoder": None},))):
        method = getattr(cb, event, None)
        if method is None:
            continue
        try:
            method(*args)
        except (Exception, SystemExit) as exc:
            raise AssertionError(f"a run that fails after step 1: {event} raised {type(exc).__name__}: {exc}") \
                from exc
    return "on_run_end(status='failed') after one step taken without raising"
