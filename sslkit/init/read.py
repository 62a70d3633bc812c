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

from sslkit.errors import UsageError, first_line
from sslkit.plain_pickle import NotPlainData, load_plain

WRAPPERS = ("state_dict", "model", "module", "teacher", "target_encoder", "encoder", "net", "params")


def read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of the weights file ``path`` (``name`` is how errors call it)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise UsageError(f"--init {name}: not a readable safetensors file ({first_line(exc)})") from None
    try:
        obj = load_plain(path)
    except NotPlainData as exc:
        raise UsageError(f"--init {name}: cannot be read as plain weights with torch.load(weights_only=True) "
                         f"({exc}); convert it to .safetensors") from None
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

