"""Shared shape of the redundancy-reduction tasks (Barlow Twins, VICReg).

Two BYOL-style views go through the backbone and a 3-layer projector to ``(N, d)``
embeddings ``z1, z2``; the subclass turns the pair into its loss. Not a task itself.
"""

from __future__ import annotations

import torch

from sslkit.views import MultiView, byol_recipes
from sslkit.heads import mlp
from sslkit.task import Task


class ProjectedPairTask(Task):
    """``views (x1, x2) -> projector(encoder(x)) -> pair_loss(z1, z2)``; options need
    ``proj_dim`` and ``min_scale``."""

    default_backbone = "timm:resnet18"

    def __init__(self, backbone, options, spec) -> None:
        super().__init__(backbone, options, spec)
        self.projector = mlp(backbone.num_features, options.proj_dim, options.proj_dim, layers=3)

    def views(self, spec):
        return MultiView(byol_recipes(spec.image_size, self.options.min_scale), spec.mean, spec.std)

    def forward(self, views):
        x1, x2 = views
        z1, z2 = self.projector(self.encoder(torch.cat([x1, x2]))).chunk(2)
        return self.pair_loss(z1, z2)

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
