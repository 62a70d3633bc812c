"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
import os
import re
import reprlib
import sys
from typing import Any, Sequence


class UsageError(Exception):
    """A mistake in what the user asked for (unknown name, missing data, bad option...).

    The message is one line that says what was wrong and what would be right.
    """

    exit_code = 2


class CheckFailed(Exception):
    """A self-check failed (e.g. ONNX parity above tolerance). The CLI exits with code 1."""

    exit_code = 1


class PluginError(Exception):
    """A plugin broke its contract where sslkit checks what it gave back (an exporter that wrote no file,
    a source whose ``describe()`` is not JSON): one line naming the plugin, exit code 1 (a bug of the
    plugin, not a mistake of the user). An exception raised inside a third-party plugin's own code is
    told the same way by the CLI (:func:`sslkit.plugin_fault.plugin_fault`)."""

    exit_code = 1


def reports_here() -> bool:
    """Whether this process prints user errors and notes: ``RANK`` 0 or unset (one process). Under
    torchrun every process meets the same error; rank 0 alone says it (the others exit with the
    same status, silent), so 8 processes do not print the same line 8 times. From the environment,
    not the process group: it holds before the group is joined and after it is left."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def say(line: str) -> None:
    """An error or note on stderr, once: in the process that reports (:func:`reports_here`). A line
    whose writing a signal interrupted (a handler printing while stderr was being written) is dropped."""
    if reports_here():
        try:
            print(line, file=sys.stderr, flush=True)
        except RuntimeError:  # reentrant call into the buffered stderr
            pass


_FIRST_LINE_MAX = 200  # characters first_line quotes at most, its "…" included


def first_line(exc: BaseException) -> str:
    """An error's first line (its type's name when it has no message), at most 200 characters (a
    longer one cut, ending in "…"): what a one-line message quotes of an exception from a library, e.g.
    ``raise UsageError(f"cannot build {name}: {first_line(exc)}") from None``."""
    text = str(exc).strip()
    line = text.splitlines()[0].rstrip() if text else type(exc).__name__
    return line if len(line) <= _FIRST_LINE_MAX else line[:_FIRST_LINE_MAX - 1].rstrip() + "…"


class _Brief(reprlib.Repr):
    """reprlib's bounded repr (a few items of a few levels, long strings cut in the middle), with
    bytes cut before they are repr'd (reprlib would repr them whole)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxset, self.maxfrozenset = 3, 4, 4, 4, 4
        self.maxdict, self.maxstring, self.maxlong, self.maxother = 4, limit, limit, limit

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` in at most about ``limit`` characters, walking a bounded number of nested
    items: how an error message quotes a value the user gave (a config file's value may be 100 MB
    long, or a YAML alias bomb of 9**9 items), e.g. ``f"lr must be a number, got {shown(value)}"``."""
    try:
        text = _Brief(limit).repr(value)
    except Exception:  # a repr that fails (an int of too many digits, ...)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit + 5 else text[:limit] + "..."


#: names longer than this get no did-you-mean (difflib's cost grows with the name's length)
_SUGGEST_MAX = 100


def unknown_name_message(what: str, name: str, valid: Sequence[str], hint: str = "", *, suggestions: int = 1,
                         listed: int = 40, empty: str = "none installed") -> str:
    """``unknown <what> '<name>' (did you mean 'x'?); choose from: a, b, ...<hint>`` in one line:
    sslkit's one did-you-mean. ``suggestions``: how many close names to offer; ``listed``: how
    many valid names to list (0: none, for a catalogue of thousands; say where to look in ``hint``);
    ``empty``: what the listing says when there is no valid name.
    ``name`` is quoted through :func:`shown` (bounded); one that is not a string or is over
    100 characters gets no suggestion."""
    valid = list(valid)
    close = []
    if isinstance(name, str) and len(name) <= _SUGGEST_MAX:
        close = difflib.get_close_matches(name, valid, n=suggestions)
    guess = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    quoted = shown(name, _SUGGEST_MAX)
    if not listed:
        return f"unknown {what} {quoted}{guess}{hint}"
    listing = ", ".join(valid[:listed]) + (", ..." if len(valid) > listed else "") if valid else empty
    return f"unknown {what} {quoted}{guess}; choose from: {listing}{hint}"


def without_quoted(text: str) -> str:
    """``text`` on one line with each quoted value (``'...'`` or ``"..."``) shown as ``'…'``: what an
    error message may say in a report, where a quoted path or header value could name a patient."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", " ".join(str(text).split())).strip()


def printable(text: str) -> str:
    """``text`` safe to print on one line of a terminal or log: control characters (a newline that
    would forge a line of output, an escape sequence) and undecodable bytes of a file name (lone
    surrogates from ``surrogateescape``) are shown as Python escapes (``\\n``, ``\\x1b``, ``\\xff``)."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte of a non-UTF-8 file name
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code <= 0xDFFF:
            out.append(ch.encode("unicode_escape").decode("ascii") if code < 0xD800 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
