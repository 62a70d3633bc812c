"""Batched augmentations with per-sample random parameters.

Every op takes a float batch ``x: (B, C, H, W)`` in ``[0, 1]`` on the training device and
draws its random parameters per sample from torch's global RNG (so checkpoints capture
them). Running the augmentation as a few tensor ops on the whole batch, in the training
process, is what keeps the data pipeline from starving the model: no augmentation
worker processes fight the model for CPU cores.

Colour operations act only on 3-channel data; 1-channel data gets its own intensity
operations (gamma, contrast), never fake RGB.

The vocabulary is that of the SimCLR augmentation study (Chen et al. 2020, Fig. 4):
random resized crop, flips, colour drop, colour jitter, rotation (free and 90° steps),
cutout, gaussian noise, gaussian blur and Sobel filtering, plus gamma and contrast for
1-channel data. Each random op has a deterministic twin taking per-sample parameters
(``rotate(x, degrees)``, ``erase(x, boxes)``, ...) that equals
``torchvision.transforms.v2.functional`` applied sample by sample (tests/test_augment.py);
the random op only draws the parameters. The views a task trains on are composed of
these ops in :mod:`sslkit.views` (:class:`~sslkit.views.ViewRecipe`, named recipes,
:class:`~sslkit.views.MultiView`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

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
    H, W = x.shape[2], x.shape[3]
    boxes = torch.stack([(cy + 1 - h) * H / 2, (cx + 1 - w) * W / 2, h * H, w * W], 1)
    return resized_crop(x, boxes, size)


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
    colour: bool = True,
) -> torch.Tensor:
    """Brightness, contrast (all data) and saturation, hue (3 channels that are ``colour`` planes) jitter.

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
        out = adjust_contrast(out, _uniform(b, max(0.0, 1 - contrast), 1 + contrast, dev))
    colour = colour and out.shape[1] == 3
    if colour and saturation > 0:
        f = _uniform(b, max(0.0, 1 - saturation), 1 + saturation, dev).view(-1, 1, 1, 1)
        out = (f * out + (1 - f) * _gray(out)).clamp(0, 1)
    if colour and hue > 0:
        out = _hue_shift(out, _uniform(b, -hue, hue, dev))
    return _where(apply, out, x)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (per sample) in HSV space; equals ``TF.adjust_hue``.

    With hue ``h`` in sixths of a turn, ``V = max`` and ``V * S = max - min``, each output
    channel is ``V - V * S * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h) mod 6`` and
    ``n = 5, 3, 1`` for R, G, B: the closed form of HSV -> RGB, no per-sector gather.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    delta = maxc - x.amin(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = (h + 6 * shift.view(-1, 1, 1)) % 6
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h + n) % 6
        channels.append(maxc - delta * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(channels, 1)


def blur_kernel_size(h: int, w: int, kernel_frac: float = 0.1) -> int:
    """Odd kernel side, about ``kernel_frac`` of the shorter image side (at least 3)."""
    return max(3, int(kernel_frac * min(h, w)) // 2 * 2 + 1)


def blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Gaussian blur with per-sample ``sigma: (B,)``, kernel ``k`` (odd), reflect padding.

    ``(B, C, H, W) -> (B, C, H, W)``; equals ``TF.gaussian_blur(x[i], [k, k], sigma[i])``.
    """
    b, c, h, w = x.shape
    offs = torch.linspace(-(k // 2), k // 2, k, device=x.device, dtype=x.dtype)
    kern = torch.exp(-0.5 * (offs.view(1, -1) / sigma.view(b, 1).to(x.dtype)) ** 2)
    kern = kern / kern.sum(1, keepdim=True)  # (B, k)
    weight = kern.repeat_interleave(c, 0)  # (B*C, k), one 1-D kernel per (sample, channel)
    y = F.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(y, weight.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


def gaussian_blur(
    x: torch.Tensor, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0), kernel_frac: float = 0.1
) -> torch.Tensor:
    """Blur with a per-sample sigma; kernel about ``kernel_frac`` of the image side (odd)."""
    s = _uniform(x.shape[0], *sigma, x.device)
    y = blur(x, s, blur_kernel_size(x.shape[2], x.shape[3], kernel_frac))
    return _where(_coin(x, p), y, x)


def solarize(x: torch.Tensor, p: float = 0.2, threshold: float = 0.5) -> torch.Tensor:
    return _where(_coin(x, p), torch.where(x >= threshold, 1 - x, x), x)


def gamma(x: torch.Tensor, p: float = 0.5, log_range: float = 0.4) -> torch.Tensor:
    """Intensity gamma ``x ** g`` with ``log g`` uniform in ``±log_range`` (1-channel data)."""
    g = torch.exp(_uniform(x.shape[0], -log_range, log_range, x.device))
    return _where(_coin(x, p), adjust_gamma(x, g), x)


def vertical_flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    return _where(_coin(x, p), x.flip(-2), x)


def adjust_gamma(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x ** g`` with per-sample ``g: (B,)`` (as ``TF.adjust_gamma(x[i], g[i])``)."""
    return x.clamp(min=0).pow(g.view(-1, 1, 1, 1).to(x.dtype)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the mean luminance by per-sample ``f: (B,)`` (as ``TF.adjust_contrast``)."""
    lum = _gray(x) if x.shape[1] == 3 else x
    mean = lum.mean(dim=(1, 2, 3), keepdim=True)
    f = f.view(-1, 1, 1, 1).to(x.dtype)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def contrast(x: torch.Tensor, p: float = 0.5, strength: float = 0.4) -> torch.Tensor:
    """Random contrast factor in ``[1 - strength, 1 + strength]`` (any channel count)."""
    f = _uniform(x.shape[0], max(0.0, 1 - strength), 1 + strength, x.device)
    return _where(_coin(x, p), adjust_contrast(x, f), x)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each sample counter-clockwise by ``degrees: (B,)`` about its centre.

    Bilinear, corners filled with 0, size kept: ``TF.rotate(x[i], degrees[i])``.
    ``(B, C, H, W) -> (B, C, H, W)``.
    """
    b, c, h, w = x.shape
    a = torch.deg2rad(degrees.to(device=x.device, dtype=torch.float32))
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    # output pixel -> source pixel is the inverse rotation, in pixel units (aspect-correct)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotation(x: torch.Tensor, p: float = 0.5, degrees: float = 15.0) -> torch.Tensor:
    """Free rotation by an angle uniform in ``±degrees`` (per sample)."""
    angle = _uniform(x.shape[0], -degrees, degrees, x.device)
    return _where(_coin(x, p), rotate(x, angle), x)


def rotate90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate sample ``i`` by ``k[i] * 90°`` counter-clockwise (exact; square images)."""
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"90-degree rotations need square images, got {tuple(x.shape[2:])}")
    out = x
    for q in (1, 2, 3):
        out = torch.where((k % 4 == q).view(-1, 1, 1, 1), torch.rot90(x, q, dims=(2, 3)), out)
    return out


def random_rotate90(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """With probability ``p``, rotate by 90°, 180° or 270° (uniformly)."""
    k = torch.randint(1, 4, (x.shape[0],), device=x.device)
    return rotate90(x, torch.where(_coin(x, p), k, torch.zeros_like(k)))


def erase(x: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """Set box ``boxes[i] = (top, left, height, width)`` (pixels) of sample ``i`` to ``value``.

    As ``TF.erase(x[i], top, left, height, width, value)``; a zero-size box erases nothing.
    """
    b, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    t, l, bh, bw = (boxes[:, i].view(b, 1, 1) for i in range(4))
    inside = (ys >= t) & (ys < t + bh) & (xs >= l) & (xs < l + bw)
    return torch.where(inside.unsqueeze(1), torch.as_tensor(value, dtype=x.dtype, device=x.device), x)


def cutout(x: torch.Tensor, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.2),
           ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Erase one random box (area fraction in ``scale``, aspect in ``ratio``) per sample."""
    b, _, h, w = x.shape
    area = _uniform(b, *scale, x.device) * h * w
    r = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), x.device))
    bh = torch.sqrt(area / r).round().clamp(1, h).long()
    bw = torch.sqrt(area * r).round().clamp(1, w).long()
    top = (torch.rand(b, device=x.device) * (h - bh + 1)).long()
    left = (torch.rand(b, device=x.device) * (w - bw + 1)).long()
    keep = ~_coin(x, p)
    bh, bw = bh.masked_fill(keep, 0), bw.masked_fill(keep, 0)
    return erase(x, torch.stack([top, left, bh, bw], 1))


def gaussian_noise(x: torch.Tensor, p: float = 0.5, std: tuple[float, float] = (0.0, 0.05)) -> torch.Tensor:
    """Add ``N(0, s²)`` noise with ``s`` uniform in ``std`` per sample; clip to [0, 1]."""
    s = _uniform(x.shape[0], *std, x.device).view(-1, 1, 1, 1).to(x.dtype)
    return _where(_coin(x, p), (x + s * torch.randn_like(x)).clamp(0, 1), x)


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude per channel, scaled to [0, 1]: ``(B, C, H, W) -> same``.

    ``sqrt(gx² + gy²) / (4√2)`` with edge-replicating borders (``scipy.ndimage.sobel``
    with ``mode="nearest"`` on each axis).
    """
    b, c, h, w = x.shape
    d = torch.tensor([-1.0, 0.0, 1.0], device=x.device, dtype=x.dtype)
    s = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    kx = (s.view(3, 1) * d.view(1, 3)).expand(b * c, 1, 3, 3)
    ky = (d.view(3, 1) * s.view(1, 3)).expand(b * c, 1, 3, 3)
    y = F.pad(x.reshape(1, b * c, h, w), (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(y, kx, groups=b * c), F.conv2d(y, ky, groups=b * c)
    return (torch.sqrt(gx**2 + gy**2) / (4 * math.sqrt(2))).clamp(0, 1).view(b, c, h, w)


def random_sobel(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    return _where(_coin(x, p), sobel(x), x)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes[i] = (top, left, height, width)`` (pixels, may be fractional) and resize.

    Bilinear, no antialiasing: ``TF.resized_crop(x[i], *boxes[i], [size, size],
    antialias=False)`` for integer boxes. ``(B, C, H, W) -> (B, C, size, size)``.
    """
    b, c, h, w = x.shape
    top, left, bh, bw = (boxes[:, i].to(device=x.device, dtype=torch.float32).view(b, 1) for i in range(4))
    centres = torch.arange(size, device=x.device, dtype=torch.float32).view(1, size) + 0.5
    # source pixel of each output pixel centre, kept inside the box (as if cropped first)
    sx = torch.minimum(torch.maximum(left + centres * bw / size - 0.5, left), left + bw - 1)
    sy = torch.minimum(torch.maximum(top + centres * bh / size - 0.5, top), top + bh - 1)
    gx = (2 * sx + 1) / w - 1  # (B, size), normalised for align_corners=False
    gy = (2 * sy + 1) / h - 1
    grid = torch.stack([gx.view(b, 1, size).expand(b, size, size), gy.view(b, size, 1).expand(b, size, size)], -1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel of ``(B, C, ...)`` batches: images ``(B, C, H, W)``, volumes
    ``(B, C, D, H, W)``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x.dtype), self.std.to(x.dtype)
        if x.dim() != 4:  # (1, C, 1, ..., 1) for the batch's dimensions
            mean, std = mean.view(1, -1, *[1] * (x.dim() - 2)), std.view(1, -1, *[1] * (x.dim() - 2))
        return (x - mean) / std


_MOVED = ("RECIPES", "MultiView", "ViewRecipe", "byol_recipes", "override_recipe", "recipe")


def __getattr__(name: str) -> Any:
    """The view recipes moved to :mod:`sslkit.views`; ``sslkit.augment.ViewRecipe`` still works."""
    if name in _MOVED:
        from sslkit import views

        return getattr(views, name)
    raise AttributeError(f"module 'sslkit.augment' has no attribute {name!r}")
