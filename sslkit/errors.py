"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


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
