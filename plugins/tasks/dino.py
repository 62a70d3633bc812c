"""Task ``dino``: self-distillation with no labels (Caron et al., ICCV 2021).

A student (backbone + DINO head, :class:`sslkit.heads.DINOHead`) and a teacher (the EMA
of the student) see multi-crop views: 2 global crops (all of the image size, scale
``global_scale_min``-1) and ``local_crops`` small crops (scale 0.05-0.4, side ``image_size * 96/224``;
by default 8 from 96 px and none below, see ``default_local_crops``).
The teacher sees only the global crops. With ``P_t = softmax((g_t(x) - c) / tau_t)``
(centred, sharpened teacher) and ``P_s = softmax(g_s(x') / tau_s)`` (paper Eq. 1-3)::

    L = 1 / |pairs| * sum_{x in globals} sum_{x' in all views, x' != x} -P_t(x) . log P_s(x')

After every step: teacher ``theta_t <- m theta_t + (1 - m) theta_s`` (``m`` cosine from
``momentum`` to 1) and centre ``c <- 0.9 c + 0.1 * mean_batch g_t(x)`` (over the global batch).
The teacher temperature warms up linearly from ``warmup_teacher_temp`` to
``teacher_temp`` over the first ``teacher_temp_warmup`` fraction of training.

Defaults (paper): tau_s 0.1, tau_t 0.04 -> 0.07 (warm-up 30% of training), centre momentum
0.9, head 2048 hidden, 256 bottleneck, ``out_dim`` 4096 (paper: 65536); measured instead:
no local crops below 96 px and ``base_lr`` 3e-3 (BENCHMARKS.md, "DINO without local crops
below 96 px").
A run of at most ``SHORT_RUN_STEPS`` planned optimizer steps starts with gentle global crops
(0.8-1 of the area) and a slow teacher (momentum 0.999), as ``byol`` does (:meth:`DINO.planned_options`);
longer runs take the paper's momentum 0.996 and the measured 0.4-1 crops (BENCHMARKS.md "byol's and
dino's defaults follow the run's length").
The centre, the current teacher temperature and the teacher live in the task's state
dict (checkpointed). A backbone built for one input size (a timm ViT) cannot take local
crops: from 96 px, where they are on by default, use ``--task-opt local_crops=0`` or a CNN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslkit.api import (DINOHead, MultiView, Task, UsageError, ViewRecipe, all_reduce_sum,
    cosine_momentum, ema_update, fill_unset, frozen_copy, hookimpl)


def dino_loss(teacher_out: torch.Tensor, student_out: list[torch.Tensor], center: torch.Tensor,
              teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
    """Cross-entropy between centred/sharpened teacher and student distributions.

    ``teacher_out: (T, B, K)`` logits of the global views; ``student_out``: ``S`` tensors
    ``(B, K)`` with the same global views first; ``center: (1, K)``. Pairs where a view
    meets itself (``t == s``) are skipped.
    """
    t = F.softmax((teacher_out.detach() - center) / teacher_temp, dim=-1)
    s = F.log_softmax(torch.stack(student_out) / student_temp, dim=-1)
    cross = -torch.einsum("tbk,sbk->ts", t, s)  # summed over the batch
    n_t, n_s = cross.shape
    same = torch.eye(n_t, n_s, dtype=torch.bool, device=cross.device)
    return cross.masked_fill(same, 0).sum() / ((n_t * n_s - min(n_t, n_s)) * t.shape[1])


#: Runs planned for at most this many optimizer steps take ``SHORT_RUN``'s values of the options left at None
#: (gentle global crops, a slow teacher), longer ones ``LONG_RUN``'s (module docstring).
SHORT_RUN_STEPS = 1000
SHORT_RUN = {"momentum": 0.999, "global_scale_min": 0.8}
LONG_RUN = {"momentum": 0.996, "global_scale_min": 0.4}


@dataclass
class DINOOptions:
    out_dim: int = 4096  # number of prototypes: output size of the DINO head (paper: 65536)
    hidden_dim: int = 2048  # hidden width of the head's 3-layer MLP
    bottleneck_dim: int = 256  # size of the head's l2-normalised code before its last layer
    local_crops: int | None = None  # small crops per image, seen by the student only; None: 8 from 96 px, 0 below
    local_size: int | None = None  # side in px of the local crops, >= 8; None: image_size * 96/224, even (96 px at 224)
    # DINO's code suggests 0.14 without local crops; measured there (32 px, 2 CPU-min, CIFAR-10 kNN gain over a live
    # random ResNet-18, two seeds, SE 0.8): 0.14 -0.6 / +1.9, 0.08 -0.8 / +1.4, 0.4 -0.1 / +2.2 (BENCHMARKS.md
    # "Recipes again, thirty-eighth session"): 0.4 kept
    global_scale_min: float | None = None  # smallest area of the 2 global crops; None: 0.8 to 1,000 steps, else 0.4
    local_scale_max: float = 0.4  # largest area fraction of the local crops (scale 0.05 to this), <= global_scale_min
    student_temp: float = 0.1  # softmax temperature of the student's outputs, > 0 (paper: 0.1)
    teacher_temp: float = 0.07  # teacher's softmax temperature after the warm-up, > 0 (paper: 0.07)
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0, raised linearly to teacher_temp (paper: 0.04)
    teacher_temp_warmup: float = 0.3  # fraction of the run the teacher temperature warms up over, in [0, 1]; 0: none
    center_momentum: float = 0.9  # EMA momentum of the centre taken off the teacher's outputs, in [0, 1) (paper: 0.9)
    momentum: float | None = None  # teacher EMA momentum at step 0 (cosine to 1); None 0.999 to 1,000 steps, else 0.996

    def __post_init__(self) -> None:
        if min(self.out_dim, self.hidden_dim, self.bottleneck_dim) < 1:
            raise ValueError("out_dim, hidden_dim and bottleneck_dim must be >= 1")
        if self.local_crops is not None and self.local_crops < 0:
            raise ValueError("local_crops must be >= 0")
        if self.local_size is not None and self.local_size < 8:
            raise ValueError("local_size must be >= 8 pixels")
        if not (0 < self.local_scale_max <= 1 and (self.global_scale_min is None or 0 < self.global_scale_min <= 1)):
            raise ValueError("local_scale_max and global_scale_min are area fractions in (0, 1]")
        temps = (self.student_temp, self.teacher_temp, self.warmup_teacher_temp)
        if not all(math.isfinite(t) and t > 0 for t in temps):
            raise ValueError("student_temp, teacher_temp and warmup_teacher_temp must be finite numbers > 0, "
                             f"got {', '.join(map(str, temps))}")
        if not 0 <= self.teacher_temp_warmup <= 1:
            raise ValueError("teacher_temp_warmup is a fraction of the run, in [0, 1]")
        if not 0 <= self.center_momentum < 1 or (self.momentum is not None and not 0 <= self.momentum <= 1):
            raise ValueError("center_momentum must be in [0, 1) and momentum in [0, 1]")


LOCAL_CROPS_FROM_PX = 96


def default_local_crops(image_size: int) -> int:
    """The paper's 8 local crops from ``LOCAL_CROPS_FROM_PX`` (42-px crops; the paper's are 96 px
    of 224, where multi-crop wins at equal training time in its ablation), none below.

    Measured below: at 32 px (14-px crops) a run without them takes 2-3x the steps in the same
    CPU time and scores +0.7 and +1.5 (paired SE 0.5) CIFAR-10 kNN points more over two seeds;
    at 64 px (28-px crops) chest X-ray AUROC is +0.003 (0.002).
    """
    return 8 if image_size >= LOCAL_CROPS_FROM_PX else 0


class DINO(Task):
    Options = DINOOptions
    #: base_lr measured without local crops (benchmarks/task_table.py, 2 CPU min, BENCHMARKS.md "DINO
    #: without local crops below 96 px"): CIFAR-10 kNN 3e-3 vs 1e-3 +0.4 and +0.7 (paired SE 0.6) over
    #: two seeds, chest X-ray AUROC 0.924 -> 0.928 (+0.004, not paired; with local_crops=0 together, +0.008
    #: (0.003) per fold over the former default, 8 local crops at 1e-3). With 8 local crops it had been the other
    #: way (X-rays -0.007 (0.002)).
    engine_defaults = {"base_lr": 3e-3}
    default_backbone = "timm:resnet18"

    @classmethod
    def planned_options(cls, total_steps: int) -> dict:
        return dict(SHORT_RUN if total_steps <= SHORT_RUN_STEPS else LONG_RUN)

    def __init__(self, backbone, options: DINOOptions, spec) -> None:
        options = fill_unset(options, LONG_RUN)  # built outside a planned run (no horizon known): the paper's
        super().__init__(backbone, options, spec)
        o = options
        self.local_size = o.local_size or max(8, int(round(spec.image_size * 96 / 224 / 2)) * 2)
        self.local_crops = default_local_crops(spec.image_size) if o.local_crops is None else o.local_crops
        if self.local_crops and self.local_size >= spec.image_size:
            given = f"--task-opt local_size={o.local_size}" if o.local_size else f"the default local_size {self.local_size}"
            raise UsageError(f"dino's local crops must be smaller than the global ones: {given} is not below "
                             f"--image-size {spec.image_size}")
        if self.local_crops:  # without local crops their largest scale does not matter
            _check_size(backbone, spec.channels, self.local_size)
            if o.local_scale_max > o.global_scale_min:
                raise UsageError(f"dino's local crops must be smaller than the global ones: local_scale_max "
                                 f"{o.local_scale_max:g} is above global_scale_min {o.global_scale_min:g}")
        self.head = DINOHead(backbone.num_features, o.out_dim, o.hidden_dim, o.bottleneck_dim)
        self.teacher_encoder = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, o.out_dim))
        self.register_buffer("teacher_temp", torch.tensor(o.warmup_teacher_temp if o.teacher_temp_warmup > 0
                                                          else o.teacher_temp))
        # the step's teacher outputs so far (every micro-batch of --accumulate), summed, and their number
        self._center_sum: torch.Tensor | None = None
        self._center_count = 0

    def resolved_options(self):
        return {"local_crops": self.local_crops, "local_size": self.local_size,
                **{k: getattr(self.options, k) for k in LONG_RUN}}

    def head_state(self):
        """``--init RUN_DIR``: the earlier run's heads, not the teacher temperature, a schedule this run starts over."""
        return {k: v for k, v in super().head_state().items() if k != "teacher_temp"}

    def views(self, spec):
        o, s = self.options, spec.image_size
        blur = s >= 96
        common = dict(jitter_p=0.8, jitter=0.4, saturation=0.2, hue=0.1, gray_p=0.2)
        recipes = [ViewRecipe(s, scale=(o.global_scale_min, 1.0), blur_p=1.0 if blur else 0.0, **common),
                   ViewRecipe(s, scale=(o.global_scale_min, 1.0), blur_p=0.1 if blur else 0.0, solarize_p=0.2,
                              **common)]
        local = ViewRecipe(self.local_size, scale=(0.05, o.local_scale_max), blur_p=0.5 if blur else 0.0, **common)
        return DINOViews(recipes + [local] * self.local_crops, spec.mean, spec.std)

    def forward(self, views):
        o = self.options
        n_global = 2
        student = [self.head(self.encoder(torch.cat(views[:n_global])))]
        if len(views) > n_global:
            student.append(self.head(self.encoder(torch.cat(views[n_global:]))))
        student = list(torch.cat(student).chunk(len(views)))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(torch.cat(views[:n_global])))
            teacher = teacher.view(n_global, -1, teacher.shape[-1])
        loss = dino_loss(teacher, student, self.center, float(self.teacher_temp), o.student_temp)
        if self.training:
            part = teacher.float().sum(dim=(0, 1)).unsqueeze(0)
            self._center_sum = part if self._center_sum is None else self._center_sum + part
            self._center_count += teacher.shape[0] * teacher.shape[1]
        with torch.no_grad():  # loss = H(P_t) + KL(P_t || P_s), averaged over the view pairs
            log_t = F.log_softmax((teacher - self.center) / self.teacher_temp, -1)
            entropy = -(log_t.exp() * log_t).sum(-1).mean()
        return {"loss": loss, "teacher_entropy": entropy, "kl": loss.detach() - entropy,
                "teacher_temp": self.teacher_temp.clone()}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        o = self.options
        m = cosine_momentum(step - 1, total_steps, o.momentum)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
        if self._center_sum is not None:  # the mean over the step's global batch, all micro-batches
            count = self._center_sum.new_full((1, 1), float(self._center_count))
            total = all_reduce_sum(torch.cat([self._center_sum, count], dim=1))
            batch_center = total[:, :-1] / total[:, -1:]
            self.center.mul_(o.center_momentum).add_(batch_center, alpha=1 - o.center_momentum)
            self._center_sum, self._center_count = None, 0
        warm = o.teacher_temp_warmup * total_steps
        frac = min(1.0, step / warm) if warm > 0 else 1.0
        self.teacher_temp.fill_(o.warmup_teacher_temp + frac * (o.teacher_temp - o.warmup_teacher_temp))


def _check_size(backbone, channels: int, size: int) -> None:
    """Refuse (one line) a backbone that cannot embed ``size``-pixel local crops."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(2, channels, size, size))
    except Exception:  # noqa: BLE001 - any failure means: this backbone takes one input size
        raise UsageError(
            f"dino's {size}-pixel local crops do not fit {getattr(backbone, 'name', 'this backbone')} (built for "
            f"one input size); use --task-opt local_crops=0 or a CNN backbone such as timm:resnet18"
        ) from None
    finally:
        backbone.train(was_training)


class DINOViews(MultiView):
    """DINO's global and local crops; ``--augment-opt scale`` is refused, since one crop scale for
    both kinds would undo the global/local split (the task's ``global_scale_min`` and
    ``local_scale_max`` set them)."""

    def override(self, **overrides):
        if "scale" in overrides:
            raise UsageError("dino: --augment-opt scale would give the global and local crops one scale; use "
                             "--task-opt global_scale_min=... and local_scale_max=...")
        out = super().override(**overrides)
        views = DINOViews(out.recipes, [0.0], [1.0])
        views.normalize = out.normalize
        return views


@hookimpl
def register_tasks(register):
    register("dino", DINO)
