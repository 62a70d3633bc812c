"""Output files a command writes: refused when they would replace something silently,
written through a temporary file in the same folder so nothing half-written is left."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from sslkit.errors import UsageError


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``) or cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{str(out)!r} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise UsageError(f"{str(out)!r} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {str(out.parent)!r} does not exist")
    try:  # a real probe: access() says yes to root even where nothing can be created
        fd, probe = tempfile.mkstemp(prefix=".tmp-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output folder {str(out.parent)!r} is not writable: {exc.strerror or exc}") from None


def write_atomic(out: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``write(tmp)`` on a temporary file beside ``out``, then rename it to ``out``."""
    out = Path(out)
    try:
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix or out.suffix, dir=out.parent)
    except OSError as exc:
        raise UsageError(f"cannot write to {str(out.parent)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise UsageError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
