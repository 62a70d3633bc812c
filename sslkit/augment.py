"""Batched augmentations with per-sample random parameters.

Every op takes a float batch ``x: (B, C, H, W)`` in ``[0, 1]`` on the training device and
draws its random parameters per sample from torch's global RNG (so checkpoints capture
them). Running the augmentation as a few tensor ops on the whole batch, in the training
process, is what keeps the data pipeline from starving the model: no augmentation
worker processes fight the model for CPU cores.

Colour operations act only on 3-channel data; 1-channel data gets its own intensity
operations (gamma, contrast), never fake RGB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _coin(x: torch.Tensor, p: float) -> torch.Tensor:
    """(B,) bool mask: which samples get the op."""
    return torch.rand(x.shape[0], device=x.device) < p


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect in ``ratio``; resize to ``size``.

    ``x: (B, C, H, W) -> (B, C, size, size)``; bilinear sampling through one affine grid.
    """
    b, dev = x.shape[0], x.device
    area = _uniform(b, *scale, dev)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), dev)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] keeping the box inside
    cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def horizontal_flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    return _where(_coin(x, p), x.flip(-1), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def grayscale(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    """Colour drop: replace RGB by its luma (kept 3-channel). No-op on 1-channel data."""
    if x.shape[1] != 3:
        return x
    return _where(_coin(x, p), _gray(x).expand_as(x), x)


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
) -> torch.Tensor:
    """Brightness, contrast (all data) and saturation, hue (3-channel only) jitter.

    Factors are drawn per sample from ``[1 - s, 1 + s]`` (hue shift from ``[-h, h]``) and
    applied with torchvision's formulas, in a fixed order.
    """
    b, dev = x.shape[0], x.device
    apply = _coin(x, p)
    out = x
    if brightness > 0:
        f = _uniform(b, max(0.0, 1 - brightness), 1 + brightness, dev).view(-1, 1, 1, 1)
        out = (out * f).clamp(0, 1)
    if contrast > 0:
        f = _uniform(b, max(0.0, 1 - contrast), 1 + contrast, dev).view(-1, 1, 1, 1)
        lum = _gray(out) if out.shape[1] == 3 else out
        mean = lum.mean(dim=(1, 2, 3), keepdim=True)
        out = (f * out + (1 - f) * mean).clamp(0, 1)
    if out.shape[1] == 3 and saturation > 0:
        f = _uniform(b, max(0.0, 1 - saturation), 1 + saturation, dev).view(-1, 1, 1, 1)
        out = (f * out + (1 - f) * _gray(out)).clamp(0, 1)
    if out.shape[1] == 3 and hue > 0:
        out = _hue_shift(out, _uniform(b, -hue, hue, dev))
    return _where(apply, out, x)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (per sample) in HSV space."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    i = torch.floor(h * 6)
    f = h * 6 - i
    p_ = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    i = i.long() % 6
    choices_r = torch.stack([v, q, p_, p_, t, v], 1)
    choices_g = torch.stack([t, v, v, q, p_, p_], 1)
    choices_b = torch.stack([p_, p_, t, v, v, q], 1)
    idx = i.unsqueeze(1)
    return torch.cat([c.gather(1, idx) for c in (choices_r, choices_g, choices_b)], 1)


def gaussian_blur(
    x: torch.Tensor, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0), kernel_frac: float = 0.1
) -> torch.Tensor:
    """Blur with a per-sample sigma; kernel about ``kernel_frac`` of the image side (odd)."""
    b, c, h, w = x.shape
    k = max(3, int(kernel_frac * min(h, w)) // 2 * 2 + 1)
    s = _uniform(b, *sigma, x.device).view(b, 1)
    offs = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(offs.view(1, -1) ** 2) / (2 * s**2))
    kern = kern / kern.sum(1, keepdim=True)  # (B, k)
    weight = kern.repeat_interleave(c, 0)  # (B*C, k), one 1-D kernel per (sample, channel)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(y, weight.view(b * c, 1, k, 1), groups=b * c)
    return _where(_coin(x, p), y.view(b, c, h, w), x)


def solarize(x: torch.Tensor, p: float = 0.2, threshold: float = 0.5) -> torch.Tensor:
    return _where(_coin(x, p), torch.where(x >= threshold, 1 - x, x), x)


def gamma(x: torch.Tensor, p: float = 0.5, log_range: float = 0.4) -> torch.Tensor:
    """Intensity gamma ``x ** g`` with ``log g`` uniform in ``±log_range`` (1-channel data)."""
    g = torch.exp(_uniform(x.shape[0], -log_range, log_range, x.device)).view(-1, 1, 1, 1)
    return _where(_coin(x, p), x.clamp(min=0).pow(g), x)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


@dataclass(frozen=True)
class ViewRecipe:
    """One view of the SimCLR augmentation family (Chen et al. 2020, Sec. 3 and App. A).

    Colour ops apply to 3-channel data; on 1-channel data ``gamma_p`` and contrast /
    brightness jitter take their place.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: float = 0.4  # brightness = contrast = saturation strength
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0
    gamma_p: float = 0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = random_resized_crop(x, self.size, self.scale)
        x = horizontal_flip(x, self.flip_p)
        if self.jitter_p > 0:
            x = color_jitter(x, self.jitter, self.jitter, self.jitter, self.hue, self.jitter_p)
        if x.shape[1] == 3:
            x = grayscale(x, self.gray_p)
        elif self.gamma_p > 0:
            x = gamma(x, self.gamma_p)
        if self.blur_p > 0:
            x = gaussian_blur(x, self.blur_p)
        if self.solarize_p > 0:
            x = solarize(x, self.solarize_p)
        return x


class MultiView(nn.Module):
    """Apply several recipes to one batch and normalise: ``x -> (view_1, ..., view_k)``."""

    def __init__(self, recipes: Sequence[ViewRecipe], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.recipes = list(recipes)
        self.normalize = Normalize(mean, std)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.normalize(recipe(x)) for recipe in self.recipes)
