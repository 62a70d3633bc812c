"""Small heads shared by tasks: projection / prediction MLPs, the DINO head, a conv decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, batch_norm: bool = True,
        last_bn: bool = False) -> nn.Sequential:
    """``layers`` linear layers, BN + ReLU between them (SimCLR / BYOL projection heads).

    ``(B, in_dim) -> (B, out_dim)``; ``last_bn`` adds a non-affine BatchNorm at the end
    (Barlow Twins / MoCo v3 projectors).
    """
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            mods.append(nn.BatchNorm1d(hidden_dim))
        mods.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, Sec. 3.1 and App.): ``(B, D) -> (B, K)``.

    A 3-layer MLP (GELU, no BN) to a ``bottleneck_dim`` code, l2-normalised, then a
    weight-normalised linear layer with its norm fixed to 1 (``norm_last_layer``), i.e.
    ``logits = x_hat @ (W / ||W||_row)^T``.
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return x @ F.normalize(self.last, dim=1).T


class ConvDecoder(nn.Module):
    """Pixels from an embedding: ``(B, D) -> (B, C, S, S)``.

    A linear layer to a ``(width, 4, 4)`` map, then ``log2(S / 4)`` stages of nearest
    2x upsampling + 3x3 conv + BatchNorm + ReLU (halving the width down to
    ``min_width``), a final 3x3 conv to ``C`` channels and, when ``S`` is not ``4 * 2^k``,
    a bilinear resize to ``S``. The encoder (a backbone) is untouched: its pooled
    embedding is the bottleneck, so autoencoding tasks train exactly what is exported.
    """

    def __init__(self, in_dim: int, out_channels: int, image_size: int, width: int = 256, min_width: int = 32):
        super().__init__()
        self.image_size = image_size
        self.width = width
        self.fc = nn.Linear(in_dim, width * 16)
        stages = max(0, int(math.floor(math.log2(image_size / 4))))
        mods: list[nn.Module] = []
        w = width
        for _ in range(stages):
            w_out = max(min_width, w // 2)
            mods += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w_out, 3, padding=1, bias=False),
                     nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]
            w = w_out
        mods.append(nn.Conv2d(w, out_channels, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.net(self.fc(z).view(z.shape[0], self.width, 4, 4))
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x
