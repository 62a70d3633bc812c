"""``--callbacks a,b``: build the named callbacks that plugins registered."""

from __future__ import annotations

from typing import Any

from sslkit.errors import UsageError, first_line, unknown_name_message
from sslkit.plugins import get_plugins


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
            raise UsageError(unknown_name_message("callback", name, sorted(plugins.entries["callbacks"]),
                                                  " (in --callbacks)"))


def create_callbacks(spec: str) -> list[tuple[str, Any]]:
    """``(label, callback)`` for every name in ``spec``, in order; the label names the plugin.
    A callback that cannot be built (its library missing, say) is one line: the run has not started."""
    check_callbacks(spec)
    out = []
    for name in callback_names(spec):
        entry = get_plugins().lookup("callbacks", name)
        label = f"{name!r} (plugin {entry.plugin!r})"
        try:
            out.append((label, entry.obj()))
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"callback {label} cannot start: {type(exc).__name__}: {first_line(exc)}") from None
    return out
