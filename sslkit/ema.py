"""Momentum (EMA) teachers: frozen copies of a network that follow it slowly.

Used by BYOL, MoCo and DINO. The teacher is updated after every optimizer step (from the
task's ``on_step_end``) with::

    xi <- m * xi + (1 - m) * theta                     (parameters and float buffers)

and the momentum ``m`` follows BYOL's cosine schedule from ``base`` to ``final``::

    m(k) = final - (final - base) * (cos(pi * k / K) + 1) / 2
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` everywhere (not optimised)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Momentum at 0-based ``step`` of ``total_steps``: ``base`` at 0, ``final`` at the end."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` (params and float buffers).

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        if tb.dtype.is_floating_point:
            tb.mul_(momentum).add_(sb.detach(), alpha=1 - momentum)
        else:
            tb.copy_(sb)
