"""Checkpoints that are complete or absent, never half-written.

A checkpoint is a folder ``checkpoints/step-00000123/`` holding ``model.safetensors``
(every tensor of the task: encoder, heads, EMA teachers, queues) and ``state.pt``
(optimizer, step, RNG states; plain tensors and containers only, loaded with
``weights_only=True`` so a malicious pickle is refused). It is written into a temporary
folder, fsynced, and renamed into place; ``latest`` is the newest folder that loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` ones."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        target = folder / f"{PREFIX}{step:08d}"
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = load_file(str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return tensors, state


def load_latest(folder: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that loads completely, skipping damaged ones."""
    for path in reversed(list_checkpoints(folder)):
        try:
            tensors, state = load(path)
        except Exception:
            continue
        return path, tensors, state
    return None
