"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
import re
from typing import Sequence


class UsageError(Exception):
    """A mistake in what the user asked for (unknown name, missing data, bad option...).

    The message is one line that says what was wrong and what would be right.
    """

    exit_code = 2


class CheckFailed(Exception):
    """A self-check failed (e.g. ONNX parity above tolerance). The CLI exits with code 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """An error's first line (its type's name when it has no message), at most 200 characters:
    what a one-line message quotes of an exception from a library, e.g.
    ``raise UsageError(f"cannot build {name}: {first_line(exc)}") from None``."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def unknown_name_message(what: str, name: str, valid: Sequence[str], hint: str = "", *, suggestions: int = 1,
                         listed: int = 40) -> str:
    """``unknown <what> '<name>' (did you mean 'x'?); choose from: a, b, ...<hint>`` in one line:
    sslkit's one did-you-mean. ``suggestions``: how many close names to offer; ``listed``: how
    many valid names to list (0: none, for a catalogue of thousands; say where to look in ``hint``)."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=suggestions)
    guess = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    if not listed:
        return f"unknown {what} {name!r}{guess}{hint}"
    listing = ", ".join(valid[:listed]) + (", ..." if len(valid) > listed else "") if valid else "none installed"
    return f"unknown {what} {name!r}{guess}; choose from: {listing}{hint}"


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
