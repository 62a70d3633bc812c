"""Settings written as a commented TOML file (``sslkit pretrain --print-config``).

:func:`to_toml` writes scalars first, then one table per option group, each setting under
a comment with its help (:func:`setting_help`); the file loads back with ``--config`` to
the same resolved settings. What the task chose for the image size, backbone and optimizer
(``chosen``) is written commented with its value, so that it is chosen again for another.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

from sslkit.config_values import FIELDS, OPTION_GROUPS, REQUIRED
from sslkit.errors import UsageError

#: what each option group holds (the comment under its table header)
_GROUP_HELP = {
    "backbone_options": "keyword arguments of the backbone factory (--backbone-opt key=value)",
    "task_options": "the task's options (--task-opt key=value), every one with its value",
    "source_options": "options of the data source (--data-opt key=value; flags such as --window set them too)",
    "augment_options": "fields of the task's view recipes (--augment-opt key=value)",
}
#: help of the RunConfig fields that have no option of their own on the command line
_FIELD_HELP = {
    "momentum": "Momentum of sgd and lars.",
    "betas": "Adam betas of adamw.",
    "progress": "Show a progress bar (--quiet: false).",
}


def setting_help(values: dict[str, Any], source: tuple[str | None, type | None] = (None, None)) -> dict[str, str]:
    """A one-line help per setting of ``values``: ``key`` for top-level settings and
    ``group.key`` for table entries (from the options of ``sslkit pretrain``, the source
    plugins' flags, and the task's ``Options`` fields). ``source``: the run's source scheme and
    ``Options`` (:func:`source_options_of`), for its own options' help."""
    import click

    from sslkit.cli import pretrain
    from sslkit.registry import get_task
    from sslkit.source_flags import declared_flags

    notes = dict(_FIELD_HELP)
    for param in pretrain.get_params(click.Context(pretrain)):
        text = " ".join((getattr(param, "help", None) or "").split())
        if param.name in FIELDS and text:
            notes[param.name] = text
    notes["cache_dir"] = notes.get("cache_dir", "") + ' "" keeps decoded pixels in memory only (--no-cache).'
    scheme, options = source  # source_options_of(values["data"]), found once by the caller
    for flag in declared_flags():  # the run's source's own help where it declared the flag, else every plugin's
        notes[f"source_options.{flag.field}"] = f"{dict(flag.helps).get(scheme) or flag.help} ({flag.flag})"
    if values.get("task"):
        notes.update(_option_notes("task_options", values["task"], get_task(values["task"]).Options))
    for key, text in _option_notes("source_options", scheme, options).items():
        notes.setdefault(key, text)  # a declared flag's help (naming the flag) first
    return notes


def source_options_of(data: Any) -> tuple[str | None, type | None]:
    """The scheme and ``Options`` class of the source ``data`` names (``dicom:/scans``, or a bare path
    that exists), or ``(None, None)`` for a bare path that is not there yet; an unknown scheme, or a
    folder no source recognises, is the run's one line."""
    import re
    from pathlib import Path

    from sslkit.registry import get_source, resolve_data

    if not isinstance(data, str) or not data:
        return None, None
    try:
        scheme = resolve_data(data)[0]
    except UsageError:
        if not Path(data).exists() and not re.match(r"\w{2,}:", data):  # a bare path (or C:\...) made later
            return None, None
        raise
    return scheme, get_source(scheme).Options


def unset_source_options(source: tuple[str | None, type | None], given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``source`` (:func:`source_options_of`) that ``given`` does not set, each with its
    default; a key in ``given`` that the source does not take is one line with the did-you-mean, as the
    run says."""
    from sslkit.options import typed_values

    scheme, options = source
    if options is not None:
        typed_values(options, given, f"source {scheme!r}")
    out = {}
    for f in dataclasses.fields(options) if options else ():
        if f.name not in given:
            factory = f.default_factory
            out[f.name] = f.default if factory is dataclasses.MISSING else factory()
    return out


def _option_notes(group: str, owner: str | None, options: type | None) -> dict[str, str]:
    """``{"group.field": "owner option (type): help"}`` for the fields of an ``Options`` dataclass."""
    from sslkit.options import option_help

    if options is None:
        return {}
    hints, helps = typing.get_type_hints(options), option_help(options)
    notes = {}
    for f in dataclasses.fields(options):
        hint = hints.get(f.name)
        kind = " | ".join(map(str, typing.get_args(hint))) if typing.get_origin(hint) is typing.Literal else \
            getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        text = f": {helps[f.name]}" if f.name in helps else ""
        notes[f"{group}.{f.name}"] = f"{owner} option ({kind}){text}"
    return notes


#: the note of a setting written commented as the task's choice (``chosen``)
REFIT = "refitted unless set"
#: the header's note when some settings are written commented as the task's choice (``chosen``)
CHOSEN_NOTE = ("# '# key = value  (refitted unless set)': what the task chose for this image size, backbone\n"
               "# and optimizer. Left commented, it is chosen again for the run's own (another --image-size or\n"
               "# --optimizer), as without this file; uncomment it to keep that value.")


def to_toml(values: dict[str, Any], notes: dict[str, str] | None = None,
            defaults: dict[str, dict[str, Any]] | None = None, chosen: set[str] | frozenset = frozenset()) -> str:
    """Settings as TOML: scalars first, then one table per option group; unset ones commented.

    ``notes``: help per ``key`` / ``group.key`` (:func:`setting_help`), written as a
    comment above the setting. ``defaults``: per group, options not set, written commented
    with their default value (a source's own defaults, which apply unless set). ``chosen``:
    ``key`` / ``group.key`` of settings written commented with their value, as defaults (what
    the task chose and the user did not set: :data:`CHOSEN_NOTE`).
    """
    import textwrap

    notes = notes or {}

    def comment(text: str | None) -> list[str]:
        return [f"# {line}" for line in textwrap.wrap(text, 96)] if text else []

    lines = ["# sslkit pretrain --config FILE; command-line options override these values."]
    lines += CHOSEN_NOTE.splitlines() if chosen else []
    for key, value in values.items():
        if key in OPTION_GROUPS:
            continue
        lines += comment(notes.get(key))
        if value is None or (value == "" and key in REQUIRED):
            note = "default: runs/<task>-<timestamp>" if key == "out" else "required" if key in REQUIRED else "unset"
            lines.append(f"# {key} = ...  ({note})")
        else:
            lines.append(_default_line(key, value, REFIT) if key in chosen else f"{key} = {_toml_value(value)}")
    for group in OPTION_GROUPS:
        lines += ["", f"[{group}]", *comment(_GROUP_HELP.get(group))]
        for key, value in (values.get(group) or {}).items():
            lines += comment(notes.get(f"{group}.{key}"))
            if value is None:
                lines.append(f"# {key} = ...  (unset)")
            else:
                lines.append(_default_line(key, value, REFIT) if f"{group}.{key}" in chosen else
                             f"{key} = {_toml_value(value)}")
        for key, value in ((defaults or {}).get(group) or {}).items():
            lines += comment(notes.get(f"{group}.{key}"))
            lines.append(_default_line(key, value))
    return "\n".join(lines) + "\n"


def _default_line(key: str, value: Any, note: str = "default") -> str:
    """``# key = value  (note)``: a setting shown, not set (``...`` for a value TOML cannot say)."""
    try:
        shown = "..." if value is None else _toml_value(value)
    except UsageError:  # a default TOML cannot say
        shown = "..."
    return f"# {key} = {shown}  ({note})"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise UsageError(f"cannot write {value!r} to a config file")
