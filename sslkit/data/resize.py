"""Resampling in numpy, as PyTorch's ``F.interpolate`` does it, so decode workers need no torch.

A worker process that imports torch pays seconds before its first sample (3 s here);
these two functions are what the first pass needs from it:

* :func:`resize_axis_aa`: antialiased linear resampling of one axis (torch's
  ``mode="bilinear", antialias=True`` kernel, the same as Pillow's: a triangle filter
  stretched by the scale when shrinking, weights normalised at the borders);
* :func:`resize_axis_linear`: plain linear resampling of one axis with
  ``align_corners=False`` (torch's ``trilinear`` is this along each of the three axes).

Both are separable and applied axis by axis in float32; they equal torch's output up to
float rounding (tests/test_cache.py checks both against torch).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=64)
def _aa_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)``, both ``(n_out, K)``: the input taps of every output position."""
    f32 = np.float32  # torch computes the taps in float32: so do we, to round alike
    scale = f32(n_in) / f32(n_out)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    centers = scale * (np.arange(n_out, dtype=f32) + f32(0.5))
    lo = np.maximum((centers - support + f32(0.5)).astype(np.int64), 0)  # int(): truncation, as torch
    hi = np.minimum((centers + support + f32(0.5)).astype(np.int64), n_in)
    k = int((hi - lo).max())
    j = np.arange(k)
    w = np.clip(f32(1.0) - np.abs(((j[None] + lo[:, None]).astype(f32) - centers[:, None] + f32(0.5)) * invscale),
                f32(0.0), None)
    w[j[None] >= (hi - lo)[:, None]] = 0.0
    w /= np.maximum(w.sum(axis=1, keepdims=True, dtype=f32), f32(1e-12))
    idx = np.minimum(lo[:, None] + j[None], n_in - 1)
    return idx, w.astype(f32)


@functools.lru_cache(maxsize=64)
def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)``, both ``(n_out, 2)``, of linear interpolation, ``align_corners=False``."""
    f32 = np.float32
    src = np.maximum((np.arange(n_out, dtype=f32) + f32(0.5)) * (f32(n_in) / f32(n_out)) - f32(0.5), f32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(f32)).astype(f32)
    return np.stack([i0, i1], 1), np.stack([1.0 - w1, w1], 1).astype(np.float32)


def apply_taps(x: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Sum over the taps of ``weight * x[index]`` along ``axis`` (float32); ``idx`` and
    ``w`` are ``(n_out, K)`` as :func:`linear_taps` gives them (or rows of them)."""
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = idx.shape[0]
    out = np.take(x, idx[:, 0], axis=axis) * w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        out += np.take(x, idx[:, k], axis=axis) * w[:, k].reshape(shape)
    return out


def resize_axis_aa(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``x`` (float32) with axis ``axis`` resampled to ``size``, antialiased linear."""
    return x if x.shape[axis] == size else apply_taps(x, axis, *_aa_taps(x.shape[axis], size))


def resize_axis_linear(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``x`` (float32) with axis ``axis`` resampled to ``size``, linear, ``align_corners=False``."""
    return x if x.shape[axis] == size else apply_taps(x, axis, *linear_taps(x.shape[axis], size))
