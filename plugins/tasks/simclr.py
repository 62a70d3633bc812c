"""Task ``simclr``: SimCLR (Chen, Kornblith, Norouzi, Hinton, ICML 2020).

Two augmented views of every image go through the backbone ``f`` and a projection MLP
``g``; the NT-Xent loss pulls the two views of an image together and pushes the other
``2N - 2`` views of the batch away. With ``z_i = g(f(x_i)) / ||g(f(x_i))||`` and
``s_ij = z_i . z_j``, for a positive pair ``(i, j)``::

    l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) )
    L = 1 / 2N * sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]

Defaults: tau = 0.5, projection 2048 -> 128 (2 layers, BN), views = random resized crop
(0.08-1), flip, colour jitter 0.8 (strength 0.5: brightness, contrast, saturation 0.4, hue 0.1), colour drop 0.2, blur 0.5 (images >= 96 px);
1-channel data gets brightness / contrast / gamma instead of colour operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslkit.api import (MultiView, Task, ViewRecipe, VolumeViews, all_gather_with_grad, check_unit_interval,
    hookimpl, mlp, pair_volume_recipes, rank)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over ``2N`` views. ``z1, z2: (N, d)`` projections (normalised here) -> scalar.

    Under DDP the negatives are the views of the whole global batch (gathered with
    gradients); each process scores its own ``2N`` queries, so the mean over processes is
    the single-process loss of the global batch.
    """
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    keys = torch.cat([all_gather_with_grad(z1), all_gather_with_grad(z2)])  # (2 W N, d)
    total = keys.shape[0] // 2
    queries = torch.cat([z1, z2])
    logits = queries @ keys.T / temperature
    own = torch.arange(n, device=z1.device) + rank() * n
    self_idx = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    # a mask, not an index_put: elementwise, so it records in a CUDA graph under --deterministic too
    is_self = torch.arange(keys.shape[0], device=z1.device) == self_idx[:, None]
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), positive)


@dataclass
class SimCLROptions:
    temperature: float = 0.5  # softmax temperature of the NT-Xent loss, > 0
    proj_hidden_dim: int = 2048  # hidden width of the 2-layer projection MLP
    proj_dim: int = 128  # output size of the projection MLP (the space the loss compares)
    min_scale: float = 0.08  # smallest area fraction of the random resized crops (volumes: volume fraction), in (0, 1]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if min(self.proj_hidden_dim, self.proj_dim) < 1:
            raise ValueError(f"proj_hidden_dim and proj_dim must be >= 1, "
                             f"got {self.proj_hidden_dim} and {self.proj_dim}")
        check_unit_interval("min_scale", self.min_scale)


class SimCLR(Task):
    Options = SimCLROptions
    #: the paper's LARS with its small-batch rule, LR 0.075 x sqrt(batch) = 1.2 x sqrt(batch / 256), measured
    #: (benchmarks/task_table.py, BENCHMARKS.md "The optimizer"): against AdamW at its measured base_lr 3e-3,
    #: CIFAR-10 kNN +6.9 and +7.4 points at 2 CPU min (two seeds, paired SE 0.7), X-ray AUROC +0.027 (0.004)
    engine_defaults = {"optimizer": "lars", "base_lr": 1.2, "lr_scaling": "sqrt", "weight_decay": 1e-6}
    #: a ViT-like backbone trains with AdamW, as MoCo v3 and DINO train ViTs: ViT-Tiny (patch 8, 32 px), CIFAR-10
    #: kNN at 8 CPU min (215 steps) AdamW 1e-3 31.8 % vs LARS 29.4 %, +2.4 (paired SE 0.7); seed 1 (197 steps)
    #: +0.8 (0.6); level at 53 steps
    token_engine_defaults = {"optimizer": "adamw", "base_lr": 1e-3, "lr_scaling": "linear", "weight_decay": 0.05}
    default_backbone = "timm:resnet18"
    sample_modes = ("slice", "slab", "volume")  # volumes: two 3D views (sslkit.augment3d)
    min_batch = 2  # the negatives are the other images of the batch: with one, a constant loss of 0
    capturable = True  # --capture graphs: the step has no host reads or Python-side state (engine/capture.py)

    def __init__(self, backbone, options: SimCLROptions, spec) -> None:
        super().__init__(backbone, options, spec)
        self.projector = mlp(backbone.num_features, options.proj_hidden_dim, options.proj_dim)

    def views(self, spec):
        if spec.sample == "volume":
            return VolumeViews(pair_volume_recipes(spec.volume_size, self.options.min_scale), spec.mean, spec.std)
        recipe = ViewRecipe(spec.image_size, scale=(self.options.min_scale, 1.0), jitter=0.4, hue=0.1,
                            blur_p=0.5 if spec.image_size >= 96 else 0.0)
        return MultiView([recipe, recipe], spec.mean, spec.std)

    def forward(self, views):
        x1, x2 = views
        z = self.projector(self.encoder(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent_loss(z1, z2, self.options.temperature)}


@hookimpl
def register_tasks(register):
    register("simclr", SimCLR)
