"""Look up what plugins registered, for the checks and for ``pytest.mark.parametrize``."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

KIT = "sslkit.testing"


def registered(kind: str, distribution: str | None = None) -> list[str]:
    """Names of ``kind`` (``tasks``, ``sources``, ``backbones``, ``exporters``, ``callbacks``) registered by
    the plugins of installed ``distribution`` (its project name, e.g. ``"my-sslkit-plugin"``;
    None: every plugin), sorted. Use as ``@pytest.mark.parametrize("name", registered(...))``.

    With ``distribution``, an ``AssertionError`` (not an empty list, which pytest would report as a
    skipped test) when it is not installed, when one of its plugins failed to load (the plugin's error,
    as ``sslkit plugins`` shows it), or when it registers nothing of ``kind``.
    """
    from sslkit.plugins import get_plugins

    plugins = get_plugins()
    assert kind in plugins.entries, f"kind must be one of {', '.join(sorted(plugins.entries))}, got {kind!r}"
    if distribution is None:
        return sorted(plugins.entries[kind])
    want = _normal(distribution)
    known = {_normal(i.distribution or "") for i in plugins.infos.values()}
    assert want in known, f"no installed distribution {distribution!r} registers sslkit plugins " \
                          f"(pip install -e it first; installed: {', '.join(sorted(k for k in known if k))})"
    mine = [i for i in plugins.infos.values() if _normal(i.distribution or "") == want]
    for info in mine:
        if info.error:
            raise AssertionError(f"{distribution!r}: plugin {info.name!r} {info.error}")
    names = sorted({name for info in mine for name in info.registered[kind]})  # a conflicting name too
    assert names, f"{distribution!r} registers no {kind} (it registers: " + (", ".join(
        f"{k} {', '.join(sorted(v))}" for i in mine for k, v in i.registered.items() if v) or "nothing") + ")"
    return names


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def resolve(kind: str, obj: Any) -> tuple[str | None, Any]:
    """``(registered name or None, object)`` for a registered name or the object itself."""
    from sslkit.plugins import get_plugins

    entries = get_plugins().entries[kind]
    if isinstance(obj, str):
        assert obj in entries, f"no {kind[:-1]} {obj!r} is registered (installed: {', '.join(sorted(entries))})"
        return obj, entries[obj].obj
    names = [name for name, entry in entries.items() if entry.obj is obj]
    return (names[0] if names else None), obj


@contextmanager
def registered_as(kind: str, name: str, obj: Any) -> Iterator[str]:
    """Make ``obj`` usable as ``name`` in this process for the duration (not installed yet)."""
    from sslkit.plugins import Entry, get_plugins

    entries = get_plugins().entries[kind]
    assert name not in entries, f"{kind[:-1]} {name!r} is already registered"
    entries[name] = Entry(obj, KIT)
    try:
        yield name
    finally:
        entries.pop(name, None)


#: the built-in plugins the kit's own runs use: entry-point name -> the kind it registers under that name
BUILTINS = {"simclr": "tasks", "timm": "backbones", "monai": "backbones", "folder": "sources", "onnx": "exporters",
            "csv": "callbacks"}


def uses_builtins(*names: str, volumes: tuple[str, ...] = ()) -> Callable:
    """Decorate a check whose runs use sslkit's built-in plugins ``names`` (and ``volumes`` when
    it is called with ``volume=...``): for its duration they answer to their names, even where
    ``SSLKIT_LOAD_PLUGINS`` / ``SSLKIT_DISABLE_PLUGINS`` left them out or another plugin
    registers the same name (the plugin under test is checked against sslkit's own)."""
    def decorate(check: Callable) -> Callable:
        @functools.wraps(check)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            needed = names + (volumes if kwargs.get("volume") is not None else ())
            with builtins_available(needed, check.__name__):
                return check(*args, **kwargs)
        return wrapper
    return decorate


@contextmanager
def builtins_available(names: tuple[str, ...], what: str = "sslkit.testing") -> Iterator[None]:
    """While open, each built-in plugin of ``names`` (see :data:`BUILTINS`) is what its name looks up."""
    from sslkit.plugins import Entry, get_plugins

    plugins, saved = get_plugins(), []
    for name in names:
        kind = BUILTINS[name]
        entry = plugins.entries[kind].get(name)
        info = plugins.infos.get(entry.plugin) if entry is not None else None
        if info is not None and info.builtin and name not in plugins.conflicts[kind]:
            continue  # loaded as usual
        saved.append((kind, name, entry, plugins.conflicts[kind].pop(name, None)))
        plugins.entries[kind][name] = Entry(_builtin(kind, name, what), name)
    try:
        yield
    finally:
        for kind, name, entry, owners in reversed(saved):
            if entry is None:
                plugins.entries[kind].pop(name, None)
            else:
                plugins.entries[kind][name] = entry
            if owners is not None:
                plugins.conflicts[kind][name] = owners


def _builtin(kind: str, name: str, what: str) -> Any:
    """What sslkit's built-in plugin ``name`` registers as ``name``, imported directly."""
    from importlib.metadata import distribution

    from sslkit.api import first_line

    found: dict[str, Any] = {}
    try:
        (ep,) = [ep for ep in distribution("sslkit").entry_points if ep.group == "sslkit" and ep.name == name]
        getattr(ep.load(), f"register_{kind}")(register=found.__setitem__)
    except Exception as exc:
        raise AssertionError(f"{what} runs sslkit's built-in {kind[:-1]} {name!r}, which cannot be loaded here: "
                             f"{type(exc).__name__}: {first_line(exc)}") from None
    assert name in found, f"{what} runs sslkit's built-in {kind[:-1]} {name!r}, which its plugin does not register"
    return found[name]
