"""``--callbacks a,b``: build the named callbacks that plugins registered."""

from __future__ import annotations

import os
from typing import Any

from sslkit.engine.events import unknown_event_message
from sslkit.errors import UsageError, first_line, unknown_name_message
from sslkit.plugins import get_plugins

#: the files of sslkit's own (:data:`sslkit.engine.events.OWN_FILES`) that a built-in callback writes
#: (the engine does not watch sslkit's own callbacks; the contract kit checks them with this)
BUILTIN_WRITES = {"csv": ("metrics.csv",)}


def callback_names(spec: str) -> list[str]:
    """``"csv, tensorboard"`` -> ``["csv", "tensorboard"]`` (empty and repeated names dropped)."""
    names: list[str] = []
    for part in spec.split(","):
        name = part.strip()
        if name and name not in names:
            names.append(name)
    return names


def check_callbacks(spec: str) -> None:
    """Refuse an unknown callback name (one line, with the closest match)."""
    plugins = get_plugins()
    for name in callback_names(spec):
        if plugins.lookup("callbacks", name) is None:
            raise UsageError(_left_out(name, spec) or unknown_name_message(
                "callback", name, sorted(plugins.entries["callbacks"]), " (in --callbacks)"))


def _left_out(name: str, spec: str) -> str | None:
    """Why callback ``name`` is missing when SSLKIT_LOAD_PLUGINS / SSLKIT_DISABLE_PLUGINS leave out
    an installed plugin of that name (the built-in ``csv`` and ``tensorboard`` are such); else None."""
    from sslkit.registry import not_loaded
    from sslkit.run import RunConfig

    blocked, variable = not_loaded()
    if name not in blocked:
        return None
    if variable == "SSLKIT_LOAD_PLUGINS":
        allow = os.environ[variable].strip()
        why, fix = f"SSLKIT_LOAD_PLUGINS={allow!r} leaves out", f"add {name} to SSLKIT_LOAD_PLUGINS"
    else:
        why, fix = "SSLKIT_DISABLE_PLUGINS disables", f"take {name} out of SSLKIT_DISABLE_PLUGINS"
    default = " (the default --callbacks)" if spec == RunConfig.callbacks else ""
    return (f"callback {name!r}{default} is not loaded: {why} its plugin {name!r}; {fix}, "
            f"or give --callbacks with the callbacks you want ('' for none)")


def create_callbacks(spec: str) -> list[tuple[str, Any, bool]]:
    """``(label, callback, builtin)`` for every name in ``spec``, in order; the label names the plugin,
    ``builtin`` marks sslkit's own callbacks, whose calls :class:`~sslkit.engine.events.Events`
    does not watch for writes to sslkit's own files (``csv`` writes metrics.csv).
    A callback that cannot be built (its library missing, say) or that has a method named like an
    event but none (``on_step_ended``) is one line: the run has not started."""
    check_callbacks(spec)
    out = []
    plugins = get_plugins()
    for name in callback_names(spec):
        entry = plugins.lookup("callbacks", name)
        label = f"{name!r} (plugin {entry.plugin!r})"
        try:
            callback = entry.obj()
        except UsageError:
            raise
        except (Exception, SystemExit) as exc:  # sys.exit() in a factory too: one line, not a silent exit
            raise UsageError(f"callback {label} cannot start: {type(exc).__name__}: {first_line(exc)}") from None
        unknown = unknown_event_message(label, callback)
        if unknown:
            raise UsageError(unknown)
        info = plugins.infos.get(entry.plugin)
        out.append((label, callback, bool(info is not None and info.builtin)))
    return out
