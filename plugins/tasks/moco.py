"""Task ``moco``: Momentum Contrast, v2 (Chen, Fan, Girshick, He 2020) and v3 (Chen, Xie, He, ICCV 2021).

``--task-opt version=2`` (default): a query encoder ``f_q`` (backbone + 2-layer MLP
projector) and a key encoder ``f_k``, the momentum (EMA) copy of ``f_q``. Negatives are
the keys of past batches, kept in a queue ``Q`` of ``K`` unit vectors. With unit ``q``,
its positive key ``k+`` (the other view, encoded by ``f_k``) and temperature ``tau``
(InfoNCE, He et al. CVPR 2020, Eq. 1)::

    L_q = -log( exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{k in Q} exp(q.k / tau)) )

After each step ``theta_k <- m theta_k + (1 - m) theta_q`` and the step's keys replace the
oldest entries of ``Q``. Defaults (paper): tau 0.2, m 0.999, projector 2048 -> 128; the
queue is 4096 keys (paper: 65536 for ImageNet; keep it below the dataset size). Batch-norm
leakage (the query and its key seeing the same batch statistics) is reduced without a
cross-GPU shuffle: the key batch is permuted and encoded in ``key_bn_splits`` sub-batches
with their own BN statistics, while the queries are encoded as one batch. A key's sub-batch
is thus a random part of its query's batch, not a disjoint one as with the paper's shuffle
across GPUs, whose per-GPU query and key batches share about ``1 / GPUs`` of their images.

``--task-opt version=3``: no queue; query encoder = backbone + 3-layer projector
(4096 -> 256, BN) + 2-layer predictor; keys from the momentum encoder of the other view,
negatives are the other keys of the (global) batch; symmetric loss scaled by ``2 tau``
(MoCo v3 Alg. 1)::

    ctr(q, k) = CE( q_n . k_n^T / tau, labels = arange(N) ) * 2 tau
    L = ctr(q_1, k_2) + ctr(q_2, k_1)

Defaults (paper, ResNet setting): tau 1.0, m from 0.99 to 1 on a cosine schedule, BYOL's
asymmetric views with crops from 0.08 of the area (v2: 0.2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sslkit.api import (MultiView, Task, ViewRecipe, all_gather_with_grad, byol_recipes,
    check_unit_interval, cosine_momentum, ema_update, frozen_copy, hookimpl, mlp, rank)


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v2 InfoNCE. ``q, k: (B, d)`` (normalised here), ``queue: (K, d)`` unit keys -> scalar."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def moco_v3_contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3 ``ctr(q, k)``: ``q, k: (B, d)``; keys gathered over processes; scaled by ``2 tau``."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = all_gather_with_grad(k.detach())
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


@dataclass
class MoCoOptions:
    version: Literal[2, 3] = 2  # 2: MoCo v2, a queue of negative keys; 3: MoCo v3, in-batch negatives and a predictor
    temperature: float | None = None  # softmax temperature of the contrastive loss, > 0; None: 0.2 (v2), 1.0 (v3)
    momentum: float | None = None  # key encoder's EMA momentum, v3: cosine ramp to 1; None: 0.999 (v2), 0.99 (v3)
    queue_size: int = 4096  # v2 only: negative keys in the queue; keep it below the dataset size (paper: 65536)
    proj_hidden_dim: int | None = None  # hidden width of the projector (and v3's predictor); None: 2048 (v2), 4096 (v3)
    proj_dim: int | None = None  # output size of the projector; None: 128 (v2), 256 (v3)
    key_bn_splits: int = 2  # v2 only: keys encoded in this many shuffled sub-batches (own BN statistics); 1: none
    min_scale: float | None = None  # smallest area fraction of the crops, in (0, 1]; None: 0.2 (v2), 0.08 (v3)

    def __post_init__(self) -> None:
        if self.version not in (2, 3):
            raise ValueError("version must be 2 or 3")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        for name in ("proj_hidden_dim", "proj_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.momentum is not None and not 0 <= self.momentum <= 1:
            raise ValueError("momentum must be in [0, 1]")
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if self.key_bn_splits < 1:
            raise ValueError("key_bn_splits must be >= 1")
        if self.min_scale is not None:
            check_unit_interval("min_scale", self.min_scale)


class MoCo(Task):
    Options = MoCoOptions
    #: LARS (MoCo v3's optimizer for ResNets) with SimCLR's small-batch LR rule, 1.2 x sqrt(batch / 256),
    #: measured (benchmarks/task_table.py, BENCHMARKS.md "The optimizer"): against AdamW at its measured
    #: base_lr 3e-3, CIFAR-10 kNN +2.6 and +3.9 points at 2 CPU min (two seeds, paired SE 0.6), X-ray
    #: AUROC +0.005 (0.003); SGD at MoCo v2's 0.03: -2.3
    engine_defaults = {"optimizer": "lars", "base_lr": 1.2, "lr_scaling": "sqrt", "weight_decay": 1e-6}
    #: a ViT-like backbone trains with AdamW, MoCo v3's optimizer for ViTs: ViT-Tiny (patch 8, 32 px), CIFAR-10 kNN
    #: at 8 CPU min (347 steps) 28.7 % vs LARS 27.1 % (+1.6, paired SE 0.6; LARS is level with a random ViT);
    #: seed 1 (328 steps) +1.5 (0.6)
    token_engine_defaults = {"optimizer": "adamw", "base_lr": 1e-3, "lr_scaling": "linear", "weight_decay": 0.05}
    default_backbone = "timm:resnet18"

    def __init__(self, backbone, options: MoCoOptions, spec) -> None:
        v2 = options.version == 2
        chosen = {"temperature": 0.2 if v2 else 1.0, "momentum": 0.999 if v2 else 0.99,
                  "proj_hidden_dim": 2048 if v2 else 4096, "proj_dim": 128 if v2 else 256,
                  "min_scale": 0.2 if v2 else 0.08}  # crops: MoCo v2's code 0.2, v3's (BYOL's) 0.08
        chosen = {k: v if getattr(options, k) is None else getattr(options, k) for k, v in chosen.items()}
        o = dataclasses.replace(options, **chosen)  # the version's values where the user gave none
        super().__init__(backbone, o, spec)
        self._chosen = chosen
        if o.version == 2:
            self.projector = mlp(backbone.num_features, o.proj_hidden_dim, o.proj_dim, batch_norm=False)
            self.predictor = None
            self.register_buffer("queue", F.normalize(torch.randn(o.queue_size, o.proj_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:
            self.projector = mlp(backbone.num_features, o.proj_hidden_dim, o.proj_dim, layers=3, last_bn=True)
            self.predictor = mlp(o.proj_dim, o.proj_hidden_dim, o.proj_dim)  # no last BN (MoCo v3 code)
        self.key_encoder = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self._keys: list[torch.Tensor] = []  # v2: the keys of this step's micro-batches, enqueued at its end
        self.min_batch = 2 if o.version == 3 else 1  # v3's negatives are the other images of the batch

    def resolved_options(self):
        return dict(self._chosen)

    def data_note(self, images: int) -> str | None:
        k = self.options.queue_size
        if self.options.version != 2 or k < images:
            return None
        return (f"its queue of {k} negative keys is not shorter than the {images} training images, so it holds "
                "keys of each query's own image (false negatives); set --task-opt queue_size below the image count")

    def views(self, spec):
        if self.options.version == 3:
            recipes = byol_recipes(spec.image_size, self.options.min_scale)
        else:  # MoCo v2: SimCLR's augmentation plus blur (from 96 px, as simclr's)
            recipe = ViewRecipe(spec.image_size, scale=(self.options.min_scale, 1.0), jitter=0.4, hue=0.1,
                                blur_p=0.5 if spec.image_size >= 96 else 0.0)
            recipes = [recipe, recipe]
        return MultiView(recipes, spec.mean, spec.std)

    def _keys_of(self, x: torch.Tensor, splits: int) -> torch.Tensor:
        """Key encoder on ``x: (B, C, H, W) -> (B, d)``, BN statistics per shuffled sub-batch."""
        if splits <= 1 or x.shape[0] < 2 * splits:
            return self.key_projector(self.key_encoder(x))
        perm = torch.randperm(x.shape[0], device=x.device)
        k = torch.cat([self.key_projector(self.key_encoder(c)) for c in x[perm].chunk(splits)])
        return k[perm.argsort()]

    def forward(self, views):
        x1, x2 = views
        o = self.options
        if o.version == 2:
            q = self.projector(self.encoder(x1))
            with torch.no_grad():
                k = F.normalize(self._keys_of(x2, o.key_bn_splits), dim=1)
            if self.training:  # every micro-batch's keys (--accumulate), as one batch K times larger would
                self._keys.append(k)
            return {"loss": moco_infonce(q, k, self.queue.clone(), o.temperature)}
        q1, q2 = self.predictor(self.projector(self.encoder(torch.cat([x1, x2])))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_projector(self.key_encoder(torch.cat([x1, x2]))).chunk(2)
        loss = moco_v3_contrastive(q1, k2, o.temperature) + moco_v3_contrastive(q2, k1, o.temperature)
        return {"loss": loss}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        o = self.options
        m = o.momentum if o.version == 2 else cosine_momentum(step - 1, total_steps, o.momentum)
        ema_update(self.key_encoder, self.encoder, m)
        ema_update(self.key_projector, self.projector, m)
        if o.version == 2 and self._keys:
            self._enqueue(all_gather_with_grad(torch.cat(self._keys)))
            self._keys = []

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``len(keys)`` entries of the queue (ring buffer)."""
        keys = keys[-self.queue.shape[0]:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.queue.shape[0]
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.queue.shape[0])


@hookimpl
def register_tasks(register):
    register("moco", MoCo)
