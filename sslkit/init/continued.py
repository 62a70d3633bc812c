"""Continued pretraining from ``--init``: the task's other parts, a head warm-up, a lower encoder LR.

Loading good encoder weights is not enough to continue pretraining them: the task's
decoder / projection heads start from random, their first gradients reach the encoder,
and a from-scratch LR undoes what the weights knew (measured: MAE continued on chest
X-rays fell 0.02-0.08 kNN AUROC below its init; BENCHMARKS.md, issue #15). So, when
``--init`` is given:

* :func:`restore_task_parts`: an sslkit run directory (its newest checkpoint) or a weights
  file holding the task's tensors also restores the task's non-encoder state
  (``Task.head_state()``: decoder, heads, EMA teachers, queues) where names and shapes
  match; a run directory only when it was a run of the same task.
* :func:`plan`: the encoder trains at ``init_lr_scale`` x the LR (default
  :data:`DEFAULT_LR_SCALE`), optionally with layer-wise decay for ViTs (``layer_decay``:
  block ``i`` of ``L`` gets ``layer_decay ** (L + 1 - (i + 1))``, patch embedding and
  tokens ``layer_decay ** (L + 1)``, as in MAE fine-tuning), and stays at LR 0 for the first
  ``init_freeze_steps`` optimizer steps (default :data:`DEFAULT_FREEZE_FRACTION` of the
  run when some trainable part of the task starts from random, else 0), while the heads
  train at the full LR.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sslkit.errors import UsageError
from sslkit.output_file import read_json
from sslkit.run import CHECKPOINTS, RUN_JSON

DEFAULT_LR_SCALE = 0.1  # encoder LR multiplier when continuing (BENCHMARKS.md, init_continue.py)
DEFAULT_FREEZE_FRACTION = 0.1  # of the run's steps, while some head starts from random
ENCODER = "encoder."
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = ("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token", "dist_token")


def restore_task_parts(init: str, task: nn.Module, task_name: str, allow_download: bool = False) -> dict[str, Any]:
    """Load the matching non-encoder tensors of ``init`` into ``task``; the record for run.json.

    ``{"from": name, "restored": [module names], "tensors": n, "skipped": [why...]}``; an
    empty ``restored`` when the source has none (Hub and timm weights never do).
    """
    from sslkit.init.resolve import resolve_init

    found = resolve_init(init, allow_download)
    record: dict[str, Any] = {"from": None, "restored": [], "tensors": 0, "skipped": []}
    want = task.head_state() if hasattr(task, "head_state") else {}
    if not want or found.kind in ("hub", "timm"):
        return record
    if found.kind == "run":
        tensors, name, why = _run_checkpoint(found.path.parent, task_name)
        if why:
            record["skipped"].append(why)
            return record
    else:
        why = _other_task(_run_of_checkpoint(found.path), task_name)
        if why:  # RUN/checkpoints/step-N of another task's run: its heads are not this task's
            record["skipped"].append(why)
            return record
        from sslkit.init import read_found

        tensors = read_found(found)[0]
        name = found.name
    hits = {k: v for k, v in tensors.items() if k in want and tuple(v.shape) == tuple(want[k].shape)}
    record["skipped"] += [f"{k} {tuple(tensors[k].shape)} vs {tuple(want[k].shape)}"
                          for k in want if k in tensors and k not in hits]
    if not hits:
        return record
    missing, unexpected = task.load_state_dict(hits, strict=False)
    assert not unexpected, unexpected
    record.update({"from": name, "tensors": len(hits),
                   "restored": sorted({k.split(".")[0] for k in hits}),
                   "not_restored": sorted({k.split(".")[0] for k in want if k not in hits})})
    return record


def _run_checkpoint(run: Path, task_name: str) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """The newest verified checkpoint's tensors of sslkit run ``run``, its name, or why not."""
    from safetensors.torch import load_file

    from sslkit import checkpoint

    why = _other_task(run, task_name)
    if why:
        return {}, "", why
    for path in reversed(checkpoint.list_checkpoints(run / CHECKPOINTS)):
        try:
            checkpoint.verify(path)
            return load_file(str(path / checkpoint.MODEL_FILE)), f"{run.name}/checkpoints/{path.name}", None
        except Exception:  # a damaged checkpoint: the next older one
            continue
    return {}, "", "task parts not restored: the init run has no readable checkpoint"


def _run_of_checkpoint(file: Path) -> Path | None:
    """The sslkit run whose checkpoint holds weights file ``file`` (``RUN/checkpoints/step-N/<file>``,
    run.json two folders above the step's); None for a weights file of no run."""
    run = file.parent.parent.parent
    return run if file.parent.parent.name == CHECKPOINTS and (run / RUN_JSON).is_file() else None


def _other_task(run: Path | None, task_name: str) -> str | None:
    """Why the task parts of sslkit run ``run`` are not restored into task ``task_name``: another task's."""
    if run is None:
        return None
    other = read_json(run / RUN_JSON).get("task")
    if other != task_name:
        return f"task parts not restored: the init run's task is {other!r}, not {task_name!r}"
    return None


def parts_line(parts: dict[str, Any]) -> str:
    """One line for stderr about the restored task parts."""
    if parts.get("restored"):
        rest = f"; from random: {', '.join(parts['not_restored'])}" if parts.get("not_restored") else ""
        return f"init: task parts from {parts['from']}: {', '.join(parts['restored'])} ({parts['tensors']} tensors){rest}"
    return "init: task parts from random" + (f" ({parts['skipped'][0]})" if parts.get("skipped") else "")


def plan(cfg: Any, task: nn.Module, total: int, parts: dict[str, Any]) -> dict[str, Any]:
    """The continued-pretraining settings of a run with ``--init`` (run.json's ``init.continue``):
    ``encoder_lr_scale``, ``layer_decay``, ``freeze_steps`` and where each came from."""
    fresh = _fresh_heads(task, parts)
    if cfg.init_freeze_steps is not None:
        freeze, why = cfg.init_freeze_steps, "--init-freeze-steps"
    elif fresh:
        freeze = int(round(DEFAULT_FREEZE_FRACTION * total))
        why = f"default: {DEFAULT_FREEZE_FRACTION:g} of the {total} steps (task parts from random: {', '.join(fresh)})"
    else:
        freeze, why = 0, "default: 0 (every trainable task part restored)"
    if freeze >= total:
        raise UsageError(f"--init-freeze-steps {freeze} leaves the encoder frozen for the whole run of {total} "
                         f"steps; use fewer than {total}")
    scale = cfg.init_lr_scale if cfg.init_lr_scale is not None else DEFAULT_LR_SCALE
    out = {"encoder_lr_scale": scale, "layer_decay": cfg.layer_decay, "freeze_steps": freeze,
           "freeze_steps_from": why,
           "encoder_lr_scale_from": "--init-lr-scale" if cfg.init_lr_scale is not None else "default"}
    if cfg.layer_decay is not None:
        out["depth"] = _depth(task)
    return out


def without_restored(record: dict[str, Any]) -> str:
    """The init record's summary line once its task parts are restored: the weights' keys of those
    parts (a run's checkpoint holds its projector, say) are not 'unused' (``record`` is updated)."""
    from sslkit.init import summary_line

    restored = set((record.get("task_parts") or {}).get("restored") or [])
    unused = record.get("unexpected") or []
    left = [k for k in unused if k.split(".")[0] not in restored]
    if len(left) != len(unused):
        record["unexpected"] = left
        record["summary"] = summary_line(record)
    return record["summary"]


def check_flags(cfg: Any, task: nn.Module) -> None:
    """What :func:`plan` would refuse that is known before the data is decoded: ``--layer-decay``
    without transformer blocks, ``--init-freeze-steps`` not below ``--max-steps``."""
    if cfg.layer_decay is not None:
        _depth(task)
    freeze, bound = cfg.init_freeze_steps, cfg.max_steps
    if freeze is not None and bound is not None and freeze >= bound:
        raise UsageError(f"--init-freeze-steps {freeze} leaves the encoder frozen for the whole run of at most "
                         f"{bound} steps (--max-steps); use fewer than {bound}")


def _fresh_heads(task: nn.Module, parts: dict[str, Any]) -> list[str]:
    """Top-level task modules with trainable parameters that were not restored."""
    restored = set(parts.get("restored") or [])
    names = {n.split(".")[0] for n, p in task.named_parameters() if p.requires_grad and not n.startswith(ENCODER)}
    return sorted(names - restored)


def _depth(task: nn.Module, flag: str = "--layer-decay") -> int:
    blocks = {int(m.group(1)) for n, _ in task.named_parameters() if n.startswith(ENCODER)
              for m in [_BLOCK.search(n)] if m}
    if not blocks:
        raise UsageError(f"{flag} needs a ViT backbone (transformer blocks named blocks.N)")
    return max(blocks) + 1


def layer_decay_scale(model: nn.Module, decay: float, flag: str) -> Callable[[str], float]:
    """Parameter name of ``model`` (its encoder under ``encoder.``) -> LR multiplier of layer-wise decay:
    block ``i`` of ``L`` ``decay ** (L - i)``, embeddings ``decay ** (L + 1)``, heads 1."""
    return lr_scale_fn({"encoder_lr_scale": 1.0, "layer_decay": decay, "depth": _depth(model, flag)})


def lr_scale_fn(settings: dict[str, Any]) -> Callable[[str], float]:
    """Parameter name -> LR multiplier: heads 1, encoder ``encoder_lr_scale`` (x layer decay)."""
    scale, decay, depth = settings["encoder_lr_scale"], settings.get("layer_decay"), settings.get("depth", 0)

    def fn(name: str) -> float:
        if not name.startswith(ENCODER):
            return 1.0
        if decay is None:
            return scale
        return scale * decay ** (depth + 1 - _layer_id(name[len(ENCODER):], depth))
    return fn


def _layer_id(name: str, depth: int) -> int:
    """0: embeddings and tokens; i + 1: block i; depth + 1: the final norm (BEiT/MAE numbering)."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    leaf = name.split(".")
    return 0 if any(part in _EMBED for part in leaf) else depth + 1


def freeze_fn(settings: dict[str, Any]) -> Callable[[str], int]:
    """Parameter name -> steps at LR 0: the encoder's ``freeze_steps``, heads 0."""
    n = settings["freeze_steps"]
    return lambda name: n if name.startswith(ENCODER) else 0
