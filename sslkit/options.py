"""Typed options for tasks and sources: ``--task-opt key=value`` into a dataclass."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from sslkit.errors import UsageError, unknown_name_message


def parse_pairs(pairs: tuple[str, ...] | list[str], flag: str) -> dict[str, str]:
    """``("a=1", "b=x")`` -> ``{"a": "1", "b": "x"}``; a pair without ``=`` is a usage error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects key=value, got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def check_unit_interval(name: str, value: float) -> None:
    """For Options.__post_init__: a fraction in (0, 1], e.g. a crop's minimum area scale."""
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1]")


def fill_unset(options: Any, values: dict[str, Any]) -> Any:
    """For a task's ``__init__``: ``options`` (an Options dataclass) with ``values`` in the fields left at None."""
    import dataclasses

    return dataclasses.replace(options, **{k: v for k, v in values.items() if getattr(options, k) is None})


def parse_values(values: dict[str, str]) -> dict[str, Any]:
    """Untyped options (backbone keyword arguments): ints, floats and booleans recognised."""
    out: dict[str, Any] = {}
    for key, raw in values.items():
        low = raw.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                pass
        else:
            out[key] = raw
    return out


def typed_values(cls: type | None, values: dict[str, Any], owner: str) -> dict[str, Any]:
    """``values`` (strings from the command line, or typed) converted to the types of the Options
    dataclass ``cls``'s fields; an unknown key is one line with the did-you-mean."""
    fields = [f.name for f in dataclasses.fields(cls)] if cls is not None else []
    if not fields:
        if values:
            raise UsageError(f"{owner} takes no options, got {', '.join(sorted(values))}")
        return {}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, raw in values.items():
        if key not in fields:
            raise UsageError(f"{owner}: {unknown_name_message('option', key, fields)}")
        out[key] = _convert(raw, hints[key], f"{owner} option {key!r}")
    return out


def build_options(cls: type | None, values: dict[str, Any], owner: str) -> Any:
    """Instantiate the Options dataclass ``cls`` from strings or typed values."""
    kwargs = typed_values(cls, values, owner)
    if cls is None:
        return None
    try:
        options = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{owner}: {exc}") from None
    return options


def option_names(cls: type | None) -> set[str]:
    """The option names an ``Options`` dataclass declares (none for ``None`` or a class that is not one)."""
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)} if cls is not None and dataclasses.is_dataclass(cls) else set()


def option_help(cls: type | None) -> dict[str, str]:
    """Each option's help: the ``# comment`` ending its field's line in the Options class's source
    (``mask_patch: int | None = None  # default: 32 px at 224 px``), for ``--print-config``. Fields
    inherited from a base dataclass take its comments; a class without source gives ``{}``."""
    import inspect
    import io
    import textwrap
    import tokenize

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__ if names else ()):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # a builtin, or no source shipped
            continue
        heads: dict[int, list[str]] = {}  # line of the class body -> its first two tokens
        depth = 0  # 1: the class body (not a method's)
        try:
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                depth += {tokenize.INDENT: 1, tokenize.DEDENT: -1}.get(tok.type, 0)
                head = heads.setdefault(tok.start[0], []) if depth == 1 else []
                if tok.type == tokenize.COMMENT and head[:1] and head[0] in names and head[1:2] == [":"]:
                    notes[head[0]] = tok.string.lstrip("#").strip()
                elif tok.type in (tokenize.NAME, tokenize.OP) and len(head) < 2:
                    head.append(tok.string)
        except (tokenize.TokenError, SyntaxError):
            continue
    return notes


def _convert(raw: Any, hint: Any, what: str) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in ("none", "null", "") and len(non_none) < len(args):
            return None
        hint = non_none[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint in (int, float, str):
            return hint(raw)
        if origin is typing.Literal:
            for choice in args:
                if str(choice) == raw:
                    return choice
            raise UsageError(f"{what} must be one of {', '.join(map(str, args))}, got {raw!r}")
        if origin in (tuple, list):
            item = args[0] if args else str
            return origin(_convert(p, item, what) for p in raw.split(",") if p != "")
    except ValueError:
        raise UsageError(f"{what} expects {getattr(hint, '__name__', hint)}, got {raw!r}") from None
    return raw


def to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if options is not None else {}
