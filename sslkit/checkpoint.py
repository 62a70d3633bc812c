"""Checkpoints that are complete or absent, never half-written, never executed.

A checkpoint is a folder ``checkpoints/step-00000123/`` holding

* ``model.safetensors``: every tensor of the task (encoder, heads, EMA teachers, queues,
  centres: ``task.state_dict()``);
* ``state.pt``: optimizer, schedule, AMP scaler, RNG states, data position, step: plain
  tensors and containers only, read back with ``torch.load(weights_only=True)`` so a
  malicious pickle is refused, not run;
* ``manifest.json``: size and SHA-256 of both files, written last.

The folder is written under a temporary name, every file fsynced, then renamed into place
and the parent directory fsynced. :func:`load_latest` takes the newest checkpoint whose
manifest matches and whose files load; a damaged or truncated one is skipped (and named
in the returned list), so a crash mid-write never leaves a bad "latest".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sslkit.errors import UsageError, first_line
from sslkit.output_file import TMP_PREFIX, created_mode, file_sha256, fsync_path, not_regular
from sslkit.plain_pickle import NotPlainData, load_plain
from sslkit.progress import human_bytes

PREFIX = "step-"
#: a checkpoint folder's name: ``step-`` and the step in 8 digits (others, a user's copies, are never touched)
STEP_NAME = re.compile(r"step-[0-9]{8}")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST = "manifest.json"


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies; tensors sharing storage (tied weights) are cloned apart."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if v.numel() and key in seen:
            v = v.clone()
        seen.add(key)
        out[k] = v
    return out


def save(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically; keep it and the ``keep - 1`` newest before it (0: keep all;
    a later one, damaged and skipped by a resume, is left until this run writes that step again)."""
    target = folder / f"{PREFIX}{step:08d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=folder))
    except OSError as exc:
        raise _write_failed(folder, target, exc) from None
    try:
        try:
            os.chmod(tmp, created_mode(directory=True))  # mkdtemp's 0700 would hide the checkpoint from the team
            save_file(_unshared(tensors), str(tmp / MODEL_FILE))
            torch.save(state, tmp / STATE_FILE)
            manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256([tmp / name])}
                        for name in (MODEL_FILE, STATE_FILE)}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
            for f in tmp.iterdir():
                os.chmod(f, created_mode())  # safetensors' save_file makes its file 0600
                fsync_path(f)
            fsync_path(tmp)
        except (OSError, RuntimeError, SafetensorError) as exc:  # disk full: torch and safetensors wrap it
            raise _write_failed(folder, target, exc) from None
        if target.exists():  # re-saving the same step (e.g. after a resume): replace it
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=folder))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_path(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep > 0:  # the newest up to this step: a later one is a damaged checkpoint a resume skipped, and
        # counting it would delete the good ones, this one included (--keep-checkpoints 1: the run lost)
        earlier = [p for p in list_checkpoints(folder) if p.name < target.name]
        for old in earlier[: max(0, len(earlier) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return target


#: free bytes under which a failed checkpoint write is reported as a full disk (torch.save says
#: '[enforce fail at inline_container.cc] ... unexpected pos N vs M' where the disk filled up)
FULL_BELOW = 64 * 2**20


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_failed(folder: Path, target: Path, exc: Exception) -> UsageError:
    """One line for a checkpoint that could not be written (a full disk, mostly)."""
    why = getattr(exc, "strerror", None) or first_line(exc)
    free = _free_bytes(folder)
    if free is not None and free < FULL_BELOW and "space" not in why.lower():  # torch's own words: 'unexpected pos'
        why = f"no space left on device ({human_bytes(free)} free; {why})"
    return UsageError(f"cannot write checkpoint {target.name} in {folder}: {why}; {last_kept(folder)}")


def last_kept(folder: Path) -> str:
    """What a run that stops on a failed write keeps, in words: its newest checkpoint in ``folder``, or none."""
    kept = list_checkpoints(folder)
    return f"the last good checkpoint, {kept[-1].name}, is kept" if kept else "no earlier checkpoint exists"


def remove_orphans(folder: Path) -> list[str]:
    """Clear what a killed :func:`save` left in ``folder``: unfinished ``.tmp-*`` folders
    are deleted; an ``.old-*`` folder (a checkpoint being replaced by one of the same step)
    is moved back when the replacement never arrived, else deleted. Call it only while
    holding the run lock (another process's write in progress looks the same). Returns
    the names removed."""
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".old-") and p.is_dir():
            for inner in p.iterdir():
                if inner.name.startswith(PREFIX) and not (folder / inner.name).exists():
                    os.replace(inner, folder / inner.name)
        if p.name.startswith((TMP_PREFIX, ".old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders are not listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())  # not step-00000004-best


def verify(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` holds a complete checkpoint matching its manifest.

    The manifest must list the model and state files with their size and sha256; a manifest
    that is not JSON, not an object, or names other files is damage, not a checkpoint."""
    kind = not_regular(path / MANIFEST)  # a FIFO would wait forever, /dev/zero never ends: nothing read
    if kind is not None:
        raise ValueError(f"{MANIFEST} is {kind}, not a regular file")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or not UTF-8; [[[[...]]]] too deep
        raise ValueError(f"no readable {MANIFEST}: {first_line(exc) or type(exc).__name__}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or set(files) != {MODEL_FILE, STATE_FILE} or not all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()):
        raise ValueError(f"{MANIFEST} does not list {MODEL_FILE} and {STATE_FILE} with their size and sha256")
    for name, meta in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            raise ValueError(f"{name} is missing or has the wrong size (truncated?)")
        if file_sha256([f]) != meta["sha256"]:
            raise ValueError(f"{name} does not match its checksum")


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and state of one checkpoint; a pickle that is not plain data is refused."""
    verify(path)
    tensors = load_file(str(path / MODEL_FILE))
    try:
        state = load_plain(path / STATE_FILE)
    except NotPlainData as exc:  # arbitrary objects are refused: report, never execute
        raise ValueError(f"{STATE_FILE} is not a plain-data checkpoint, refused: {exc}") from None
    return tensors, state


def load_latest(folder: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], list[tuple[Path, str]]] | None:
    """The newest checkpoint that verifies and loads, and the newer ones skipped (path, why)."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(folder)):
        try:
            tensors, state = load(path)
        except Exception as exc:
            skipped.append((path, first_line(exc)))
            continue
        return path, tensors, state, skipped
    if skipped:
        raise UsageError(f"no usable checkpoint in {folder}: newest {skipped[0][0].name}: {skipped[0][1]}")
    return None


def encoder_tensors(folder: Path) -> dict[str, Any]:
    """The encoder's tensors of checkpoint ``folder`` (the task's ``encoder.*``), verified
    against its manifest; a damaged or foreign checkpoint is one line."""
    try:
        verify(folder)
        tensors = load_file(str(folder / MODEL_FILE))
    except Exception as exc:
        raise UsageError(f"checkpoint {str(folder)!r} is unusable: {first_line(exc)}") from None
    encoder = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    if not encoder:
        raise UsageError(f"checkpoint {str(folder)!r} holds no encoder weights (no 'encoder.' tensors)")
    return encoder


def newest_hint(folder: Path) -> str:
    """`` (to use its newest checkpoint, give 'RUN/checkpoints/step-N')`` when ``folder`` (a run's
    checkpoints) has one, else nothing."""
    found = list_checkpoints(folder)
    return f" (to use its newest checkpoint, give {str(found[-1])!r})" if found else ""
