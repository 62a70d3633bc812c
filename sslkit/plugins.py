"""The plugin manager: every entry point of group ``sslkit``, and nothing else.

Environment variables (as in simonw's ``llm``):

* ``SSLKIT_LOAD_PLUGINS=a,b``: load only these plugins (entry-point names); empty = none.
* ``SSLKIT_DISABLE_PLUGINS=a,b``: skip these plugins.

A name in either that no installed plugin has gets a did-you-mean (:meth:`Plugins._check_env_names`).
Two distributions declaring the same entry-point name both load, the second as ``name@distribution``;
both answer to ``name`` in these variables.

A plugin that fails to import (``sys.exit()`` included), whose ``register_*`` hook raises or returns a
value, that defines a hook without ``@hookimpl``, whose declared ``sslkit_api`` range excludes
:data:`sslkit.api.API_VERSION`, or that registers an invalid name, an object of the wrong type, or a
source whose ``scheme`` differs from its registered name, is reported on stderr in one line naming it
and the error; every other plugin (and the plugin's other registrations) keep working.

Two plugins registering the same name of one kind do not stop anything from loading: the conflict is
listed by ``sslkit plugins``, and only a command that uses that name fails, in one line naming both
plugins (:meth:`Plugins.lookup`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from sslkit import hookspecs
from sslkit.errors import UsageError, unknown_name_message
from sslkit.plugin_api_range import api_incompatibility, range_problem, source_api_range

GROUP = "sslkit"
KINDS = ("tasks", "backbones", "sources", "exporters", "callbacks")
_SINGULAR = {kind: kind[:-1] for kind in KINDS}  # "tasks" -> "task", ...


@dataclass
class PluginInfo:
    """One plugin as ``sslkit plugins --json`` shows it."""

    name: str
    version: str | None = None
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    error: str | None = None
    #: shipped with sslkit itself (distribution ``sslkit``), not a third-party package
    builtin: bool = False
    #: one line per name this plugin registered that another plugin registered too
    conflicts: list[str] = field(default_factory=list)
    #: the installed distribution that declared the entry point (None: registered in-process)
    distribution: str | None = None
    #: the entry-point name (what SSLKIT_LOAD_PLUGINS / SSLKIT_DISABLE_PLUGINS match); ``name``
    #: is ``entry_point@distribution`` where another distribution declared the same one first
    entry_point: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "builtin": self.builtin}
        out.update({k: sorted(v) for k, v in self.registered.items()})
        if self.error:
            out["error"] = self.error
        if self.conflicts:
            out["conflicts"] = list(self.conflicts)
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
        #: kind -> name -> every plugin that registered it, where more than one did
        self.conflicts: dict[str, dict[str, list[str]]] = {k: {} for k in KINDS}
        #: kind -> name -> the registrations of a conflicting name besides the one in ``entries``
        self.shadowed: dict[str, dict[str, list[Entry]]] = {k: {} for k in KINDS}
        self.failures: list[str] = []
        #: a name in SSLKIT_LOAD_PLUGINS that no installed plugin has: the error of every lookup
        self.env_error: str | None = None
        self._load_entry_points()
        self._collect()

    def _load_entry_points(self) -> None:
        allow = _env_list("SSLKIT_LOAD_PLUGINS")
        deny = set(_env_list("SSLKIT_DISABLE_PLUGINS") or [])
        seen: dict[str, set[str]] = {}  # entry-point name -> distributions that declared it
        found = entry_points(group=GROUP)
        dists = _distributions(found)
        # by name; of entry points sharing a name, sslkit's own first (it keeps the bare name)
        found = sorted(found, key=lambda ep: (ep.name, dists[id(ep)][0].lower() != "sslkit"))
        self._check_env_names(sorted({ep.name for ep in found}), allow, deny)
        for ep in found:
            dist, version = dists[id(ep)]
            if dist.lower() in seen.setdefault(ep.name, set()):
                continue  # the same distribution seen twice on sys.path
            if (allow is not None and ep.name not in allow) or ep.name in deny:
                self.pm.set_blocked(ep.name)
                continue
            # Another distribution's entry point of the same name loads too, under a name of its own.
            name = f"{ep.name}@{dist or ep.value}" if seen[ep.name] else ep.name
            seen[ep.name].add(dist.lower())
            info = self.infos[name] = PluginInfo(name, version, entry_point=ep.name,
                                                 builtin=dist.lower() == "sslkit", distribution=dist or None)
            refused = None if info.builtin else range_problem(source_api_range(ep.module))
            if refused:  # before importing: a plugin for another API may import names this one lacks
                self._fail(info, refused)
                continue
            try:
                plugin = ep.load()
            except BaseException as exc:  # a broken plugin (even one calling sys.exit) must not take the others down
                _reraise_interrupt(exc)
                self._fail(info, f"failed to load ({ep.value}): {type(exc).__name__}: {exc}")
                continue
            refused = api_incompatibility(plugin)
            if refused:
                self._fail(info, refused)
                continue
            try:
                self.pm.register(plugin, name=name)
            except BaseException as exc:  # e.g. a hook whose arguments differ from sslkit's
                _reraise_interrupt(exc)
                self._fail(info, f"failed to register ({ep.value}): {type(exc).__name__}: {exc}")
                continue
            self._check_hook_names(info, plugin)

    def _check_env_names(self, installed: list[str], allow: list[str] | None, deny: set[str]) -> None:
        """A name in SSLKIT_DISABLE_PLUGINS that no installed plugin has is one warning line on stderr (the
        plugin meant stays enabled); one in SSLKIT_LOAD_PLUGINS (the plugin meant is not loaded) is the
        one-line error of every name lookup (:meth:`lookup`, exit 2), so ``sslkit plugins`` still lists."""
        for variable, names in (("SSLKIT_LOAD_PLUGINS", allow or []), ("SSLKIT_DISABLE_PLUGINS", sorted(deny))):
            for name in names:
                if name in installed:
                    continue
                message = unknown_name_message("plugin", name, installed, f" (in {variable})")
                if variable == "SSLKIT_DISABLE_PLUGINS":
                    print(f"sslkit: {message}; ignored", file=sys.stderr)
                elif self.env_error is None:
                    self.env_error = message

    def _check_hook_names(self, info: PluginInfo, plugin: Any) -> None:
        """Report each ``@hookimpl`` named like no sslkit hook, and each function named like a hook
        but not marked ``@hookimpl``: pluggy would silently never call either."""
        import inspect

        hooks = sorted(name for name in vars(hookspecs) if name.startswith("register_"))
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.spec is None and not all(impl.optionalhook for impl in caller.get_hookimpls()):
                self._fail(info, f"has an @hookimpl that sslkit never calls: "
                                 + unknown_name_message("hook", caller.name, hooks))
        for hook in hooks:
            function = getattr(plugin, hook, None)
            if inspect.isroutine(function) and self.pm.parse_hookimpl_opts(plugin, hook) is None:
                self._fail(info, f"defines {hook} without @hookimpl, so sslkit never calls it; "
                                 f"define it with @hookimpl (from sslkit.api import hookimpl)")

    def _collect(self) -> None:
        """Call every plugin's ``register_*`` hooks, then add what they registered in that order.

        A hook that raises :class:`UsageError` refuses its plugin (it says why it cannot work
        here): nothing it registered is kept and its later hooks are not called. Any other
        exception from a hook is reported; what the plugin registered before it is kept.
        """
        made: list[tuple[str, str, Any, str]] = []
        refused: set[str] = set()
        for kind in KINDS:
            for impl in getattr(self.pm.hook, f"register_{kind}").get_hookimpls():
                plugin = impl.plugin_name
                if plugin in refused:
                    continue
                info = self.infos.setdefault(plugin, PluginInfo(plugin))
                mine: list[tuple[str, str, Any, str]] = []

                def register(name: str, obj: Any, _mine: list = mine, _kind: str = kind, _plugin: str = plugin) -> None:
                    _mine.append((_kind, name, obj, _plugin))

                try:
                    returned = impl.function(register=register)
                except UsageError as exc:
                    refused.add(plugin)
                    self._fail(info, f"refused to load (register_{kind}): {exc}; not loaded")
                    continue
                except BaseException as exc:  # sys.exit() in a hook too: reported, the others keep working
                    _reraise_interrupt(exc)
                    self._fail(info, f"register_{kind} raised {type(exc).__name__}: {exc}")
                else:
                    if returned is not None:
                        self._fail(info, f"register_{kind} returned a value; call register(name, obj) instead")
                made += mine
        for kind, name, obj, plugin in made:
            if plugin not in refused:
                self._add(kind, name, obj, plugin)

    def _add(self, kind: str, name: str, obj: Any, plugin: str) -> None:
        what = _SINGULAR[kind]
        if not _valid_name(name):
            self._fail(self.infos[plugin], f"registered an invalid {what} name {name!r}: a name has no ':', ',' "
                                           f"or whitespace and does not start with '-' (skipped)")
            return
        wrong = _type_problem(kind, obj)
        if wrong:
            self._fail(self.infos[plugin], f"registered {what} {name!r} as {_describe(obj)}; {wrong} (skipped)")
            return
        if kind == "sources" and getattr(obj, "scheme", None) != name:
            self._fail(self.infos[plugin], f"registered source {name!r} whose class has scheme "
                                           f"{getattr(obj, 'scheme', None)!r}; set scheme = {name!r} (skipped)")
            return
        self.infos[plugin].registered[kind].append(name)
        other = self.entries[kind].get(name)
        if other is None:
            self.entries[kind][name] = Entry(obj, plugin)
            return
        owners = self.conflicts[kind].setdefault(name, [other.plugin])
        owners.append(plugin)
        self.shadowed[kind].setdefault(name, []).append(Entry(obj, plugin))
        for owner in owners:
            line = f"{what} {name!r} is also registered by " + ", ".join(repr(p) for p in owners if p != owner)
            conflicts = self.infos[owner].conflicts
            conflicts[:] = [c for c in conflicts if not c.startswith(f"{what} {name!r} ")] + [line]

    def conflict_message(self, kind: str, name: str) -> str | None:
        """The one-line error for using ``name`` when several plugins registered it, else None."""
        owners = self.conflicts[kind].get(name)
        if not owners:
            return None
        infos = [self.infos[p] for p in owners if p in self.infos]
        pick = next((i for i in reversed(infos) if not i.builtin), infos[-1] if infos else None)
        entry = (pick.entry_point or pick.name) if pick else owners[-1]
        shared = sum((i.entry_point or i.name) == entry for i in self.infos.values()) > 1
        advice = f" (pip uninstall {pick.distribution})" if shared and pick and pick.distribution else \
            f" or set SSLKIT_DISABLE_PLUGINS={entry}"
        return (f"{_SINGULAR[kind]} {name!r} is registered by {len(owners)} plugins, "
                + " and ".join(repr(p) for p in owners) + "; uninstall one" + advice)

    def registrations(self, kind: str, name: str) -> list[Entry]:
        """Every registration of ``name`` while it is a conflict (a bare ``--data PATH`` sniffs each), else its entry."""
        entry = self.entries[kind].get(name)
        shadowed = self.shadowed[kind].get(name, []) if name in self.conflicts[kind] else []
        return ([entry] if entry is not None else []) + shadowed

    def lookup(self, kind: str, name: str) -> Entry | None:
        """The entry registered as ``name``; None if none; a :class:`UsageError` if ambiguous, or if
        SSLKIT_LOAD_PLUGINS names a plugin that is not installed."""
        message = self.env_error or self.conflict_message(kind, name)
        if message:
            raise UsageError(message)
        return self.entries[kind].get(name)

    def _fail(self, info: PluginInfo, message: str) -> None:
        info.error = message if not info.error else f"{info.error}; {message}"
        line = f"sslkit: plugin {info.name!r} {message}".replace("\n", " ")
        self.failures.append(line)
        print(line, file=sys.stderr)


def _reraise_interrupt(exc: BaseException) -> None:
    """Let Ctrl-C (and a closing generator) through; any other exception, SystemExit included, is one plugin's."""
    if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
        raise exc


def _distributions(eps: Any) -> dict[int, tuple[str, str | None]]:
    """``id(entry point)`` -> its distribution's name ("" if unknown) and version, each distribution's metadata
    parsed once (sslkit's holds the README: ~2.6 ms a parse, which was three per entry point per load)."""
    read: dict[int, tuple[str, str | None]] = {id(None): ("", None)}
    for dist in {id(ep.dist): ep.dist for ep in eps if ep.dist is not None}.values():
        meta = dist.metadata
        read[id(dist)] = ((meta["Name"] or "") if meta else "", meta["Version"] if meta else None)
    return {id(ep): read[id(ep.dist)] for ep in eps}


def _valid_name(name: Any) -> bool:
    """A registered name: typed in flags and in comma lists (``--callbacks a,b``), ``prefix:model``."""
    return (isinstance(name, str) and bool(name) and not name.startswith("-")
            and not any(c in ":," or c.isspace() for c in name))


def _type_problem(kind: str, obj: Any) -> str | None:
    """What a registered object of ``kind`` should be, when ``obj`` is not that; else None."""
    import dataclasses

    if kind in ("tasks", "sources"):
        if kind == "tasks":
            from sslkit.task import Task as base
        else:
            from sslkit.data.source import Source as base
        if not (isinstance(obj, type) and issubclass(obj, base)):
            return f"it should be a subclass of sslkit.api.{base.__name__}"
        options = getattr(obj, "Options", None)
        if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
            return f"its Options should be a @dataclass or None, got {_describe(options)}"
        return None
    if not callable(obj):
        return "it should be callable" + (" (a factory: model name -> nn.Module)" if kind == "backbones" else "")
    return None


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"class {obj.__qualname__}"
    if callable(obj) and isinstance(getattr(obj, "__qualname__", None), str):
        return f"{type(obj).__name__} {obj.__qualname__}"
    text = repr(obj)
    return f"{type(obj).__name__} {text if len(text) <= 40 else text[:39] + '…'}"


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


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
