"""A third-party plugin's exception, as the one line the CLI prints (:func:`plugin_fault`): the plugin
whose code raised it, what it registered that was running, the exception and where it was raised."""

from __future__ import annotations

import functools
from typing import Any


def exit_if_plugin_fault(exc: BaseException) -> None:
    """Print :func:`plugin_fault`'s line and exit 1 when ``exc`` is a third-party plugin's; else return.
    Under torchrun every rank prints it (each may meet the bug alone), tagged with its rank but rank 0."""
    import os
    import sys

    from sslkit.errors import printable, reports_here

    line = plugin_fault(exc)
    if line is None:
        return
    rank = "" if reports_here() else f" (rank {os.environ.get('RANK', '').strip()})"
    print(printable(f"error{rank}: {line}"), file=sys.stderr, flush=True)
    sys.exit(1)


def plugin_fault(exc: BaseException) -> str | None:
    """The one line the CLI prints for ``exc`` when a third-party plugin's code raised it, else None.

    The plugin is the one whose module holds the innermost frame of ``exc``'s traceback (its entry
    point's module and package, and the modules of what it registered); a ``TypeError`` raised when
    sslkit called one of its functions with arguments it does not take (a wrong signature) is its
    too. The line names the plugin (and its distribution), what it registered that was running
    (``task 'x'``, found from the frames), the exception and where it was raised. None (a traceback,
    as any error of sslkit's own) for sslkit's code and the built-in plugins, running out of memory,
    or with ``SSLKIT_TRACEBACK=1``."""
    import os

    from sslkit import plugins as plugin_set

    loaded = plugin_set._loaded  # not loaded: no plugin code ran
    if (loaded is None or os.environ.get("SSLKIT_TRACEBACK", "").strip() not in ("", "0")
            or isinstance(exc, MemoryError) or type(exc).__name__.endswith("OutOfMemoryError")):
        return None
    try:
        return _fault_line(exc, loaded)
    except Exception:  # never hide the error being reported behind one of this function's own
        return None


def _fault_line(exc: BaseException, loaded: Any) -> str | None:
    """:func:`plugin_fault`'s line for ``exc``, given the ``loaded`` plugins; None: no third-party plugin's."""
    import os
    import re
    import traceback

    from sslkit.errors import first_line

    owners, named = _third_party(loaded)
    frames = list(traceback.walk_tb(exc.__traceback__))
    mine = [(f, line) for f, line in frames if _owner(f.f_globals.get("__name__"), owners)]
    where, plugin, what = "", None, None
    below = frames[frames.index(mine[-1]) + 1:] if mine else []
    if any(_ours(f.f_globals.get("__name__") or "") for f, _ in below):
        return None  # raised in sslkit's code that the plugin called: ours to show, with the traceback
    if mine:
        frame, line = mine[-1]
        plugin = _owner(frame.f_globals.get("__name__"), owners)
        what = next((w for f, _ in reversed(mine) if (w := _frame_object(f, named[plugin]))), None)
        code = frame.f_code
        where = f" (in {getattr(code, 'co_qualname', code.co_name)}, {os.path.basename(code.co_filename)} line {line})"
    elif isinstance(exc, TypeError) and (call := re.match(r"([\w.]+)\(\) ", str(exc))):
        plugin, what = _called(call.group(1), owners, named)
        where = " (sslkit called it with the documented arguments)" if plugin else ""
    if plugin is None:
        return None
    info = loaded.infos.get(plugin)
    dist = f" ({info.distribution}{' ' + info.version if info.version else ''})" if info and info.distribution else ""
    running = f" failed in {what}" if what else " failed"
    return (f"plugin {plugin!r}{dist}{running}: {type(exc).__name__}: {first_line(exc)}{where}; report it to the "
            f"plugin's authors (SSLKIT_TRACEBACK=1 prints the traceback)")


#: how the line names what a plugin registered, by kind
_LABELS = {"tasks": "task", "backbones": "backbone prefix", "sources": "source", "exporters": "export format",
           "callbacks": "callback"}


def _third_party(loaded: Any) -> tuple[dict[str, str], dict[str, list[tuple[Any, str]]]]:
    """Module name -> plugin of every loaded plugin that is not built-in; plugin -> what it registered
    (class or function -> ``task 'x'``)."""
    import types

    owners: dict[str, str] = {}
    named: dict[str, list[tuple[Any, str]]] = {}
    tops: dict[str, set[str]] = {}  # plugin -> the top-level packages that are its own
    for plugin, obj in loaded.pm.list_name_plugin():
        info = loaded.infos.get(plugin)
        if obj is None or (info is not None and info.builtin):
            continue
        module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
        package = getattr(obj, "__package__", None) if isinstance(obj, types.ModuleType) else None
        for name in (module, package):
            if name and not _ours(name):
                owners.setdefault(name, plugin)
        named[plugin] = []
        tops[plugin] = _own_tops(module, info)
    for kind, entries in loaded.entries.items():
        for name, entry in [*entries.items(), *((n, e) for n, es in loaded.shadowed[kind].items() for e in es)]:
            if entry.plugin in named:
                named[entry.plugin].append((entry.obj, f"{_LABELS.get(kind, kind)} {name!r}"))
                module = getattr(entry.obj, "__module__", None)  # a helper module of the plugin's own, not a
                if module and not _ours(module) and module.partition(".")[0] in tops[entry.plugin]:  # library's
                    owners.setdefault(module, entry.plugin)
    return owners, named


def _own_tops(module: str | None, info: Any) -> set[str]:
    """The top-level packages of a plugin: its module's, and those its distribution installs."""
    import re

    tops = {module.partition(".")[0]} if module else set()
    dist = getattr(info, "distribution", None)
    if dist:
        norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
        tops |= {top for top, dists in _packages().items() if norm(dist) in map(norm, dists)}
    return tops


@functools.lru_cache(maxsize=1)
def _packages() -> dict[str, list[str]]:
    """Top-level package -> the distributions that install it (read once: it scans every one)."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


def _ours(module: str) -> bool:
    """sslkit's own modules and the built-in plugins' (``sslkit_plugins``, ``plugins`` in a checkout)."""
    return any(module == top or module.startswith(top + ".") for top in ("sslkit", "sslkit_plugins", "plugins"))


def _owner(module: str | None, owners: dict[str, str]) -> str | None:
    """The plugin that ``module`` belongs to (itself or a submodule of a plugin's module), else None."""
    while module:
        if module in owners:
            return owners[module]
        module = module.rpartition(".")[0]
    return None


def _frame_object(frame: Any, named: list[tuple[Any, str]]) -> str | None:
    """What the plugin registered that ``frame`` runs: its function (an exporter, a backbone factory)
    or the registered class of its ``self`` / ``cls`` (a task, a source; the class itself first)."""
    for obj, label in named:
        if getattr(obj, "__code__", None) is frame.f_code:
            return label
    for key in ("self", "cls"):
        value = frame.f_locals.get(key)
        cls = value if isinstance(value, type) else type(value) if value is not None else None
        classes = [(obj, label) for obj, label in named if isinstance(obj, type)] if cls is not None else []
        label = next((label for obj, label in classes if obj is cls), None) or \
            next((label for obj, label in classes if issubclass(cls, obj)), None)
        if label:
            return label
    return None


def _called(qualname: str, owners: dict[str, str],
            named: dict[str, list[tuple[Any, str]]]) -> tuple[str | None, str | None]:
    """The plugin (and what it registered) whose function ``qualname`` (``f`` or ``Class.method``)
    a ``TypeError`` names, when sslkit's call to it failed before it ran."""
    import sys

    for plugin, objects in named.items():
        for obj, label in objects:
            if getattr(obj, "__qualname__", None) == qualname:
                return plugin, label
            if isinstance(obj, type) and qualname.startswith(obj.__qualname__ + ".") \
                    and hasattr(obj, qualname[len(obj.__qualname__) + 1:]):
                return plugin, label
    for module, plugin in owners.items():  # a class of the plugin's that it did not register
        obj: Any = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and _owner(getattr(obj, "__module__", None), owners) == plugin:
            return plugin, None
    return None, None
