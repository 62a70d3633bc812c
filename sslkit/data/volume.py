"""Sample modes of volumetric sources: one slice, a slab of K slices, or the whole volume.

A volumetric source (``dicom`` series, ``nifti``) holds volumes ``(C, D, H, W)`` with a
spacing ``(dz, dy, dx)`` in mm and samples them one of three ways (:class:`SampleMode`):

* ``slice``: one 2D image ``(C, H, W)`` per slice (the default, 2D sources' behaviour);
* ``slab:K``: ``K`` adjacent slices centred on each slice, as channels ``(C*K, H, W)``
  (slice-major: the K slices of channel 0, then of channel 1...), edge-padded at the
  ends of the volume, so every 2D task and backbone takes them unchanged;
* ``volume``: the whole volume, resampled (trilinear) to ``spacing`` and centre
  cropped / zero padded to ``size`` ``(D, H, W)``: ``(C, D, H, W)``.

Axis convention (:data:`ORIENTATION`): D ascends along the slice normal, H follows the
image rows, W the image columns, as the series is displayed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from sslkit.data.resize import apply_taps, linear_taps, resize_axis_linear
from sslkit.errors import UsageError

#: The axis order of every volume and slab a volumetric source yields.
ORIENTATION = "D: along the slice normal (ascending), H: image rows, W: image columns (as displayed)"
"""The axis convention of every ``(C, D, H, W)`` sample, as stored in the InputSpec."""
MODES = ("slice", "slab:K", "volume")


@dataclass(frozen=True)
class SampleMode:
    """How a volumetric source turns volumes into samples (see the module docstring).

    ``spacing`` is ``(dz, dy, dx)`` mm (None: keep the volume's own), ``size`` is
    ``(D, H, W)`` voxels (volume mode only).
    """

    mode: str = "slice"
    slab: int = 1
    spacing: tuple[float, float, float] | None = None
    size: tuple[int, int, int] | None = None

    @classmethod
    def parse(cls, sample: str = "slice", spacing: str = "", volume_size: str = "") -> "SampleMode":
        """``"slice"``, ``"slab:K"`` (K odd, >= 1) or ``"volume"``; ``spacing`` ``"X[,Y,Z]"``
        mm (one value for all axes, or x,y,z); ``volume_size`` ``"D,H,W"`` (or one value)."""
        text = (sample or "slice").strip().lower()
        m = re.fullmatch(r"slab:(\d+)", text)
        if text == "slice":
            mode, k = "slice", 1
        elif m and int(m.group(1)) >= 1 and int(m.group(1)) % 2 == 1:
            mode, k = "slab", int(m.group(1))
        elif text == "volume":
            mode, k = "volume", 1
        else:
            raise UsageError(f"--sample {sample!r} is not slice, slab:K (K odd, e.g. slab:3) or volume")
        sp = _numbers(spacing, float, "--spacing", "X[,Y,Z] in mm, e.g. 2 or 0.8,0.8,2")
        size = _numbers(volume_size, int, "--volume-size", "D,H,W in voxels, e.g. 64,64,64")
        if mode != "volume" and (sp or size):
            raise UsageError(f"--spacing and --volume-size need --sample volume (got --sample {text})")
        if mode == "volume" and size is None:
            raise UsageError("--sample volume needs --volume-size D,H,W (e.g. 64,64,64)")
        spacing_zyx = (sp[2], sp[1], sp[0]) if sp else None  # given as x,y,z
        return cls(mode, k, spacing_zyx, size)

    @property
    def volumetric(self) -> bool:
        return self.mode == "volume"

    def channels(self, per_slice: int) -> int:
        """Channels of one sample from ``per_slice`` channels of a slice."""
        return per_slice * self.slab if self.mode == "slab" else per_slice

    def describe(self) -> dict[str, Any]:
        """For a source's ``describe()``: nothing in slice mode (a 2D source's own behaviour)."""
        if self.mode == "slice":
            return {}
        out: dict[str, Any] = {"sample": self.mode if self.mode != "slab" else f"slab:{self.slab}"}
        if self.mode == "volume":
            out.update(spacing_mm=list(self.spacing) if self.spacing else "native", volume_size=list(self.size),
                       axes="C,D,H,W")
        out["orientation"] = ORIENTATION
        return out


def sample_mode(source: Any) -> SampleMode:
    """A source's :class:`SampleMode` (its ``sample`` attribute; ``slice`` for 2D sources)."""
    mode = getattr(source, "sample", None)
    return mode if isinstance(mode, SampleMode) else SampleMode()


def stored_size(source: Any, image_size: int) -> int | tuple[int, int, int]:
    """What a sample is stored at: ``image_size`` (2D), or the volume size ``(D, H, W)``."""
    mode = sample_mode(source)
    return mode.size if mode.volumetric else image_size


def _numbers(text: str, kind: type, flag: str, form: str) -> tuple | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = tuple(kind(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not {form}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(v > 0 for v in values):
        raise UsageError(f"{flag} {text!r} is not {form} (positive values)")
    return values


def slab_indices(depth: int, index: int, k: int) -> list[int]:
    """The ``k`` slice indices centred on ``index``, clamped to ``[0, depth)`` (edge padding)."""
    half = k // 2
    return [min(max(i, 0), depth - 1) for i in range(index - half, index + half + 1)]


def stack_slab(slices: list[np.ndarray]) -> np.ndarray:
    """K slices ``(C, H, W)`` -> one slab ``(C*K, H, W)``, channel-major then slice order."""
    return np.stack(slices, axis=1).reshape(-1, *slices[0].shape[1:]).astype(np.float32, copy=False)


def resample(volume: np.ndarray, spacing: tuple[float, float, float],
             target: tuple[float, float, float] | None) -> np.ndarray:
    """``(C, D, H, W)`` at ``spacing`` (dz, dy, dx) mm -> the same field of view at ``target``.

    Trilinear; a new side is ``round(side * spacing / target)`` (at least 1). Computed in
    numpy (:mod:`sslkit.data.resize`: torch's ``trilinear``, ``align_corners=False``, up to
    float rounding), one axis at a time, the most shrunk first, so decode workers need no torch.
    """
    if target is None:
        return volume
    shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(volume.shape[1:], spacing, target))
    if shape == volume.shape[1:]:
        return volume
    x = np.asarray(volume, dtype=np.float32)
    for axis in sorted(range(3), key=lambda a: shape[a] / x.shape[a + 1]):
        x = resize_axis_linear(x, axis + 1, shape[axis])
    return x


def crop_or_pad(volume: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """``(C, D, H, W)`` -> ``(C, *size)``: centred crop where larger, zero padding where smaller."""
    out = np.zeros((volume.shape[0], *size), dtype=np.float32)
    src, dst = [], []
    for n, m in zip(volume.shape[1:], size):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


@dataclass(frozen=True)
class VolumeFit:
    """How a ``(D, H, W)`` volume becomes a sample of its mode: which input voxels the
    kept output reads (``region``: three slices), and :meth:`apply` to those voxels.

    A centre crop keeps part of the resampled volume; only the part kept is computed,
    from only the input voxels its taps read, with the same taps and weights in the same
    axis order as :func:`resample`, so ``apply(volume[region])`` equals
    ``crop_or_pad(resample(volume))`` exactly. A source can read just ``region`` (the
    slices, rows and columns that matter) instead of the whole volume.
    """

    region: tuple[slice, slice, slice]
    steps: tuple[tuple[int, np.ndarray, np.ndarray], ...]  # (axis, tap index into region, weight), in order
    size: tuple[int, int, int]
    placed: tuple[slice, slice, slice]  # where the computed block goes in the output (zero padding around)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(C, *region shape)`` -> ``(C, *size)`` float32."""
        x = np.asarray(x, dtype=np.float32)
        for axis, idx, w in self.steps:
            x = apply_taps(x, axis + 1, idx, w)
        out = np.zeros((x.shape[0], *self.size), dtype=np.float32)
        out[(slice(None), *self.placed)] = x
        return out


def volume_fit(shape: tuple[int, int, int], spacing: tuple[float, float, float], mode: SampleMode) -> VolumeFit:
    """The :class:`VolumeFit` of a ``shape`` volume at ``spacing`` (dz, dy, dx) mm in ``mode``."""
    target = mode.spacing
    out_shape = tuple(shape) if target is None else tuple(
        max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))
    region, placed, taps = [], [], {}
    for axis, (n_in, n_out, m) in enumerate(zip(shape, out_shape, mode.size)):
        a = (n_out - m) // 2 if n_out >= m else 0  # the kept outputs [a, a + k)
        k = min(n_out, m)
        placed.append(slice(0, k) if n_out >= m else slice((m - n_out) // 2, (m - n_out) // 2 + n_out))
        if n_out == n_in:  # not resampled on this axis: a crop
            region.append(slice(a, a + k))
            continue
        idx, w = linear_taps(n_in, n_out)
        idx, w = idx[a : a + k], w[a : a + k]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        region.append(slice(lo, hi))
        taps[axis] = (idx - lo, w)
    order = sorted(range(3), key=lambda ax: out_shape[ax] / shape[ax])  # as resample(): the most shrunk first
    steps = tuple((ax, *taps[ax]) for ax in order if ax in taps)
    return VolumeFit(tuple(region), steps, tuple(mode.size), tuple(placed))


def fit_volume(volume: np.ndarray, spacing: tuple[float, float, float], mode: SampleMode) -> np.ndarray:
    """A volume ``(C, D, H, W)`` as ``mode`` wants it: resampled, then cropped / padded
    (computed for the kept part only: :func:`volume_fit`)."""
    fit = volume_fit(volume.shape[1:], spacing, mode)
    return fit.apply(volume[(slice(None), *fit.region)])
