"""Task ``rotation``: predict image rotations (Gidaris, Singh, Komodakis, ICLR 2018).

Every image of the batch is rotated by 0, 90, 180 and 270 degrees (``all_rotations``,
the paper's setting: all four copies in the same batch) or by one random multiple of 90
degrees; the backbone and a classifier ``h`` predict which. With ``y`` the rotation
index (``k`` quarter turns counter-clockwise)::

    L = 1 / (4B) * sum_i sum_{k=0..3} CE( h(f(rot_k(x_i))), k )

Defaults: all four rotations, a 2-layer MLP classifier (hidden 512, BN), views = random
resized crop (scale 0.3-1) + horizontal flip (the paper uses crops and flips only; no
colour augmentation). Images are square, so every rotation keeps the shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslkit.api import MultiView, Task, UsageError, ViewRecipe, check_unit_interval, hookimpl, mlp, rotate90


def rotate_batch(x: torch.Tensor, all_rotations: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: (B, C, S, S)`` -> rotated ``(R, C, S, S)`` and labels ``(R,)`` (quarter turns CCW).

    ``all_rotations``: ``R = 4B``, rotation ``k`` of image ``i`` at row ``k * B + i``;
    otherwise ``R = B`` and each image gets one random rotation.
    """
    if all_rotations:
        out = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])  # = rotate90(x, k) for all
        labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
        return out, labels
    labels = torch.randint(0, 4, (x.shape[0],), device=x.device)
    return rotate90(x, labels), labels


class RotationViews(torch.nn.Module):
    """``(B, C, S, S)`` in [0, 1] -> (rotated normalised views ``(R, C, S, S)``, labels ``(R,)``)."""

    def __init__(self, recipe: ViewRecipe, mean, std, all_rotations: bool) -> None:
        super().__init__()
        self.base = MultiView([recipe], mean, std)
        self.all_rotations = all_rotations

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        (v,) = self.base(x)
        return rotate_batch(v, self.all_rotations)

    def override(self, **overrides) -> "RotationViews":
        """``--augment-opt`` on the base view; turns and vertical flips would corrupt the labels."""
        base = self.base.override(**overrides)
        r = base.recipes[0]
        clash = [k for k in ("rot90_p", "vflip_p") if getattr(r, k) > 0]
        clash += [f"rotate_degrees={r.rotate_degrees:g}"] if r.rotate_p > 0 and r.rotate_degrees >= 45 else []
        if clash:
            raise UsageError(f"rotation predicts 90-degree turns; --augment-opt {', '.join(clash)} would make its "
                             f"labels ambiguous (free rotations, rotate_p, below 45 degrees are fine)")
        out = RotationViews(r, [0.0], [1.0], self.all_rotations)
        out.base = base
        return out


@dataclass
class RotationOptions:
    all_rotations: bool = True  # true: all 4 rotations of each image in the batch (the paper's); false: one random
    hidden_dim: int = 512  # hidden width of the 2-layer MLP that classifies the rotation
    min_scale: float = 0.3  # smallest area fraction of the random resized crop (scale min_scale-1), in (0, 1]

    def __post_init__(self) -> None:
        if self.hidden_dim < 1:
            raise ValueError("hidden_dim must be >= 1")
        check_unit_interval("min_scale", self.min_scale)


class Rotation(Task):
    Options = RotationOptions
    #: LARS, as simclr's, at twice its LR, measured (benchmarks/task_table.py, BENCHMARKS.md "rotation with
    #: LARS"): against the former AdamW 3e-3, CIFAR-10 kNN (ResNet-18, 32 px, 5,000 test images, paired SE
    #: 0.7) +4.2 / +6.5 at 2 CPU min over two seeds (LARS at 1.2: +2.8 / +4.3; 4.8 level with 2.4), +4.6 / +5.3
    #: at 0.5 (where AdamW was level with random init), +8.5 / +8.8 at 8; chest X-ray AUROC +0.031 / +0.041
    engine_defaults = {"optimizer": "lars", "base_lr": 2.4, "lr_scaling": "sqrt", "weight_decay": 1e-6}
    #: a ViT-like backbone keeps the former AdamW default: on ViT-Tiny (patch 8, 32 px) LARS 2.4 was level
    #: with it (CIFAR-10 kNN at 8 CPU min +0.1 / +1.0 (0.7) over two seeds, -0.1 at 2)
    token_engine_defaults = {"optimizer": "adamw", "base_lr": 3e-3, "lr_scaling": "linear", "weight_decay": 0.05}
    default_backbone = "timm:resnet18"

    def __init__(self, backbone, options: RotationOptions, spec) -> None:
        super().__init__(backbone, options, spec)
        self.classifier = mlp(backbone.num_features, options.hidden_dim, 4)

    def views(self, spec):
        recipe = ViewRecipe(spec.image_size, scale=(self.options.min_scale, 1.0), jitter_p=0.0, gray_p=0.0,
                            blur_p=0.0, gamma_p=0.0)
        return RotationViews(recipe, spec.mean, spec.std, self.options.all_rotations)

    def forward(self, views):
        x, labels = views
        logits = self.classifier(self.encoder(x))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}


@hookimpl
def register_tasks(register):
    register("rotation", Rotation)
