"""The plugin manager: every entry point of group ``sslkit``, and nothing else.

Environment variables (as in simonw's ``llm``):

* ``SSLKIT_LOAD_PLUGINS=a,b``: load only these plugins (entry-point names); empty = none.
* ``SSLKIT_DISABLE_PLUGINS=a,b``: skip these plugins.

A plugin that fails to import, or whose ``register_*`` hook raises, is reported on stderr
in one line naming it and the error; every other plugin keeps working.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from sslkit import hookspecs
from sslkit.errors import UsageError

GROUP = "sslkit"
KINDS = ("tasks", "backbones", "sources", "exporters")
_SINGULAR = {"tasks": "task", "backbones": "backbone", "sources": "source", "exporters": "exporter"}


@dataclass
class PluginInfo:
    """One plugin as ``sslkit plugins --json`` shows it."""

    name: str
    version: str | None = None
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version}
        out.update({k: sorted(v) for k, v in self.registered.items()})
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Entry:
    obj: Any
    plugin: str


class Plugins:
    """Loaded plugins and everything they registered, by kind and name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.failures: list[str] = []
        self._load_entry_points()
        for kind in KINDS:
            self._collect(kind)

    def _load_entry_points(self) -> None:
        allow = _env_list("SSLKIT_LOAD_PLUGINS")
        deny = set(_env_list("SSLKIT_DISABLE_PLUGINS") or [])
        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            if ep.name in self.infos:
                continue  # the same distribution seen twice on sys.path
            if (allow is not None and ep.name not in allow) or ep.name in deny:
                self.pm.set_blocked(ep.name)
                continue
            info = self.infos[ep.name] = PluginInfo(ep.name, ep.dist.version if ep.dist else None)
            try:
                self.pm.load_setuptools_entrypoints(GROUP, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                self._fail(info, f"failed to load ({ep.value}): {type(exc).__name__}: {exc}")

    def _collect(self, kind: str) -> None:
        hook = getattr(self.pm.hook, f"register_{kind}")
        for impl in hook.get_hookimpls():
            info = self.infos.setdefault(impl.plugin_name, PluginInfo(impl.plugin_name))

            def register(name: str, obj: Any, _plugin: str = impl.plugin_name) -> None:
                self._add(kind, name, obj, _plugin)

            try:
                impl.function(register=register)
            except UsageError:
                raise
            except Exception as exc:
                self._fail(info, f"register_{kind} raised {type(exc).__name__}: {exc}")

    def _add(self, kind: str, name: str, obj: Any, plugin: str) -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise UsageError(f"plugin {plugin!r} registered an invalid {_SINGULAR[kind]} name {name!r}")
        other = self.entries[kind].get(name)
        if other is not None:
            raise UsageError(
                f"{_SINGULAR[kind]} {name!r} is registered by two plugins, {other.plugin!r} and "
                f"{plugin!r}; uninstall one or set SSLKIT_DISABLE_PLUGINS={plugin}"
            )
        self.entries[kind][name] = Entry(obj, plugin)
        self.infos[plugin].registered[kind].append(name)

    def _fail(self, info: PluginInfo, message: str) -> None:
        info.error = message
        line = f"sslkit: plugin {info.name!r} {message}".replace("\n", " ")
        self.failures.append(line)
        print(line, file=sys.stderr)


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


_loaded: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded on first use."""
    global _loaded
    if _loaded is None:
        _loaded = Plugins()
    return _loaded


def reset() -> None:
    """Forget loaded plugins (tests, or after installing a plugin in-process)."""
    global _loaded
    _loaded = None
