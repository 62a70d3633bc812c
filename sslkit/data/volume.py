"""Sample modes of volumetric sources: one slice, a slab of K slices, or the whole volume.

A volumetric source (``dicom`` series, ``nifti``) holds volumes ``(C, D, H, W)`` with a
spacing ``(dz, dy, dx)`` in mm and samples them one of three ways (:class:`SampleMode`):

* ``slice``: one 2D image ``(C, H, W)`` per slice (the default, 2D sources' behaviour);
* ``slab:K``: ``K`` adjacent slices centred on each slice, as channels ``(C*K, H, W)``
  (slice-major: the K slices of channel 0, then of channel 1...), edge-padded at the
  ends of the volume, so every 2D task and backbone takes them unchanged;
* ``volume``: the whole volume, resampled (trilinear) to ``spacing`` and centre
  cropped / padded to ``size`` ``(D, H, W)``: ``(C, D, H, W)``. The field of view is kept:
  ``n`` voxels become ``round(n * spacing / target)`` (torch's trilinear resize,
  ``align_corners=False``), so a voxel is the target's size within half a voxel over the extent.

A volume is resampled along the slice normal at its slices' real positions where a source
knows them (:func:`depth_positions`): a series with a missing slice or an uneven step is
interpolated across the gap (linear between the two nearest slices), not stacked as if
uniform; a uniform series is resampled exactly as a regular grid. Padding holds the value
that the source's mapping to [0, 1] takes to 0 (0 in [0, 1]; in modality values, the
value its windows map to 0: the sources' ``load_raw`` pads with it).

Axis convention (:data:`ORIENTATION`): D ascends along the slice normal, H follows the
image rows, W the image columns, as the series is displayed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from sslkit.data.resize import apply_taps, linear_taps
from sslkit.errors import UsageError

#: What a volume sample decodes to (in every volume-mode ``describe()``, so in the decoded-pixel cache key):
#: 2 = resampled along the slices' real positions, in modality values before a fixed window, padded
#: with the value the windows map to 0 (1, unnamed: slices windowed first, stacked as if uniform)
VOLUME_DECODE = "volume/2"
#: relative deviation of a slice step from the series' step within which slices are a regular grid
UNIFORM_STEP = 0.01
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
                       axes="C,D,H,W", decode=VOLUME_DECODE)
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


def depth_positions(positions: Any, step: float) -> np.ndarray | None:
    """Sorted slice positions along the normal (mm) as a float64 array, or None where they are
    a regular grid of ``step`` (every gap within :data:`UNIFORM_STEP` of it; fewer than two
    slices): such a volume is resampled as a regular grid, bit for bit as without positions."""
    if positions is None or len(positions) < 2:
        return None
    p = np.asarray(positions, dtype=np.float64)
    if np.all(np.abs(np.diff(p) - step) <= UNIFORM_STEP * step):
        return None
    return p


def depth_grid(positions: np.ndarray, step: float, target: float | None) -> np.ndarray:
    """Output slice centres (mm) for slices at ``positions`` (sorted) ``step`` mm thick: the
    extent from half a step before the first to half a step after the last (a regular grid of
    ``n`` slices spans ``n * step``, as :func:`resample` sees it) at ``target`` mm (None: at
    ``step``), ``round(extent / target)`` slices (at least 1) spread evenly over it."""
    extent = float(positions[-1] - positions[0]) + step
    n_out = max(1, round(extent / (target or step)))
    return positions[0] - step / 2 + (np.arange(n_out) + 0.5) * (extent / n_out)


def position_taps(positions: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)`` ``(len(centres), 2)``: linear interpolation at ``centres`` between the two
    nearest of the sorted ``positions`` (the end slices repeated beyond them), as :func:`linear_taps`."""
    n = len(positions)
    i1 = np.clip(np.searchsorted(positions, centres, side="right"), 1, max(1, n - 1))
    i0 = i1 - 1
    gap = positions[i1] - positions[i0]
    w1 = np.clip(np.where(gap > 0, (centres - positions[i0]) / np.where(gap > 0, gap, 1.0), 0.0), 0.0, 1.0)
    w1 = w1.astype(np.float32)
    return np.stack([i0, i1], 1).astype(np.int64), np.stack([np.float32(1.0) - w1, w1], 1).astype(np.float32)


def _taps(axis: int, n_in: int, spacing: tuple[float, float, float], target: tuple[float, float, float] | None,
          grid: np.ndarray | None) -> tuple[int, tuple[np.ndarray, np.ndarray] | None]:
    """The output length of ``axis`` and its taps (None: not resampled, the input as it is)."""
    if axis == 0 and grid is not None:
        centres = depth_grid(grid, spacing[0], target[0] if target else None)
        return len(centres), position_taps(grid, centres)
    n_out = n_in if target is None else max(1, round(n_in * spacing[axis] / target[axis]))
    return n_out, (None if n_out == n_in else linear_taps(n_in, n_out))


def resample(volume: np.ndarray, spacing: tuple[float, float, float],
             target: tuple[float, float, float] | None, positions: Any = None) -> np.ndarray:
    """``(C, D, H, W)`` at ``spacing`` (dz, dy, dx) mm -> the same field of view at ``target``.

    Trilinear; a new side is ``round(side * spacing / target)`` (at least 1). Computed in
    numpy (:mod:`sslkit.data.resize`: torch's ``trilinear``, ``align_corners=False``, up to
    float rounding), one axis at a time, the most shrunk first, so decode workers need no torch.
    ``positions``: the slices' positions along the normal (mm); where they are not a regular
    grid (:func:`depth_positions`), D is resampled at them (:func:`depth_grid`), also when
    ``target`` is None (then at the series' step, ``spacing[0]``).
    """
    grid = depth_positions(positions, spacing[0])
    taps = [_taps(a, n, spacing, target, grid) for a, n in enumerate(volume.shape[1:])]
    if all(t is None for _, t in taps):
        return volume
    x = np.asarray(volume, dtype=np.float32)
    for axis in sorted(range(3), key=lambda a: taps[a][0] / x.shape[a + 1]):
        if taps[axis][1] is not None:
            x = apply_taps(x, axis + 1, *taps[axis][1])
    return x


def crop_or_pad(volume: np.ndarray, size: tuple[int, int, int], pad: float = 0.0) -> np.ndarray:
    """``(C, D, H, W)`` -> ``(C, *size)``: centred crop where larger, padding with ``pad`` where smaller."""
    out = np.full((volume.shape[0], *size), pad, dtype=np.float32)
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
    slices, rows and columns that matter) instead of the whole volume; :meth:`compute`
    and :meth:`place` split :meth:`apply`, so that a window can go between them.
    """

    region: tuple[slice, slice, slice]
    steps: tuple[tuple[int, np.ndarray, np.ndarray], ...]  # (axis, tap index into region, weight), in order
    size: tuple[int, int, int]
    placed: tuple[slice, slice, slice]  # where the computed block goes in the output (padding around)

    def compute(self, x: np.ndarray) -> np.ndarray:
        """``(C, *region shape)`` -> the kept part of the resampled volume, float32, not yet padded."""
        x = np.asarray(x, dtype=np.float32)
        for axis, idx, w in self.steps:
            x = apply_taps(x, axis + 1, idx, w)
        return x

    def place(self, block: np.ndarray, pad: float = 0.0) -> np.ndarray:
        """A :meth:`compute` block (its channels may differ) -> ``(C, *size)`` float32, ``pad`` around it."""
        out = np.full((block.shape[0], *self.size), pad, dtype=np.float32)
        out[(slice(None), *self.placed)] = block
        return out

    def apply(self, x: np.ndarray, pad: float = 0.0) -> np.ndarray:
        """``(C, *region shape)`` -> ``(C, *size)`` float32."""
        return self.place(self.compute(x), pad)


def volume_fit(shape: tuple[int, int, int], spacing: tuple[float, float, float], mode: SampleMode,
               positions: Any = None) -> VolumeFit:
    """The :class:`VolumeFit` of a ``shape`` volume at ``spacing`` (dz, dy, dx) mm in ``mode``;
    ``positions``: its slices' positions along the normal, mm (as for :func:`resample`)."""
    grid = depth_positions(positions, spacing[0])
    taps = [_taps(a, n, spacing, mode.spacing, grid) for a, n in enumerate(shape)]
    out_shape = tuple(n_out for n_out, _ in taps)
    region, placed, kept = [], [], {}
    for axis, ((n_out, tap), m) in enumerate(zip(taps, mode.size)):
        a = (n_out - m) // 2 if n_out >= m else 0  # the kept outputs [a, a + k)
        k = min(n_out, m)
        placed.append(slice(0, k) if n_out >= m else slice((m - n_out) // 2, (m - n_out) // 2 + n_out))
        if tap is None:  # not resampled on this axis: a crop
            region.append(slice(a, a + k))
            continue
        idx, w = tap[0][a : a + k], tap[1][a : a + k]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        region.append(slice(lo, hi))
        kept[axis] = (idx - lo, w)
    order = sorted(range(3), key=lambda ax: out_shape[ax] / shape[ax])  # as resample(): the most shrunk first
    steps = tuple((ax, *kept[ax]) for ax in order if ax in kept)
    return VolumeFit(tuple(region), steps, tuple(mode.size), tuple(placed))


def fit_volume(volume: np.ndarray, spacing: tuple[float, float, float], mode: SampleMode,
               positions: Any = None, pad: float = 0.0) -> np.ndarray:
    """A volume ``(C, D, H, W)`` as ``mode`` wants it: resampled, then cropped / padded with
    ``pad`` (computed for the kept part only: :func:`volume_fit`)."""
    fit = volume_fit(volume.shape[1:], spacing, mode, positions)
    return fit.apply(volume[(slice(None), *fit.region)], pad)
