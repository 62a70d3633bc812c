"""``sslkit pretrain --resume``: the configuration a run was started with, read back from its ``run.json``
(:func:`resume_config`). Only the settings that keep the run exact (``RESUMABLE_OVERRIDES``; ``--augment-opt``
where run.json records the views) may differ from what the run recorded; ``--data`` may name the recorded data's
place spelled otherwise (:func:`resumed_data`). ``--quiet`` is not inherited: it silences the session it is
given to."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from sslkit.config_values import FIELDS, OPTION_GROUPS, check_values, defaults, plain
from sslkit.errors import UsageError
from sslkit.output_file import read_json
from sslkit.run import RESUMABLE_OVERRIDES, RUN_JSON, RunConfig


def resume_config(given: dict[str, Any], views_check: bool = True) -> RunConfig:
    """The saved config of run ``given["out"]``; only settings that keep the run exact may change. An
    ``--augment-opt`` that changes the views run.json records is refused here, before any image is
    decoded (:func:`sslkit.views_resume.check_views_before_decoding`; not with ``views_check`` False)."""
    out = given.get("out")
    if not out:
        raise UsageError("--resume needs the run directory: --resume RUN_DIR")
    file = Path(out) / RUN_JSON
    if not file.exists():
        raise UsageError(f"--resume: {out!r} holds no sslkit run to continue (no {RUN_JSON})")
    info = read_json(file)  # {}: damaged (not JSON, not UTF-8, nested too deep); a FIFO there: one line
    saved = info.get("config")
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {file} is not a readable sslkit run.json")
    saved = check_values({k: v for k, v in saved.items() if k in FIELDS}, str(file))
    saved["data"] = resumed_data(given.get("data"), saved.get("data"), Path(out), info)
    fill_legacy_options(saved, info)
    given = _typed_task_options(given, saved["task"])
    # --augment-opt may differ where run.json records the views (recipes): the resume's views check
    # (sslkit.views_resume) then holds the built views to that record, so it only gives back the run's own
    settable = RESUMABLE_OVERRIDES | ({"augment_options"} if _views_recorded(info) else set())
    for key, value in given.items():
        if key in settable:
            continue
        now = saved.get(key)
        if key in OPTION_GROUPS:
            now = {k: now.get(k) for k in value} if isinstance(now, dict) else now
        if key == "init" and isinstance(value, str) and isinstance(now, str):
            from sslkit.init.resolve import same_init

            if same_init(value, now):  # the same weights, spelled relative or absolute
                continue
        if key == "channels" and now is None and isinstance(info.get("input_spec"), dict):
            now = info["input_spec"].get("channels")  # None: what most samples had, recorded in the input spec
        if key == "channels_last" and now is None and isinstance(info.get("optimization"), dict):
            now = info["optimization"].get("channels_last")  # None: the backbone's choice, recorded as used
        if not _same(value, now):
            raise UsageError(
                f"--resume continues the run exactly as it was configured: {key} was {plain(now)!r}, "
                f"not {plain(value)!r}; start a new run to change it"
            )
    values = {**saved, **{k: v for k, v in given.items() if k in settable}}
    # this session's flags (run.json's config never holds them: sslkit.run_record.recorded_config)
    values.update(resume=True, overwrite=False, out=out,
                  allow_data_change=bool(given.get("allow_data_change")))  # per resume, never inherited
    # --quiet acts on the session it is given to: a resume shows progress unless given it again
    values["progress"] = given.get("progress", defaults()["progress"])
    cfg = RunConfig(**values)
    if views_check and given.get("augment_options") and "augment_options" in settable:
        from sslkit.views_resume import check_views_before_decoding

        check_views_before_decoding(cfg, info)
    return cfg


def resumed_data(given: Any, recorded: Any, run_dir: Path, info: dict[str, Any]) -> Any:
    """The ``--data`` a resume reads: ``given`` where it names the place the recorded one does (spelled
    relative or absolute, from this folder or from the one the run started in, as its ``config.toml``
    records it), else the recorded one (another ``given`` is then refused as a change). A recorded
    relative path not found from this folder is refused in one line saying how to resume."""
    from sslkit.run_record import located, split_data

    if not isinstance(recorded, str):
        return recorded
    started = _started_data(recorded, run_dir, info)
    source = (info.get("input_spec") or {}).get("source") if isinstance(info.get("input_spec"), dict) else None
    places = (_place(recorded, source), _place(started, source))  # a bare path: the source the run sniffed
    if isinstance(given, str) and given != recorded and _place(given, source) in places:
        return given  # the same data, spelled otherwise
    if given in (None, recorded) and started is not None and located(recorded) == recorded:
        at = f"--data {started}" if os.path.exists(split_data(started)[1]) else "--data with its path from here"
        raise UsageError(f"--resume: the run's data {recorded!r} is a path relative to the folder the run was "
                         f"started in, not found from here; resume from that folder or give {at}")
    return recorded


def _started_data(recorded: str, run_dir: Path, info: dict[str, Any]) -> str | None:
    """Where the run's relative ``--data`` was when it started: its ``config.toml``'s absolute ``data``
    (:func:`sslkit.run_record.located`), read only from the file sslkit wrote and run.json names by its
    sha256; None where ``recorded`` was not a relative path, or without that file."""
    from sslkit.run_record import CONFIG_TOML, is_own_config, names_config, split_data

    file = run_dir / CONFIG_TOML
    if not is_own_config(file) or not names_config(info, file):
        return None
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError):  # ValueError: not TOML, or bytes that are not UTF-8
        return None
    return data if isinstance(data, str) and data != recorded and os.path.isabs(split_data(data)[1]) else None


def _place(data: str | None, source: Any = None) -> str | None:
    """``data`` with its location absolute and resolved (``..``, symlinks) where it is a path that
    exists or is absolute, and a bare path's scheme ``source`` (the run's, as it sniffed it), so that
    two spellings of one folder (``img``, ``folder:img``, ``folder:/work/img``) compare equal."""
    from sslkit.run_record import located, split_data

    if data is None:
        return None
    scheme, where = split_data(located(data))
    scheme = scheme or (source if isinstance(source, str) else "")
    if os.path.isabs(os.path.expanduser(where)):
        where = os.path.realpath(os.path.expanduser(where))
    return f"{scheme}:{where}" if scheme else where


def _same(given: Any, recorded: Any) -> bool:
    """Whether a value given on resume is the one recorded: equal, or (an option group's values, which
    the command line gives as text: ``--augment-opt rotate_p=0.5``) equal once the text is read as
    a number, a boolean or a comma-separated list of them."""
    if isinstance(given, dict) and isinstance(recorded, dict):
        return given.keys() == recorded.keys() and all(_same(v, recorded[k]) for k, v in given.items())
    if plain(given) == plain(recorded):
        return True
    if not isinstance(given, str) or isinstance(recorded, str):
        return False
    from sslkit.options import parse_values

    parts = [parse_values({"v": p.strip()})["v"] for p in given.split(",")]
    return plain(recorded) in ([parts] if len(parts) > 1 else [parts[0], parts])


def _views_recorded(info: dict[str, Any]) -> bool:
    """Whether run.json's ``views`` holds the run's view recipes (not absent, not a compile wrapper's class alone)."""
    views = info.get("views")
    return isinstance(views, dict) and any(isinstance(e, dict) and set(e) - {"class"} for e in views.values())


def _typed_task_options(given: dict[str, Any], task: str) -> dict[str, Any]:
    """``given`` with its task options typed as the run recorded them (``--task-opt mask_ratio=0.6`` is the
    float the run.json holds); an option given as None (the task's choice) matches what the task chose."""
    from sslkit.options import typed_values
    from sslkit.registry import get_task

    if not isinstance(given.get("task_options"), dict):
        return given
    typed = typed_values(get_task(task).Options, given["task_options"], f"task {task!r}")
    return {**given, "task_options": {k: v for k, v in typed.items() if v is not None}}


def fill_legacy_options(saved: dict[str, Any], info: dict[str, Any] | None = None) -> list[str]:
    """Options the task or source gained after ``saved`` was recorded take the values that run used
    (``Task.legacy_option_values``, ``Source.legacy_option_values``), so it repeats exactly as it started
    (``--resume``; ``--config`` of a run's ``config.toml``: :func:`sslkit.run_record.with_legacy_options`).
    A task option counts as gained where ``saved["task_options"]`` (every option the task had) lacks it; a source option
    where ``info`` (the run's run.json) has ``source_options_resolved`` (every field the run's source had)
    without it, or none at all; a source's legacy value may be a function of the ``describe()`` record the
    run holds (its ``input_spec.preprocessing``), for an option whose old behaviour changed before it existed.
    ``info`` None: the source options are left as they are (nothing says which the run lacked). Returns the
    ``group.key`` of each option filled."""
    from sslkit.config_toml import source_options_of
    from sslkit.registry import get_source, get_task

    filled = []
    legacy = getattr(get_task(saved["task"]), "legacy_option_values", None) or {}
    mine = saved.get("task_options") or {}
    if legacy:
        filled += [f"task_options.{k}" for k in legacy if k not in mine]
        saved["task_options"] = {**legacy, **mine}
    scheme = source_options_of(saved.get("data"))[0] if info is not None else None
    resolved = (info or {}).get("source_options_resolved")
    legacy = (getattr(get_source(scheme), "legacy_option_values", None) or {}) if scheme else {}
    described = ((info or {}).get("input_spec") or {}).get("preprocessing")
    described = described if isinstance(described, dict) else {}  # the source's describe() as the run recorded it
    gained = {k: v(described) if callable(v) else v for k, v in legacy.items()
              if not isinstance(resolved, dict) or k not in resolved}
    mine = saved.get("source_options") or {}
    if gained:
        filled += [f"source_options.{k}" for k in gained if k not in mine]
        saved["source_options"] = {**gained, **mine}
    return filled

