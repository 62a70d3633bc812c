"""What a setting may be: the :class:`~sslkit.run.RunConfig` fields, their built-in defaults,
and the check of every value a config file or the command line gives (:func:`check_values`).

Keys are option names of ``sslkit pretrain`` (``-`` may stand for ``_``); ``cache``,
``no_cache`` and ``quiet`` set the fields they stand for, and a key named like a source
plugin's flag becomes that source option. Each value is checked against the field's type
and, where the type does not bound it, its range; a bad one is one line naming it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from sslkit.errors import UsageError, shown, unknown_name_message
from sslkit.run import RunConfig

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
HINTS = typing.get_type_hints(RunConfig)
OPTION_GROUPS = ("backbone_options", "task_options", "source_options", "augment_options")
REQUIRED = ("task", "data", "out")


def defaults() -> dict[str, Any]:
    """RunConfig's built-in default for every field that has one."""
    out = {}
    for name, f in FIELDS.items():
        if f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
    return out


def plain(obj: Any) -> Any:
    """Tuples to lists, so a config survives JSON and TOML unchanged."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


# Option names of ``sslkit pretrain`` that are not RunConfig fields, as config keys.
ALIASES = {"cache": "cache_dir"}
#: flags that set a RunConfig field of another name (``--no-cache``, ``--quiet``)
SETS = {"no_cache": "cache_dir", "quiet": "progress"}
_TABLES = {"task_opt": "task_options", "backbone_opt": "backbone_options", "data_opt": "source_options",
           "augment_opt": "augment_options"}
_COMMAND_ONLY = ("config", "config_file", "print_config")


def check_values(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Normalise keys (option names included) and check every value against RunConfig's types.

    ``cache``, ``no_cache`` and ``quiet`` map to the fields they set; a key named like a
    source plugin's flag (``window``) becomes that source option, over ``[source_options]``.
    """
    from sslkit.source_flags import flag_fields

    out: dict[str, Any] = {}
    flags: dict[str, Any] = {}
    setters: dict[str, str] = {}  # field -> the key that set it
    for key, value in values.items():
        name = str(key).replace("-", "_")
        name = ALIASES.get(name, name)
        field = SETS.get(name, name)
        if not (name == "no_cache" and value is False):  # no_cache = false sets nothing
            if field in setters:
                raise UsageError(f"{origin}: {shown(setters[field])} and {shown(key)} both set {field}; "
                                 f"keep one of them")
            setters[field] = str(key)
        if name in ("no_cache", "quiet"):
            if not isinstance(value, bool):
                raise UsageError(f"{origin}: {name} must be true or false, got {shown(value)}")
            if name == "quiet":
                out["progress"] = not value
            elif value:
                out["cache_dir"] = ""
        elif name in FIELDS:
            out[name] = _check_range(name, _check(name, value, HINTS[name], origin), origin)
        elif name in flag_fields():
            if not isinstance(value, (str, int, float, bool)):
                raise UsageError(f"{origin}: {name} must be a string or a number, got {shown(value)}")
            flags[name] = value
        elif name in _TABLES:
            raise UsageError(f"{origin}: {shown(key)} is a command-line option; in a config file write these "
                             f"options as a [{_TABLES[name]}] table of key = value")
        elif name in _COMMAND_ONLY:
            raise UsageError(f"{origin}: {shown(key)} is a command-line option only, not a setting")
        else:
            known = [*FIELDS, *ALIASES, *SETS, *sorted(flag_fields())]
            raise UsageError(f"{origin}: " + unknown_name_message("setting", key, known, listed=len(known)))
    if flags:
        out["source_options"] = {**out.get("source_options", {}), **flags}
    return out


def _check(name: str, value: Any, hint: Any, origin: str) -> Any:
    def bad(expected: str) -> UsageError:
        return UsageError(f"{origin}: {name} must be {expected}, got {shown(value)}")

    origin_t, args = typing.get_origin(hint), typing.get_args(hint)
    if origin_t in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin_t, args = typing.get_origin(hint), typing.get_args(hint)
    if origin_t is typing.Literal:
        if value not in args:
            raise bad("one of " + ", ".join(map(str, args)))
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin_t is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} numbers")
        return tuple(_check(name, v, a, origin) for v, a in zip(value, args))
    if origin_t is dict:
        if not isinstance(value, dict):
            raise bad("a table of key = value")
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    return value


def _finite(value: int | float) -> bool:
    """A finite float (a YAML integer of 400 digits is not: float() overflows)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


#: what settings their type does not bound must be: seed (numpy's and torch's generators), momentum (SGD, LARS)
_RANGES = {"seed": (lambda v: 0 <= v <= 2**32 - 1, "an integer in [0, 4294967295]"),
           "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
           "init": (lambda v: v is None or bool(str(v).strip()), "weights to start from, not empty")}


def _check_range(name: str, value: Any, origin: str) -> Any:
    if name == "backbone_options":  # what sslkit passes to every backbone factory itself (in_chans, ...)
        from sslkit.registry import check_backbone_options

        check_backbone_options(value)
    ok, expected = _RANGES.get(name, (None, ""))
    if ok is not None and not ok(value):
        raise UsageError(f"{origin}: {name} must be {expected}, got {shown(value)}")
    return value
