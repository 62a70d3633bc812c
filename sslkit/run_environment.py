"""The provenance a run records in ``run.json``'s ``environment``: library versions, hardware, the
sslkit source revision and the command (no user or host identifiers)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """Versions, hardware and code revision for provenance (no user or host identifiers); the
    command as a shell takes it back, and torchrun's settings (``launcher``) when it started the run."""
    import timm
    import torch

    from sslkit import __version__
    from sslkit.run_record import command, launcher

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "sslkit": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": sys.version.split()[0],
        "platform": platform.machine(),
        "os": platform.system(),
        "cuda": torch.cuda.get_device_name(0) if gpus else None,
        "gpus": gpus,
        "cuda_version": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "command": command(),
        "launcher": launcher(),
    }


def git_commit() -> str | None:
    """The commit of the sslkit source checkout (``+dirty`` with local changes), if any."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None

