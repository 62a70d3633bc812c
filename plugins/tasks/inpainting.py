"""Task ``inpainting``: context encoders (Pathak, Krähenbühl, Donahue, Darrell, Efros, CVPR 2016).

A square region covering ``region_frac`` of the image side is blanked (set to 0, the
dataset mean after normalisation) - in the centre (``region=center``, the paper's
central block) or at a random position per image (``region=random``); the encoder
(backbone ``f``, its pooled embedding is the bottleneck) and a convolutional decoder
``d`` (:class:`sslkit.heads.ConvDecoder`) fill it in. With ``M`` the region mask
(1 inside) and ``x^ = (1 - M) * x``, the reconstruction loss is the L2 distance on the
region (paper Eq. 1, normalised by its size), plus, with weight ``visible_weight``, the same
distance on the pixels outside it::

    L_rec = || M * (x - d(f(x^))) ||^2 / sum(M) + visible_weight * || (1 - M) * (x - d(f(x^))) ||^2 / sum(1 - M)

With ``adv_weight > 0`` a discriminator ``D`` (a small conv net) judges real images
against completed ones ``x_c = (1 - M) * x + M * d(f(x^))`` (paper Eq. 2-3)::

    L_adv = -log D(x_c)                                       (generator side)
    L_D   = -log D(x) - log(1 - D(x_c.detach()))              (discriminator side)
    L     = rec_weight * L_rec + adv_weight * L_adv + L_D

``L_adv`` reaches ``D`` through detached parameters and ``L_D`` sees detached
completions, so one optimizer step updates the discriminator on ``L_D`` only and the
encoder-decoder on ``L_rec`` and ``L_adv`` only. Defaults: region = centre, half the
side; adversarial term off (paper: rec_weight 0.999, adv_weight 0.001); ``visible_weight`` 1, measured
(the paper's region-only loss is ``visible_weight=0``): at 2 CPU-min on CIFAR-10 (ResNet-18, 32 px) the
paper's loss left the encoder 3.6 and 3.5 kNN points below a random one, ``visible_weight=1`` 2.0 and 3.8
above (+5.6 / +7.4 over it, paired, two seeds); on the 64-px chest X-rays at 0.6 CPU-min it costs 0.023 and
0.002 AUROC (both below the random encoder there). More weight moves further the same way (3: CIFAR-10
+7.4 / +7.0, X-rays -0.110 / -0.084; BENCHMARKS.md "Recipes from the live start").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sslkit.api import ConvDecoder, Task, check_unit_interval, hookimpl, reconstruction_views


def region_mask(b: int, size: int, frac: float, region: str, device) -> torch.Tensor:
    """``(B, 1, S, S)`` float mask, 1 inside a square of side ``round(frac * S)``."""
    side = max(1, int(round(frac * size)))
    if region == "center":
        top = left = torch.full((b,), (size - side) // 2, device=device)
    else:
        top = torch.randint(0, size - side + 1, (b,), device=device)
        left = torch.randint(0, size - side + 1, (b,), device=device)
    ar = torch.arange(size, device=device)
    rows = (ar[None] >= top[:, None]) & (ar[None] < top[:, None] + side)
    cols = (ar[None] >= left[:, None]) & (ar[None] < left[:, None] + side)
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1).float()


def masked_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels: ``(B, C, S, S)`` x 2, mask ``(B, 1, S, S)``."""
    m = mask.expand_as(target)
    return ((pred - target).pow(2) * m).sum() / m.sum().clamp(min=1)


class Discriminator(nn.Module):
    """``(B, C, S, S) -> (B,)`` logits: strided convs with LeakyReLU (no normalisation)."""

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


@dataclass
class InpaintingOptions:
    region: Literal["center", "random"] = "center"  # blanked square at the center (the paper's) or random (per image)
    region_frac: float = 0.5  # side of the blanked square as a fraction of the image side, in (0, 1)
    rec_weight: float = 1.0  # weight of the reconstruction loss on the region, > 0 (paper: 0.999)
    adv_weight: float = 0.0  # weight of the adversarial loss; > 0 trains a discriminator too, 0: off (paper: 0.001)
    decoder_width: int = 256  # decoder channels at its first 4x4 map, halved at every 2x upsampling (down to 32), >= 8
    min_scale: float = 0.5  # smallest area fraction of the random resized crop (scale min_scale-1), in (0, 1]
    visible_weight: float = 1.0  # weight of the L2 loss on the pixels outside the region, >= 0 (0: the paper's region only)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.visible_weight) and self.visible_weight >= 0):
            raise ValueError(f"visible_weight must be a finite number >= 0, got {self.visible_weight}")
        if self.region not in ("center", "random"):
            raise ValueError("region must be center or random")
        if not 0 < self.region_frac < 1:
            raise ValueError("region_frac must be in (0, 1)")
        if not (math.isfinite(self.rec_weight) and self.rec_weight > 0
                and math.isfinite(self.adv_weight) and self.adv_weight >= 0):
            raise ValueError(f"rec_weight must be a finite number > 0 and adv_weight >= 0, "
                             f"got {self.rec_weight} and {self.adv_weight}")
        if self.decoder_width < 8:
            raise ValueError("decoder_width must be >= 8")
        check_unit_interval("min_scale", self.min_scale)


class Inpainting(Task):
    Options = InpaintingOptions
    #: LARS at rotation's LR, measured (benchmarks/task_table.py, BENCHMARKS.md "LARS for the CNN
    #: reconstruction tasks"): against the former AdamW 3e-3 at 2 CPU min, CIFAR-10 kNN (ResNet-18, 32 px,
    #: 5,000 test images) +4.5 / +4.4 (paired SE 0.7) over two seeds, chest X-ray AUROC +0.018 (0.007) / +0.016 (0.001)
    engine_defaults = {"optimizer": "lars", "base_lr": 2.4, "lr_scaling": "sqrt", "weight_decay": 1e-6}
    #: a ViT-like backbone keeps the former AdamW default (LARS not measured there)
    token_engine_defaults = {"optimizer": "adamw", "base_lr": 3e-3, "lr_scaling": "linear", "weight_decay": 0.05}
    default_backbone = "timm:resnet18"
    legacy_option_values = {"visible_weight": 0.0}  # runs recorded before the visible pixels were scored

    def __init__(self, backbone, options: InpaintingOptions, spec) -> None:
        super().__init__(backbone, options, spec)
        self.decoder = ConvDecoder(backbone.num_features, spec.channels, spec.image_size, options.decoder_width)
        self.discriminator = Discriminator(spec.channels) if options.adv_weight > 0 else None

    def views(self, spec):
        return reconstruction_views(spec, self.options.min_scale)

    def forward(self, views):
        (x,) = views
        o = self.options
        mask = region_mask(x.shape[0], x.shape[-1], o.region_frac, o.region, x.device)
        pred = self.decoder(self.encoder(x * (1 - mask)))
        rec = masked_l2(pred, x, mask)
        if o.visible_weight > 0:
            rec = rec + o.visible_weight * masked_l2(pred, x, 1 - mask)
        if self.discriminator is None:
            return {"loss": rec}
        completed = x * (1 - mask) + pred * mask
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fake_logit = functional_call(self.discriminator, frozen, (completed,))
        adv = F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
        real_logit = self.discriminator(x)
        d_fake = self.discriminator(completed.detach())
        disc = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        loss = o.rec_weight * rec + o.adv_weight * adv + disc
        return {"loss": loss, "rec": rec.detach(), "adv": adv.detach(), "disc": disc.detach()}


@hookimpl
def register_tasks(register):
    register("inpainting", Inpainting)
