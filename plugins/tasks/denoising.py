"""Task ``denoising``: denoising autoencoder (Vincent, Larochelle, Bengio, Manzagol, ICML 2008).

The input is corrupted by ``q(x~ | x)`` and the autoencoder (backbone ``f`` as encoder,
:class:`sslkit.heads.ConvDecoder` ``d`` from its pooled embedding) reconstructs the clean
image::

    x~ = M * (x + sigma * eps) ,  eps ~ N(0, I),  M zeroes a random mask_ratio of
         mask_patch x mask_patch patches (zero = the dataset mean after normalisation)
    L  = 1 / (B C S S) * || d(f(x~)) - x ||_2^2

``corruption`` picks ``noise`` (additive Gaussian), ``mask`` (masking noise, as the
paper's) or ``both`` (default). Defaults: sigma 0.5 (in units of the data's standard
deviation), mask ratio 0.25 of patches of side ``image_size // 8``; views = crop + flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sslkit.api import ConvDecoder, Task, check_unit_interval, hookimpl, reconstruction_views


def patch_mask(b: int, size: int, patch: int, ratio: float, device) -> torch.Tensor:
    """``(B, 1, S, S)`` float mask: 0 on a random ``ratio`` of ``patch``-sized cells, 1 elsewhere."""
    grid = -(-size // patch)
    n = grid * grid
    k = int(round(n * ratio))
    order = torch.rand(b, n, device=device).argsort(1)
    keep = torch.ones(b, n, device=device)
    keep.scatter_(1, order[:, :k], 0.0)
    keep = keep.view(b, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return keep[:, :, :size, :size]


def corrupt(x: torch.Tensor, corruption: str, noise_std: float, mask_ratio: float, mask_patch: int) -> torch.Tensor:
    """``x: (B, C, S, S)`` normalised -> corrupted copy of the same shape."""
    out = x
    if corruption in ("noise", "both"):
        out = out + noise_std * torch.randn_like(out)
    if corruption in ("mask", "both") and mask_ratio > 0:
        out = out * patch_mask(x.shape[0], x.shape[-1], mask_patch, mask_ratio, x.device)
    return out


@dataclass
class DenoisingOptions:
    corruption: Literal["noise", "mask", "both"] = "both"  # noise (Gaussian), mask (blank random squares) or both
    noise_std: float = 0.5  # std of the added Gaussian noise, in units of the data's std, >= 0 (noise and both)
    mask_ratio: float = 0.25  # fraction of the mask_patch squares blanked, in [0, 1) (mask and both)
    mask_patch: int | None = None  # side in px of the blanked squares, >= 1; None: image_size // 8 (4 px at 32 px)
    decoder_width: int = 256  # decoder channels at its first 4x4 map, halved at every 2x upsampling (down to 32), >= 8
    min_scale: float = 0.5  # smallest area fraction of the random resized crop (scale min_scale-1), in (0, 1]

    def __post_init__(self) -> None:
        if self.corruption not in ("noise", "mask", "both"):
            raise ValueError("corruption must be noise, mask or both")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {self.noise_std}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError("mask_ratio must be in [0, 1)")
        if self.mask_patch is not None and self.mask_patch < 1:
            raise ValueError("mask_patch must be >= 1")
        if self.decoder_width < 8:
            raise ValueError("decoder_width must be >= 8")
        check_unit_interval("min_scale", self.min_scale)


class Denoising(Task):
    Options = DenoisingOptions
    #: LARS at rotation's LR, measured (benchmarks/task_table.py, BENCHMARKS.md "LARS for the CNN
    #: reconstruction tasks"): against the former AdamW 3e-3 at 2 CPU min, CIFAR-10 kNN (ResNet-18, 32 px,
    #: 5,000 test images) +3.7 / +1.8 (paired SE 0.6) over two seeds; chest X-ray AUROC +0.009 (0.005) / -0.008
    #: (0.004), level
    engine_defaults = {"optimizer": "lars", "base_lr": 2.4, "lr_scaling": "sqrt", "weight_decay": 1e-6}
    #: a ViT-like backbone keeps the former AdamW default (LARS not measured there)
    token_engine_defaults = {"optimizer": "adamw", "base_lr": 3e-3, "lr_scaling": "linear", "weight_decay": 0.05}
    default_backbone = "timm:resnet18"

    def __init__(self, backbone, options: DenoisingOptions, spec) -> None:
        super().__init__(backbone, options, spec)
        self.mask_patch = options.mask_patch or max(1, spec.image_size // 8)
        self.decoder = ConvDecoder(backbone.num_features, spec.channels, spec.image_size, options.decoder_width)

    def resolved_options(self):
        return {"mask_patch": self.mask_patch}

    def views(self, spec):
        return reconstruction_views(spec, self.options.min_scale)

    def forward(self, views):
        (x,) = views
        o = self.options
        with torch.no_grad():
            noisy = corrupt(x, o.corruption, o.noise_std, o.mask_ratio, self.mask_patch)
        return {"loss": F.mse_loss(self.decoder(self.encoder(noisy)), x)}


@hookimpl
def register_tasks(register):
    register("denoising", Denoising)
