"""The run state: what a checkpoint holds and how a run continues from one.

A checkpoint (see :mod:`sslkit.checkpoint` for the on-disk format) holds the task's
tensors (model, EMA teachers, queues, centres), the optimizer, the AMP scaler, the
schedule, the data position (epoch, step within it) and the Python, NumPy, torch CPU and
CUDA generator states of every rank, so a resumed run repeats the uninterrupted one step
for step. :class:`RunState` is the position; :func:`save` and :func:`restore` move the
rest between a :class:`~sslkit.engine.setup.Setup` and the disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslkit import checkpoint, distributed
from sslkit.engine.log import note
from sslkit.engine.setup import Setup, on_main, seed_everything
from sslkit.errors import UsageError


@dataclass
class RunState:
    """Where the run is: optimizer steps done, the epoch, and steps done within it."""

    step: int = 0
    epoch: int = 0
    pos: int = 0
    resumed_from: int | None = None  # the checkpoint's step, when this session resumed
    reseeded: bool = False  # resumed with another number of processes: augmentations re-seeded (run.json says)


def save(s: Setup, state: RunState) -> Path | None:
    """Checkpoint ``state`` (collective: every rank sends its RNG state; rank 0 writes).

    Returns the checkpoint folder on rank 0, None elsewhere. A checkpoint that cannot be
    written (a full disk) stops every rank at this step with rank 0's one line: rank 0 sends
    the outcome (:func:`~sslkit.engine.setup.on_main`), so no rank goes on to the next step's
    all-reduce alone."""
    rngs = distributed.gather_objects(get_rng(s.device))
    return on_main(lambda: _write(s, state, rngs))


def _write(s: Setup, state: RunState, rngs: list[Any]) -> Path:
    """Rank 0's part of :func:`save`: the checkpoint folder written."""
    data = {
        "optimizer": s.optimizer.state_dict(),
        "schedule": s.schedule.state(state.step),
        "scaler": s.scaler.state_dict(),
        "step": state.step,
        "data": {"epoch": state.epoch, "step_in_epoch": state.pos, "seed": s.cfg.seed, "world_size": s.world},
        "rng": rngs,
    }
    return checkpoint.save(s.checkpoint_dir, state.step, s.task.state_dict(), data, keep=s.cfg.keep_checkpoints)


def restore(s: Setup) -> RunState:
    """The state to start from: the newest valid checkpoint with ``--resume`` (rank 0
    chooses it), else step 0. Loads the task, optimizer, scaler and RNG states."""
    if not s.cfg.resume:
        return RunState()
    found = on_main(lambda: latest(s.checkpoint_dir))
    path = distributed.broadcast_object(str(found) if found else None)
    if path is None:
        return RunState()
    tensors, data = checkpoint.load(Path(path))
    try:
        missing, unexpected = s.task.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of another shape: another version's or option's model
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise UsageError(f"checkpoint {path} does not fit this task/backbone: {first}") from None
    if missing or unexpected:
        raise UsageError(f"checkpoint {path} does not fit this task/backbone "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    s.optimizer.load_state_dict(data["optimizer"])
    if data.get("scaler"):
        s.scaler.load_state_dict(data["scaler"])
    step = int(data["step"])
    state = RunState(step, int(data["data"]["epoch"]), int(data["data"]["step_in_epoch"]), resumed_from=step)
    rngs = data["rng"]
    if len(rngs) == s.world:
        set_rng(rngs[s.rank], s.device)
    else:
        seed_everything(s.cfg.seed + 7919 * s.rank + step)
        state.reseeded = True
        if s.main:
            note(f"note: checkpoint written by {len(rngs)} processes, resumed with {s.world}: "
                 f"augmentations are re-seeded (data order is unchanged)")
    return state


def latest(folder: Path) -> Path | None:
    """The newest checkpoint in ``folder`` that verifies (damaged newer ones are named)."""
    found = checkpoint.load_latest(folder)
    if found is None:
        return None
    path, _, _, skipped = found
    for bad, why in skipped:
        note(f"note: skipping damaged checkpoint {bad.name}: {why}")
    return path


def get_rng(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as plain data (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng(state: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`get_rng` returned."""
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return tuple(_tuples(v) for v in obj)
    return obj
