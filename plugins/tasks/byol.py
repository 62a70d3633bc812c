"""Task ``byol``: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020).

An online network (backbone ``f``, projector ``g``, predictor ``q``) predicts the
projection that a target network (``f'``, ``g'``: an exponential moving average of the
online ``f``, ``g``, never trained by gradients) gives for the other view. With
``p = q(g(f(v)))`` and ``z' = g'(f'(v'))``::

    l(p, z') = || p/||p|| - z'/||z'|| ||^2 = 2 - 2 * cos(p, z')
    L = mean_batch[ l(p_1, z'_2) + l(p_2, z'_1) ] / 2          (symmetrised)

and after every step ``xi <- tau * xi + (1 - tau) * theta`` with ``tau`` following a
cosine schedule from ``tau_base`` to 1 (:mod:`sslkit.ema`).

Defaults (paper Sec. 3.3, App. B): tau_base 0.996, projector and predictor 2-layer MLPs
4096 -> 256 with BN; views: random resized crop (0.08-1), flip, colour jitter 0.8
(0.4, 0.4, 0.2, 0.1), colour drop 0.2, blur (p 1.0 / 0.1) and solarize (p 0 / 0.2)
asymmetric between the two views (blur only for images >= 96 px). 1-channel data gets
brightness / contrast / gamma instead of colour operations.

A run of at most ``SHORT_RUN_STEPS`` planned optimizer steps starts instead with gentle crops
(0.9-1 of the area) and a slow target (tau_base 0.999) (:meth:`BYOL.planned_options`). In a few
hundred steps the paper's crops and target took a ResNet-18 below its random start on CIFAR-10
(-4.7 / -4.4 kNN points at 232 steps, -2.6 / -3.6 at ~190, -5.0 / -3.1 at ~900). Crops of 0.8-1 kept
it level or above (+1.1 / +1.7, +0.3 / +0.1, +0.2 / +2.7; BENCHMARKS.md "Recipes, a sixth search" and
"byol's and dino's defaults follow the run's length"); 0.9-1 passes it at every seed measured at 150-225
steps (+1.1 / +2.6 / +1.4 at 220-225; BENCHMARKS.md "byol's crops of 0.9-1 for short runs"). Beyond,
the paper's values: strong crops are what these methods learn most from, and a slow target is a known
cost of long runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslkit.api import (MultiView, Task, VolumeViews, byol_recipes, check_unit_interval, cosine_momentum, ema_update,
    fill_unset, frozen_copy, hookimpl, mlp, pair_volume_recipes)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)`` averaged over the batch; ``p, z: (B, d)``, ``z`` is detached here."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


#: Runs planned for at most this many optimizer steps take ``SHORT_RUN``'s values of the options left at None,
#: longer ones ``LONG_RUN``'s (the paper's). Measured from 70 to ~900 steps, batch 64 (module docstring).
SHORT_RUN_STEPS = 1000
SHORT_RUN = {"tau_base": 0.999, "min_scale": 0.9}
LONG_RUN = {"tau_base": 0.996, "min_scale": 0.08}


@dataclass
class BYOLOptions:
    tau_base: float | None = None  # target EMA momentum at step 0 (cosine to 1); None: 0.999 to 1,000 steps, else 0.996
    proj_hidden_dim: int = 4096  # hidden width of the 2-layer projector MLP (paper: 4096)
    proj_dim: int = 256  # output size of the projector and of the predictor (paper: 256)
    pred_hidden_dim: int = 4096  # hidden width of the 2-layer predictor MLP (paper: 4096)
    min_scale: float | None = None  # smallest crop area (volumes: volume) fraction; None: 0.9 to 1,000 steps, else 0.08

    def __post_init__(self) -> None:
        if self.tau_base is not None and not 0 <= self.tau_base <= 1:
            raise ValueError("tau_base must be in [0, 1]")
        if min(self.proj_hidden_dim, self.proj_dim, self.pred_hidden_dim) < 1:
            raise ValueError("head dimensions must be >= 1")
        if self.min_scale is not None:
            check_unit_interval("min_scale", self.min_scale)


class BYOL(Task):
    Options = BYOLOptions
    #: base_lr measured (benchmarks/task_table.py, BENCHMARKS.md "Every task at one small CPU budget"):
    #: CIFAR-10 kNN 19.8 % at 3e-3 vs 19.4 % at 1e-3 (SE 0.9; within noise), random init 19.7 %;
    #: against 1e-2 / 3e-2 (BENCHMARKS.md "byol's LR at 100 and 400 steps"): level at 400 steps, 3e-2
    #: behind there, and chest X-ray AUROC +0.011 / +0.028 (paired SE 0.003 / 0.008) ahead of them
    engine_defaults = {"base_lr": 3e-3}
    default_backbone = "timm:resnet18"
    sample_modes = ("slice", "slab", "volume")  # volumes: two 3D views (sslkit.augment3d)

    @classmethod
    def planned_options(cls, total_steps: int) -> dict:
        return dict(SHORT_RUN if total_steps <= SHORT_RUN_STEPS else LONG_RUN)

    def __init__(self, backbone, options: BYOLOptions, spec) -> None:
        # built outside a planned run (no horizon known): the paper's values
        options = fill_unset(options, LONG_RUN)
        super().__init__(backbone, options, spec)
        o = options
        self.projector = mlp(backbone.num_features, o.proj_hidden_dim, o.proj_dim)
        self.predictor = mlp(o.proj_dim, o.pred_hidden_dim, o.proj_dim)
        self.target_encoder = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)

    def resolved_options(self):
        return {k: getattr(self.options, k) for k in LONG_RUN}

    def views(self, spec):
        if spec.sample == "volume":
            return VolumeViews(pair_volume_recipes(spec.volume_size, self.options.min_scale), spec.mean, spec.std)
        return MultiView(byol_recipes(spec.image_size, self.options.min_scale), spec.mean, spec.std)

    def forward(self, views):
        x1, x2 = views
        x = torch.cat([x1, x2])
        p1, p2 = self.predictor(self.projector(self.encoder(x))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_encoder(x)).chunk(2)
        loss = (byol_loss(p1, z2) + byol_loss(p2, z1)) / 2
        return {"loss": loss}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        tau = cosine_momentum(step - 1, total_steps, self.options.tau_base)  # a function of the step: resumable
        ema_update(self.target_encoder, self.encoder, tau)
        ema_update(self.target_projector, self.projector, tau)


@hookimpl
def register_tasks(register):
    register("byol", BYOL)
