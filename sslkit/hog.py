"""Histograms of oriented gradients as a masked-prediction target (MaskFeat, Wei et al., CVPR 2022):
``hog_tokens`` and ``hog_token_size`` (in ``sslkit.api``), the targets of mae and simmim.

Per image channel, the gradient (central differences, replicated border) votes its magnitude into one of
``BINS`` unsigned orientation bins; the votes are summed over ``cell x cell`` pixel cells. A target token is
the concatenated histograms of the cells under one patch, L2-normalised (:func:`hog_tokens`), so it keeps
edge directions and drops contrast and brightness, which pixel targets spend their capacity on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BINS = 9


def hog_cell(patch: int) -> int:
    """Cell side for a patch side: half the patch (2x2 cells per patch), or the patch when odd."""
    return patch // 2 if patch % 2 == 0 else patch


def hog_token_size(patch: int, channels: int) -> int:
    """Values per target token: ``(patch / cell)^2`` cells of ``BINS`` bins per channel."""
    k = patch // hog_cell(patch)
    return k * k * BINS * channels


def hog_map(x: torch.Tensor, cell: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C * BINS, H / cell, W / cell)`` un-normalised cell histograms, float32 (outside
    autocast, without autograd: a target). Peak memory is one ``(B, C, H, W)`` map per bin, not all nine;
    the gradients are differences of shifted views (a 1-channel convolution costs 20x more on CPU)."""
    b, c, h, w = x.shape
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        padded = F.pad(x.float(), (1, 1, 1, 1), mode="replicate")
        gx = padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]
        gy = padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]
        magnitude = (gx * gx + gy * gy).sqrt()
        bins = (torch.atan2(gy, gx) % math.pi * (BINS / math.pi)).to(torch.uint8).clamp_(max=BINS - 1)
        cells = (b, c, h // cell, cell, w // cell, cell)
        votes = [torch.where(bins == i, magnitude, 0.0).view(cells).sum((3, 5)) for i in range(BINS)]
        return torch.stack(votes, 2).reshape(b, c * BINS, h // cell, w // cell)


def to_tokens(maps: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, D, G*k, G*k) -> (B, G*G, D*k*k)``: the ``k x k`` cells under each patch, raster order."""
    return F.pixel_unshuffle(maps, k).flatten(2).transpose(1, 2)


def hog_tokens(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, hog_token_size)``: each patch's cell histograms, L2-normalised."""
    cell = hog_cell(patch)
    return F.normalize(to_tokens(hog_map(x, cell), patch // cell), dim=-1)
