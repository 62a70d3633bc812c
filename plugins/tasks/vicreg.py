"""Task ``vicreg``: Variance-Invariance-Covariance Regularization (Bardes, Ponce, LeCun, ICLR 2022).

Two views, backbone + 3-layer expander, embeddings ``Z, Z' : (N, d)``. With
``v(Z) = 1/d sum_j max(0, 1 - sqrt(Var(Z_j) + eps))`` (unbiased variance),
``c(Z) = 1/d sum_{i != j} Cov(Z)_ij^2`` and ``s(Z, Z') = 1/(N d) ||Z - Z'||_F^2``
(paper Eq. 1-6)::

    L = lambda * s(Z, Z') + mu * (v(Z) + v(Z')) / 2 + nu * (c(Z) + c(Z'))

Defaults (paper): lambda = mu = 25, nu = 1, eps = 1e-4; expander 3 layers of 2048 with
BN + ReLU (paper: 8192); BYOL's asymmetric views. The variance/covariance terms use the
whole global batch under DDP. (The ``mu`` term averages the two views, as the authors'
code and lightly do.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslkit.api import (ProjectedPairTask, VolumeViews, all_gather_with_grad, check_unit_interval, hookimpl,
                        pair_volume_recipes)


def _variance(z: torch.Tensor, eps: float) -> torch.Tensor:
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    n, d = z.shape
    z = z - z.mean(0)
    cov = z.T @ z / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 25.0, mu: float = 25.0, nu: float = 1.0,
                eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """``z1, z2: (N, d)`` -> ``{"loss", "invariance", "variance", "covariance"}`` (scalars)."""
    inv = F.mse_loss(z1, z2)
    z1, z2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    var = (_variance(z1, eps) + _variance(z2, eps)) / 2
    cov = _covariance(z1) + _covariance(z2)
    return {"loss": lambd * inv + mu * var + nu * cov, "invariance": inv.detach(), "variance": var.detach(),
            "covariance": cov.detach()}


@dataclass
class VICRegOptions:
    lambd: float = 25.0  # weight of the invariance term (MSE between the two views' embeddings), >= 0 (paper: 25)
    mu: float = 25.0  # weight of the variance term (pushes each dimension's std to at least 1), >= 0 (paper: 25)
    nu: float = 1.0  # weight of the covariance term (decorrelates dimensions), >= 0 (paper: 1)
    proj_dim: int = 2048  # width of every layer of the 3-layer expander (paper: 8192)
    min_scale: float = 0.08  # smallest area fraction of the random resized crops (volumes: volume fraction), in (0, 1]

    def __post_init__(self) -> None:
        if not all(math.isfinite(w) and w >= 0 for w in (self.lambd, self.mu, self.nu)):
            raise ValueError(f"lambd, mu and nu must be finite numbers >= 0, got {self.lambd}, {self.mu}, {self.nu}")
        if self.proj_dim < 1:
            raise ValueError("proj_dim must be >= 1")
        check_unit_interval("min_scale", self.min_scale)


class VICReg(ProjectedPairTask):
    Options = VICRegOptions
    #: LARS (the paper's optimizer) with SimCLR's small-batch LR rule, 1.2 x sqrt(batch / 256), measured
    #: (benchmarks/task_table.py, BENCHMARKS.md "The optimizer"): against AdamW at its measured base_lr
    #: 3e-3, CIFAR-10 kNN +11.7 points at 2 CPU min (paired SE 0.8), X-ray AUROC +0.042 (0.008); LARS at
    #: the paper's linear 0.2 per 256 images: +1.4 (0.6)
    engine_defaults = {"optimizer": "lars", "base_lr": 1.2, "lr_scaling": "sqrt", "weight_decay": 1e-6}
    #: a ViT-like backbone trains with AdamW, as the other three: ViT-Tiny (patch 8, 32 px), CIFAR-10 kNN at 8 CPU
    #: min, seed 0 (159 steps): 33.0 % vs LARS 33.3 % (-0.3, paired SE 0.7); seed 1 (316 steps): 35.9 vs
    #: 35.7 % (+0.2 (0.7)): level at both seeds
    token_engine_defaults = {"optimizer": "adamw", "base_lr": 1e-3, "lr_scaling": "linear", "weight_decay": 0.05}
    sample_modes = ("slice", "slab", "volume")  # volumes: two 3D views (sslkit.augment3d)
    min_batch = 2  # the variance and covariance are taken over the batch (one image: NaN)

    def views(self, spec):
        if spec.sample == "volume":
            return VolumeViews(pair_volume_recipes(spec.volume_size, self.options.min_scale), spec.mean, spec.std)
        return super().views(spec)

    def pair_loss(self, z1, z2):
        o = self.options
        return vicreg_loss(z1, z2, o.lambd, o.mu, o.nu)


@hookimpl
def register_tasks(register):
    register("vicreg", VICReg)
