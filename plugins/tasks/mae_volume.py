"""MAE on volumes (``--task mae`` with ``--sample volume``): cube patches, visible-only encoder.

The 3D form of :mod:`sslkit_plugins.tasks.mae` (He et al. 2022; on CT/MR volumes as in
e.g. Chen et al., "Masked Image Modeling Advances 3D Medical Image Analysis", WACV 2023):
the volume ``(C, D, H, W)`` is cut into ``N = (D/p)(H/p)(W/p)`` cubes of ``p^3`` voxels in
raster order, a random ``mask_ratio`` of them is dropped, the 3D ViT encodes only the
visible ones, and the decoder predicts the voxels of every masked cube. Loss as in 2D::

    L = sum_p m_p * ||y_p - t_p||^2 / (P * sum_p m_p),   t_p per-cube normalised voxels

The decoder's position embedding is a fixed 3D sine-cosine (a third of the channels per
axis). Views: a random resized 3D crop (scale ``min_scale``-1, by default the paper's 0.2) and left-right flips.
Needs a 3D token backbone, e.g. ``monai:vit``, and a volume of at least ``MIN_TOKENS`` (4) cubes, as
in 2D: with fewer, masking 75 % leaves no cube visible (refused before decoding).
"""

from __future__ import annotations

import math

import torch

from sslkit.api import Task, UsageError, VolumeViews, is_token_backbone, masked_volume_recipe
from sslkit_plugins.tasks.mae import MAE, MIN_TOKENS, PAPER_MIN_SCALE


def patchify3d(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, D, H, W) -> (B, N, p^3 C)``: cubes in raster (D, H, W) order, voxels (d, h, w, chan)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (d // p) * (h // p) * (w // p), p**3 * c)


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fixed sine-cosine position embedding ``(N, dim)`` of a ``grid`` in raster order.

    Each axis gets ``2 * (dim // 6)`` channels ``[sin(pos w_k), cos(pos w_k)]`` with
    ``w_k = 1 / 10000^(k / (dim // 6))``; channels left over are zero.
    """
    k = dim // 6
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / max(k, 1))
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    parts = []
    for pos in axes:
        out = pos.reshape(-1, 1) * omega[None]
        parts += [out.sin(), out.cos()]
    emb = torch.cat(parts, dim=1)
    return torch.cat([emb, torch.zeros(emb.shape[0], dim - emb.shape[1], dtype=emb.dtype)], dim=1).float()


class MAE3D(MAE):
    """MAE for ``(B, C, D, H, W)`` volumes; built by ``MAE`` when the spec is volumetric."""

    @classmethod
    def check(cls, backbone, spec):
        if not (is_token_backbone(backbone) and getattr(backbone, "spatial_dims", 2) == 3):
            return (f"MAE on volumes needs a 3D ViT backbone with cube tokens, e.g. monai:vit; "
                    f"{getattr(backbone, 'name', 'this backbone')} is not one")
        p = backbone.patch_size
        if any(s % p for s in spec.volume_size):
            return f"the volume size {spec.volume_size} is not divisible by the patch size {p}"
        tokens = math.prod(s // p for s in spec.volume_size)
        if tokens < MIN_TOKENS:  # at mask ratio 0.75 no cube would be left visible: a NaN loss at step 1
            return (f"MAE at --volume-size {','.join(map(str, spec.volume_size))} with {p}-voxel cubes has "
                    f"{tokens} cube token(s), fewer than {MIN_TOKENS}: use --volume-size {2 * p},{2 * p},{p} "
                    f"or more, or a smaller --backbone-opt patch_size")
        return None

    def __init__(self, backbone, options, spec) -> None:
        Task.__init__(self, backbone, options, spec)
        if options.target not in (None, "pixels"):
            raise UsageError(f"mae target={options.target} is for images; on volumes the target is pixels")
        self.target = "pixels"
        p = backbone.patch_size
        grid = tuple(s // p for s in spec.volume_size)
        self.build_decoder(math.prod(grid), lambda d: sincos_pos_embed_3d(d, grid), p**3 * spec.channels)

    def min_scale(self, spec) -> float:
        return PAPER_MIN_SCALE if self.options.min_scale is None else self.options.min_scale

    def views(self, spec):
        return VolumeViews([masked_volume_recipe(spec.volume_size, self.min_scale(spec))], spec.mean, spec.std)

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked-cube MSE. x ``(B, C, D, H, W)``, pred ``(B, N, p^3 C)``, mask ``(B, N)``."""
        target = patchify3d(x, self.encoder.patch_size)
        if self.options.norm_pix_loss:
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()
