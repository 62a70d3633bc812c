"""Reading a weights file without running code from it.

``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin`` with
``torch.load(weights_only=True)``, which refuses any pickled object that is not a tensor,
a number, a string or a container of them (never arbitrary pickle). Training checkpoints
that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``, DINO's
``{"teacher": ...}``) are unwrapped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sslkit.errors import UsageError

WRAPPERS = ("state_dict", "model", "module", "teacher", "target_encoder", "encoder", "net", "params")


def read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of the weights file ``path`` (``name`` is how errors call it)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise UsageError(f"--init {name}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"--init {name}: cannot be read as plain weights with torch.load(weights_only=True) "
                         f"({_unpickler_reason(exc)}); convert it to .safetensors") from None
    return _unwrap(obj, name)


def _unwrap(obj, name: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) // 2:
            return {str(k): v for k, v in tensors.items()}
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    raise UsageError(f"--init {name}: holds no state dict of tensors (keys: "
                     f"{', '.join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__})")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused (``Unsupported global: GLOBAL os.system ...``,
    ``Unsupported operand 80`` for a damaged file), not its preface, which suggests
    ``weights_only=False``: the one thing not to do with a file of unknown origin."""
    text = str(exc)
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()] if found else []
    return lines[0].split(". ")[0].rstrip(".")[:200] if lines else _first_line(exc)  # its first sentence
