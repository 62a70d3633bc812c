"""Optimizers (AdamW, SGD, LARS), parameter groups, the LR scaling rule and schedule.

* Weight decay applies to weight matrices and convolution kernels only; norms, biases,
  class / mask / register tokens and position embeddings are exempt (and, for LARS,
  exempt from the trust-ratio adaptation too, as in SimCLR and BYOL).
* The learning rate is ``base_lr`` scaled by the effective batch (images per optimizer
  step: ``batch_size x accumulate``), see :func:`scaled_lr`, unless given outright.
* The schedule is linear warm-up then cosine decay, by optimizer step
  (:func:`warmup_cosine`); the LR of every group is set from it before each step, so the
  schedule's whole state is the step count.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from sslkit.errors import UsageError, unknown_name_message

OPTIMIZERS = ("adamw", "sgd", "lars")
LR_SCALING = ("linear", "sqrt", "none")
REFERENCE_BATCH = 256


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases (any 0/1-d tensor), tokens and position embeddings."""
    return p.ndim <= 1 or name.endswith((".bias", "token", "pos_embed")) or "pos_embed" in name


def param_groups(model: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None,
                 freeze_steps: Callable[[str], int] | None = None) -> list[dict]:
    """Decayed weights and exempt ones (``weight_decay=0``, ``lars_exclude``).

    Without ``lr_scale``/``freeze_steps``: exactly those two groups. With them, each
    group is split further by the parameter's LR multiplier ``lr_scale(name)`` (kept as
    the group's ``lr_scale``) and its ``freeze_steps(name)`` (the first optimizer steps at
    LR 0; kept as ``freeze_steps``), e.g. a lower LR and a warm-up freeze for the
    encoder of a run continued from ``--init`` (:func:`sslkit.init.continued`).
    """
    split = lr_scale is not None or freeze_steps is not None
    groups: dict[tuple, dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        exempt = is_no_decay(name, p)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        freeze = int(freeze_steps(name)) if freeze_steps is not None else 0
        key = (exempt, scale, freeze) if split else (exempt,)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if exempt else weight_decay, "lars_exclude": exempt}
            if split:
                groups[key].update(lr_scale=scale, freeze_steps=freeze)
        groups[key]["params"].append(p)
    if not split:
        return [groups.get((False,), {"params": [], "weight_decay": weight_decay, "lars_exclude": False}),
                groups.get((True,), {"params": [], "weight_decay": 0.0, "lars_exclude": True})]
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], -k[1], k[2]))]


def group_lr(group: dict, lr: float, step: int) -> float:
    """The LR of one parameter group at 0-based optimizer ``step`` when the schedule says
    ``lr``: ``lr * lr_scale``, or 0 while ``step`` is below the group's ``freeze_steps``."""
    if step < group.get("freeze_steps", 0):
        return 0.0
    return lr * group.get("lr_scale", 1.0)


def scaled_lr(base_lr: float, effective_batch: int, rule: str) -> float:
    """LR for ``effective_batch`` images per step from ``base_lr`` set for 256 images.

    ``linear``: ``base_lr * B / 256`` (Goyal et al. 2017; SimCLR, MoCo, MAE, DINO);
    ``sqrt``: ``base_lr * sqrt(B / 256)`` (large-batch LARS/LAMB, SimCLR App. B.1);
    ``none``: ``base_lr``.
    """
    if rule == "linear":
        return base_lr * effective_batch / REFERENCE_BATCH
    if rule == "sqrt":
        return base_lr * math.sqrt(effective_batch / REFERENCE_BATCH)
    if rule == "none":
        return base_lr
    raise UsageError(unknown_name_message("LR scaling rule", rule, LR_SCALING))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier for 0-based optimizer ``step`` of ``total``.

    Linear warm-up ``(step + 1) / warmup`` for ``step < warmup``, then cosine decay
    ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))`` from 1 towards 0.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int) -> None:
    """Every group's LR at 0-based optimizer ``step`` for the schedule's ``lr`` (:func:`group_lr`;
    the engine's step, restored on resume, so a freeze ends at the same step either way)."""
    for group in optimizer.param_groups:
        group["lr"] = group_lr(group, lr, step)


def uses_group_lr(optimizer: torch.optim.Optimizer) -> bool:
    """True when the groups' LRs differ from the schedule's (a multiplier or a freeze)."""
    return any(g.get("lr_scale", 1.0) != 1.0 or g.get("freeze_steps", 0) > 0 for g in optimizer.param_groups)


class LARS(torch.optim.Optimizer):
    """LARS (You, Gitman, Ginsburg 2017), SGD with momentum and a layer-wise trust ratio.

    For a parameter ``w`` with gradient ``g`` (groups with ``lars_exclude`` skip the
    decay and the adaptation)::

        u = g + wd * w
        u = u * eta * ||w|| / ||u||          if ||w|| > 0 and ||u|| > 0
        v = momentum * v + u                 (v = u at a parameter's first step)
        w = w - lr * v

    A group's tensors are updated together (``torch._foreach_*``: a few kernels per group,
    not a few per tensor), and the LR may be a 0-d device tensor, so the step records
    into a CUDA graph (:mod:`sslkit.engine.capture`) once the momentum buffers exist.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                u, trust = self._adapted(group, params)
                self._update(group, params, u, trust)
        return loss

    @staticmethod
    def _adapted(group: dict, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Each parameter's ``u`` before the trust ratio (its gradient, decayed), and the trust
        ratios as 0-d tensors (None for an excluded group). The gradients are never changed."""
        grads = [p.grad for p in params]
        if group["lars_exclude"]:
            return grads, None
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(grads))
        trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, torch.ones_like(w_norm))
        return grads, list(trust.unbind())

    def _update(self, group: dict, params: list[torch.Tensor], u: list[torch.Tensor],
                trust: list[torch.Tensor] | None) -> None:
        """``v = momentum * v + trust * u`` and ``w -= lr * v``, in place: on the CPU every new
        parameter-sized tensor costs as much as the arithmetic (a ResNet-18 step 9.3x fused SGD's before,
        2.5-3.4x now: benchmarks/optimizer_step.py --lars)."""
        bufs, kept, kept_u, kept_t = [], [], [], []
        for i, (p, up) in enumerate(zip(params, u)):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = up * trust[i] if trust is not None else torch.clone(up).detach()
            else:
                kept.append(state["momentum_buffer"])
                kept_u.append(up)
                if trust is not None:
                    kept_t.append(trust[i])
            bufs.append(state["momentum_buffer"])
        if kept:
            torch._foreach_mul_(kept, group["momentum"])
            if trust is not None:
                torch._foreach_addcmul_(kept, kept_u, kept_t)
            else:
                torch._foreach_add_(kept, kept_u)
        torch._foreach_addcmul_(params, bufs, [self._lr_tensor(group["lr"], params[0])] * len(bufs), value=-1)

    def _lr_tensor(self, lr: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``lr`` as a 0-d tensor on ``like``'s device: the scheduled device tensor as it is, a float
        filled into one kept buffer (``fill_`` launches a kernel; a new ``torch.tensor`` on CUDA
        would copy from the host and wait for the stream every step)."""
        if torch.is_tensor(lr):
            return lr
        key = (like.device, like.dtype)
        buffers = self.__dict__.setdefault("_lr_buffers", {})
        if key not in buffers:
            buffers[key] = torch.zeros((), dtype=like.dtype, device=like.device)
        return buffers[key].fill_(lr)


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), lr_scale: Callable[[str], float] | None = None,
                    freeze_steps: Callable[[str], int] | None = None) -> torch.optim.Optimizer:
    """``adamw`` | ``sgd`` | ``lars`` over :func:`param_groups` of ``model``.

    On CUDA and on the CPU, AdamW and SGD use torch's fused kernels (CUDA: one launch for all
    parameters; CPU: one vectorised pass per tensor, e.g. a ResNet-18 AdamW step in 7.5 ms
    instead of the per-tensor loop's 38.9 ms on 2 cores: benchmarks/optimizer_step.py).
    With per-parameter ``lr_scale``/``freeze_steps`` the groups carry them (:func:`set_lr`
    reads them).
    """
    groups = param_groups(model, weight_decay, lr_scale, freeze_steps)
    for g in groups:
        g["lr"] = group_lr(g, lr, 0)
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    fused = True if len(devices) == 1 and devices <= {"cuda", "cpu"} else None
    if name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)
    elif name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    elif name == "lars":
        opt = LARS(groups, lr=lr, momentum=momentum)
    else:
        raise UsageError(unknown_name_message("optimizer", name, OPTIMIZERS))
    return opt
