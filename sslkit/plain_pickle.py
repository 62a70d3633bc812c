"""Reading a torch pickle as plain data only: ``torch.load(weights_only=True)``, which refuses
any pickled object that is not a tensor, a number, a string or a container of them, so
nothing in the file runs. A refusal is reported as what was refused (``Unsupported global:
GLOBAL os.system ...``; ``Unsupported operand 80`` for a damaged file), not as torch's
preface, which suggests ``weights_only=False``: the one thing not to do with a file of
unknown origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sslkit.errors import first_line


class NotPlainData(ValueError):
    """The file is not a plain-data torch pickle (damaged, or it holds code); the message says why."""


def load_plain(path: Path) -> Any:
    """The plain data pickled in ``path`` (tensors on the CPU); :class:`NotPlainData` otherwise."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NotPlainData(refusal_reason(exc)) from None


PREFACE = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")


def refusal_reason(exc: Exception) -> str:
    """The first sentence of what torch's weights-only unpickler refused, past its preface
    (the wording differs between refusals); else the error's first line."""
    lines = (line.strip() for line in str(exc).splitlines())
    reasons = [r for r in (line.removeprefix("WeightsUnpickler error:").strip() for line in lines
                           if line and not line.startswith(PREFACE)) if r]
    return reasons[0].split(". ")[0].rstrip(".")[:200] if reasons else first_line(exc)

