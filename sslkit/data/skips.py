"""Why a sample was skipped, as ``data_report.json`` and the summary line say it."""

from __future__ import annotations

from sslkit.data.source import Undecodable
from sslkit.errors import without_quoted


def skip_reason(exc: Exception) -> str:
    """A sample's skip reason for ``data_report.json``: the source's own (:class:`Undecodable`),
    else the error's type and message (its type alone when it has none), quoted values dropped:
    a decoder quotes the file's path, whose folders below the data root can name a patient."""
    if isinstance(exc, Undecodable):
        return str(exc)
    text = without_quoted(str(exc))
    if isinstance(exc, MemoryError):
        text = text or "decoding it needs more memory than is free"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def transient(reason: str) -> bool:
    """A skip for lack of memory (MemoryError), which another run may not meet: never cached."""
    return "MemoryError" in reason
