"""Task ``barlowtwins``: Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021).

Two views go through the backbone and a 3-layer projector; the projections ``z^A, z^B``
``(N, d)`` are standardised along the batch (BatchNorm without affine parameters) and
their cross-correlation matrix ``C = z_n^A^T z_n^B / N`` ``(d, d)`` is pushed to the
identity (paper Eq. 1)::

    L = sum_i (1 - C_ii)^2  +  lambda * sum_i sum_{j != i} C_ij^2

Defaults: lambda 5e-3 (paper 0.0051), projector 3 layers of 2048 with BN + ReLU (paper:
8192; raise ``proj_dim`` at scale), BYOL's asymmetric views. Under DDP the projections of
the whole global batch are gathered (with gradients) before standardisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslkit.api import ProjectedPairTask, all_gather_with_grad, check_unit_interval, hookimpl


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """``z1, z2: (N, d)`` -> scalar; standardisation uses the biased batch variance (as BN)."""
    z1, z2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    n = z1.shape[0]
    z1 = F.batch_norm(z1, None, None, training=True)
    z2 = F.batch_norm(z2, None, None, training=True)
    c = z1.T @ z2 / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


@dataclass
class BarlowTwinsOptions:
    lambd: float = 5e-3  # weight of the off-diagonal (redundancy) term against the diagonal one, >= 0 (paper: 0.0051)
    proj_dim: int = 2048  # width of every layer of the 3-layer projector (paper: 8192; raise it at scale)
    min_scale: float = 0.08  # smallest area fraction of the random resized crops, in (0, 1]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lambd) and self.lambd >= 0):
            raise ValueError(f"lambd must be a finite number >= 0, got {self.lambd}")
        if self.proj_dim < 1:
            raise ValueError("proj_dim must be >= 1")
        check_unit_interval("min_scale", self.min_scale)


class BarlowTwins(ProjectedPairTask):
    Options = BarlowTwinsOptions
    #: the paper's LARS (base_lr 0.2 per 256 images), measured (benchmarks/task_table.py, BENCHMARKS.md
    #: "The optimizer"): against AdamW at its measured base_lr 3e-3, CIFAR-10 kNN +10.9 and +11.2 points at
    #: 2 CPU min (two seeds, paired SE 0.8), X-ray AUROC +0.046 (0.009); base_lr 0.4: -1.0
    engine_defaults = {"optimizer": "lars", "base_lr": 0.2, "weight_decay": 1.5e-6}
    #: a ViT-like backbone trains with AdamW: ViT-Tiny (patch 8, 32 px), CIFAR-10 kNN at 8 CPU min (200 steps)
    #: 30.1 % vs LARS 24.7 % (+5.4, paired SE 0.8; LARS falls below a random ViT's 27.5 %); seed 1 (185 steps)
    #: +9.8 (0.8)
    token_engine_defaults = {"optimizer": "adamw", "base_lr": 1e-3, "lr_scaling": "linear", "weight_decay": 0.05}

    min_batch = 2  # standardised along the batch

    def pair_loss(self, z1, z2):
        return {"loss": barlow_twins_loss(z1, z2, self.options.lambd)}


@hookimpl
def register_tasks(register):
    register("barlowtwins", BarlowTwins)
