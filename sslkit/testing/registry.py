"""Look up what plugins registered, for the checks and for ``pytest.mark.parametrize``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

KIT = "sslkit.testing"


def registered(kind: str, distribution: str | None = None) -> list[str]:
    """Names of ``kind`` (``tasks``, ``sources``, ``backbones``, ``exporters``, ``callbacks``) registered by
    the plugins of installed ``distribution`` (its project name, e.g. ``"my-sslkit-plugin"``;
    None: every plugin), sorted. Use as ``@pytest.mark.parametrize("name", registered(...))``.
    """
    from sslkit.plugins import get_plugins

    plugins = get_plugins()
    if distribution is not None:
        want = _normal(distribution)
        known = {_normal(i.distribution or "") for i in plugins.infos.values()}
        assert want in known, f"no installed distribution {distribution!r} registers sslkit plugins " \
                              f"(pip install -e it first; installed: {', '.join(sorted(k for k in known if k))})"
    return sorted(name for name, entry in plugins.entries[kind].items()
                  if distribution is None or _normal(plugins.infos[entry.plugin].distribution or "") == want)


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
