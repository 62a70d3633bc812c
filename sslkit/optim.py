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
from typing import Iterable

import torch
from torch import nn

from sslkit.errors import UsageError

OPTIMIZERS = ("adamw", "sgd", "lars")
LR_SCALING = ("linear", "sqrt", "none")
REFERENCE_BATCH = 256


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases (any 0/1-d tensor), tokens and position embeddings."""
    return p.ndim <= 1 or name.endswith((".bias", "token", "pos_embed")) or "pos_embed" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and exempt ones (``weight_decay=0``, ``lars_exclude``)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if is_no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


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
    raise UsageError(f"unknown LR scaling rule {rule!r}; choose from: {', '.join(LR_SCALING)}")


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier for 0-based optimizer ``step`` of ``total``.

    Linear warm-up ``(step + 1) / warmup`` for ``step < warmup``, then cosine decay
    ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))`` from 1 towards 0.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LARS(torch.optim.Optimizer):
    """LARS (You, Gitman, Ginsburg 2017), SGD with momentum and a layer-wise trust ratio.

    For a parameter ``w`` with gradient ``g`` (groups with ``lars_exclude`` skip the
    decay and the adaptation)::

        u = g + wd * w
        u = u * eta * ||w|| / ||u||          if ||w|| > 0 and ||u|| > 0
        v = momentum * v + u
        w = w - lr * v
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
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        u = u.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    u = u * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(u).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(u)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """``adamw`` | ``sgd`` | ``lars`` over :func:`param_groups` of ``model``.

    On CUDA, AdamW and SGD use torch's fused kernels (one launch for all parameters).
    """
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = True if params and all(p.is_cuda for p in params) else None
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise UsageError(f"unknown optimizer {name!r}; choose from: {', '.join(OPTIMIZERS)}")
