"""Reading weights without running code from them.

``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` with
torch's weights-only unpickler, which builds nothing but tensors, numbers, strings and
containers of them (never arbitrary pickle). A training checkpoint's other objects (a
Lightning ``.ckpt``'s hyper-parameters: ``argparse.Namespace``, OmegaConf) are read as inert
placeholders and named in the record (:func:`sslkit.plain_pickle.load_weights`). Checkpoints
that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``, DINO's ``{"teacher": ...}``)
are unwrapped. A sharded model (``*.index.json``) is its shards' tensors together.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sslkit.errors import UsageError, first_line
from sslkit.init.resolve import INDEX_SUFFIX, shard_files
from sslkit.plain_pickle import NotPlainData, load_weights

WRAPPERS = ("state_dict", "model", "module", "teacher", "target_encoder", "encoder", "net", "params")


def read_weights(path: Path, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({key: tensor}, not_read)`` of the weights at ``path`` (a file or a shard index);
    ``not_read`` names the pickled objects that were not data (``name`` is how errors call it)."""
    if not path.name.endswith(INDEX_SUFFIX):
        return read_file(path, name)
    tensors: dict[str, torch.Tensor] = {}
    not_read: set[str] = set()
    for shard in shard_files(path, name):
        part, skipped = read_file(shard, f"{name} (shard {shard.name})")
        twice = sorted(tensors.keys() & part.keys())
        if twice:
            raise UsageError(f"--init {name}: {shard.name} repeats tensors of another shard (first: {twice[0]})")
        tensors.update(part)
        not_read.update(skipped)
    return tensors, sorted(not_read)


def read_file(path: Path, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One weights file: ``({key: tensor}, not_read)``."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = dict(load_file(str(path)))
        except Exception as exc:
            raise UsageError(f"--init {name}: not a readable safetensors file ({first_line(exc)})") from None
        if not tensors:  # a header of metadata only: nothing to start from
            raise UsageError(f"--init {name}: the safetensors file holds no tensors")
        return tensors, []
    try:
        obj, not_read = load_weights(path)
    except NotPlainData as exc:
        raise UsageError(f"--init {name}: cannot be read as plain weights with torch.load(weights_only=True) "
                         f"({exc}); convert it to .safetensors") from None
    return _unwrap(obj, name), not_read


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
    held = f"keys: {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict) else type(obj).__name__
    raise UsageError(f"--init {name}: holds no state dict of tensors ({held}); a model saved whole "
                     "(torch.save(model)) is never unpickled: save torch.save(model.state_dict(), FILE)")
