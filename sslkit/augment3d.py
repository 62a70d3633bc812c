"""Batched 3D augmentations for volumes ``x: (B, C, D, H, W)`` in [0, 1], on the training device.

The 3D counterpart of :mod:`sslkit.augment`: every random op draws its parameters per
sample from torch's global RNG (so checkpoints capture them) and runs as a few tensor ops
on the whole batch. Each random op has a deterministic twin taking the parameters
(``resized_crop_3d(x, boxes, size)``, ``flip_3d(x, mask, axis)``, ``blur_3d(x, sigma)``...).

Flips act only along the axes a recipe declares (``flip_axes``, indices into ``(D, H, W)``):
anatomy is not mirror-symmetric along every axis, so none is flipped by default except
W (left-right). Intensity ops (scale/shift, gamma, noise, blur) act per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


def _coin(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.rand(x.shape[0], device=x.device) < p


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1, 1), a, b)


def resized_crop_3d(x: torch.Tensor, boxes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop ``boxes`` and resize to ``size`` (trilinear, one affine grid for the batch).

    ``boxes: (B, 6)`` = centre ``(cd, ch, cw)`` and extent ``(ed, eh, ew)`` as fractions
    of each axis in [0, 1]. ``x: (B, C, D, H, W) -> (B, C, *size)``.
    """
    b = x.shape[0]
    theta = torch.zeros(b, 3, 4, device=x.device, dtype=x.dtype)
    # affine_grid's output axes are (x=W, y=H, z=D) in [-1, 1]
    for row, axis in enumerate((2, 1, 0)):
        theta[:, row, row] = boxes[:, 3 + axis]
        theta[:, row, 3] = boxes[:, axis] * 2 - 1
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop_3d(x: torch.Tensor, size: Sequence[int], scale: tuple[float, float] = (0.3, 1.0),
                           ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """A random sub-volume holding a ``scale`` fraction of the volume, axes stretched by up to
    ``ratio``, resized to ``size``. ``(B, C, D, H, W) -> (B, C, *size)``."""
    b, dev = x.shape[0], x.device
    vol = _uniform(b, *scale, dev)
    log_r = torch.stack([_uniform(b, math.log(ratio[0]), math.log(ratio[1]), dev) for _ in range(3)], 1)
    log_r = log_r - log_r.mean(dim=1, keepdim=True)  # the product of the three stretches is 1
    extent = (vol[:, None] ** (1 / 3) * log_r.exp()).clamp(max=1.0)
    centre = extent / 2 + torch.rand(b, 3, device=dev) * (1 - extent)
    return resized_crop_3d(x, torch.cat([centre, extent], 1), size)


def flip_3d(x: torch.Tensor, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """Flip the samples where ``mask (B,)`` along ``axis`` (0: D, 1: H, 2: W)."""
    return _where(mask, x.flip(2 + axis), x)


def random_flips(x: torch.Tensor, axes: Sequence[int], p: float = 0.5) -> torch.Tensor:
    """Flip each declared axis independently with probability ``p``."""
    for axis in axes:
        x = flip_3d(x, _coin(x, p), axis)
    return x


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per sample, clipped to [0, 1]."""
    return (x * scale.view(-1, 1, 1, 1, 1) + shift.view(-1, 1, 1, 1, 1)).clamp(0, 1)


def random_intensity(x: torch.Tensor, p: float = 0.8, scale: float = 0.1, shift: float = 0.1) -> torch.Tensor:
    """With probability ``p``: scale in ``1 +- scale`` and shift in ``+- shift``."""
    b, dev = x.shape[0], x.device
    out = scale_shift(x, _uniform(b, 1 - scale, 1 + scale, dev), _uniform(b, -shift, shift, dev))
    return _where(_coin(x, p), out, x)


def adjust_gamma_3d(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x ** g`` per sample."""
    return x.clamp(min=0).pow(g.view(-1, 1, 1, 1, 1))


def random_gamma(x: torch.Tensor, p: float = 0.5, log_range: float = 0.4) -> torch.Tensor:
    """With probability ``p``: gamma ``exp(U(-log_range, log_range))``."""
    g = _uniform(x.shape[0], -log_range, log_range, x.device).exp()
    return _where(_coin(x, p), adjust_gamma_3d(x, g), x)


def random_noise(x: torch.Tensor, p: float = 0.5, std: tuple[float, float] = (0.0, 0.05)) -> torch.Tensor:
    """With probability ``p``: additive Gaussian noise of a per-sample std in ``std``."""
    s = _uniform(x.shape[0], *std, x.device).view(-1, 1, 1, 1, 1)
    return _where(_coin(x, p), (x + torch.randn_like(x) * s).clamp(0, 1), x)


def blur_3d(x: torch.Tensor, sigma: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Gaussian blur with a per-sample ``sigma (B,)`` (voxels), separable, reflect-padded."""
    b, c = x.shape[:2]
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r[None] ** 2) / (2 * sigma.to(x.dtype)[:, None].clamp(min=1e-3) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
    y = x.reshape(1, b * c, *x.shape[2:])
    for axis in range(3):
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = k
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = k // 2
        y = F.conv3d(F.pad(y, pad, mode="replicate"), kern.view(shape), groups=b * c)
    return y.reshape(x.shape)


def random_blur(x: torch.Tensor, p: float = 0.5, sigma: tuple[float, float] = (0.1, 1.5)) -> torch.Tensor:
    """With probability ``p``: Gaussian blur of a per-sample sigma (voxels) in ``sigma``."""
    s = _uniform(x.shape[0], *sigma, x.device)
    return _where(_coin(x, p), blur_3d(x, s), x)


@dataclass(frozen=True)
class VolumeRecipe:
    """One 3D view: crop, declared flips, intensity scale/shift, gamma, noise, blur."""

    size: tuple[int, int, int]
    scale: tuple[float, float] = (0.3, 1.0)
    flip_axes: tuple[int, ...] = (2,)  # W (left-right) only
    flip_p: float = 0.5
    intensity_p: float = 0.8
    gamma_p: float = 0.5
    noise_p: float = 0.5
    blur_p: float = 0.5

    def __post_init__(self) -> None:
        """Values in range (``--augment-opt`` on volumes): one ValueError naming the field."""
        for name in ("flip_p", "intensity_p", "gamma_p", "noise_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:  # NaN too
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be two volume fractions low,high with 0 < low <= high <= 1, "
                             f"got {','.join(map(str, self.scale))}")
        if not set(self.flip_axes) <= {0, 1, 2}:
            raise ValueError(f"flip_axes must be axes among 0, 1, 2 (D, H, W), "
                             f"got {','.join(map(str, self.flip_axes))}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = random_resized_crop_3d(x, self.size, self.scale)
        x = random_flips(x, self.flip_axes, self.flip_p)
        x = random_intensity(x, self.intensity_p) if self.intensity_p else x
        x = random_gamma(x, self.gamma_p) if self.gamma_p else x
        x = random_blur(x, self.blur_p) if self.blur_p else x
        return random_noise(x, self.noise_p) if self.noise_p else x


def pair_volume_recipes(size: Sequence[int], min_scale: float = 0.3) -> list[VolumeRecipe]:
    """Two strong views for contrastive / redundancy-reduction tasks (SimCLR, VICReg, BYOL)."""
    r = VolumeRecipe(tuple(size), scale=(min_scale, 1.0))
    return [r, replace(r, blur_p=0.1, noise_p=0.2)]


def masked_volume_recipe(size: Sequence[int], min_scale: float = 0.5) -> VolumeRecipe:
    """One light view for masked modelling: crop and flips only (as MAE in 2D)."""
    return VolumeRecipe(tuple(size), scale=(min_scale, 1.0), intensity_p=0.0, gamma_p=0.0, noise_p=0.0, blur_p=0.0)


class VolumeViews(nn.Module):
    """``(B, C, D, H, W)`` in [0, 1] -> one normalised view per recipe."""

    def __init__(self, recipes: Sequence[VolumeRecipe], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.recipes = list(recipes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple((r(x) - self.mean) / self.std for r in self.recipes)

    def override(self, **overrides: Any) -> "VolumeViews":
        """``--augment-opt``: replace recipe fields (e.g. ``flip_axes="0,2"``, ``noise_p=0``)."""
        from sslkit.errors import unknown_name_message

        fields = {}
        for k, v in overrides.items():
            if k not in VolumeRecipe.__dataclass_fields__ or k == "size":
                names = [f for f in VolumeRecipe.__dataclass_fields__ if f != "size"]
                raise ValueError(unknown_name_message("3D view option", k, names))
            try:
                if k == "flip_axes":
                    v = tuple(int(a) for a in str(v).split(",") if a.strip() != "")
                elif k == "scale":
                    v = tuple(float(a) for a in str(v).split(","))
                else:
                    v = float(v)
            except ValueError:
                raise ValueError(f"{k} expects {'integers' if k == 'flip_axes' else 'numbers'}, got {v!r}") from None
            fields[k] = v
        return VolumeViews([replace(r, **fields) for r in self.recipes], self.mean.flatten().tolist(),
                           self.std.flatten().tolist())
