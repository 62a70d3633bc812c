"""Slabs and volumes of DICOM series: the ``dicom`` source's ``--sample slab:K|volume``.

:class:`VolumeSampler` turns the volumes of :func:`dicom_series.assemble` into sample
refs (one per slice for ``slab:K``, one per volume for ``volume``) and loads them. Each
slice goes through the same decoding as a 2D file (:func:`dicom_decode.decode`: modality
LUT, window, MONOCHROME1), slice by slice; a mosaic is decoded once and cut into its
tiles. The last few decoded files are kept, so the K slices of neighbouring slabs are
read once.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import numpy as np

from sslkit.api import SampleMode, SampleRef, slab_indices, stack_slab, volume_fit
from sslkit_plugins.sources.dicom_decode import Window
from sslkit_plugins.sources.dicom_pixels import read_frame
from sslkit_plugins.sources.dicom_series import Volume, cut_mosaic


class VolumeSampler:
    """Refs and pixels of volumes in one :class:`SampleMode` (slab or volume).

    ``raw=True`` gives modality values (e.g. Hounsfield units) instead of windowed [0, 1].
    """

    def __init__(self, volumes: list[Volume], mode: SampleMode, windows: tuple[Window, ...],
                 headers: dict[str, dict[str, Any]] | None = None, keep: int = 16):
        self.volumes = volumes
        self.headers = headers or {}  # path -> read_header(): where each file's pixels lie
        self.mode = mode
        self.windows = windows
        self.keep = keep
        self.where: dict[str, tuple[int, int | None]] = {}  # ref id -> (volume, slice or None)
        self._files: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def refs(self) -> list[SampleRef]:
        """One ref per slice (slab) or per volume, volumes in order, slices in spatial order."""
        out = []
        firsts = Counter(vol.slices[0][0] for vol in self.volumes)
        for v, vol in enumerate(self.volumes):
            if self.mode.volumetric:  # several volumes of one file (echoes): named by their first frame
                path, frame, _ = vol.slices[0]
                ref = SampleRef(path, frame if firsts[path] > 1 else None, vol.group)
                self.where[ref.id] = (v, None)
                out.append(ref)
                continue
            for i, (path, frame, tile) in enumerate(vol.slices):
                ref = SampleRef(path, frame if tile is None else tile, vol.group)
                self.where[ref.id] = (v, i)
                out.append(ref)
        return out

    def files_of(self, ref: SampleRef) -> list[str]:
        """The files ``load(ref)`` reads: the slab's K slices, or every slice of the volume."""
        v, i = self.where[ref.id]
        vol = self.volumes[v]
        indices = range(vol.depth) if i is None else slab_indices(vol.depth, i, self.mode.slab)
        return list(dict.fromkeys(vol.slices[j][0] for j in indices))

    def sample_id(self, ref: SampleRef) -> str:
        """``series:<key>`` for a volume (a keyed hash: no UID, not linkable to one), else ``ref.id``."""
        v, i = self.where[ref.id]
        return f"series:{self.volumes[v].key}" if i is None else ref.id

    def spacing_of(self, ref: SampleRef) -> list[float]:
        """``[dz, dy, dx]`` mm of a loaded volume (the mode's spacing, else the series'), ``[dy, dx]`` of a slab."""
        v, i = self.where[ref.id]
        vol = self.volumes[v]
        if i is None:
            return list(self.mode.spacing or vol.spacing)
        return list(vol.spacing[1:])

    def volume_of(self, ref: SampleRef) -> Volume:
        return self.volumes[self.where[ref.id][0]]

    def load(self, ref: SampleRef, raw: bool = False) -> np.ndarray:
        """``(C*K, H, W)`` for a slab, ``(C, D, H, W)`` (fitted to the mode) for a volume."""
        v, i = self.where[ref.id]
        vol = self.volumes[v]
        if i is None:  # only the slices, rows and columns the fitted volume keeps are read and windowed
            fit = volume_fit((vol.depth, vol.rows, vol.columns), vol.spacing, self.mode)
            depth, rows, cols = fit.region
            return fit.apply(np.stack([self.slice(vol, j, raw, (rows, cols)) for j in range(depth.start, depth.stop)],
                                      axis=1))
        return stack_slab([self.slice(vol, j, raw) for j in slab_indices(vol.depth, i, self.mode.slab)])

    def slice(self, vol: Volume, index: int, raw: bool = False, region: tuple[slice, slice] | None = None
              ) -> np.ndarray:
        """Slice ``index`` of ``vol``: float32 ``(C, H, W)`` (``region``: those rows and columns only)."""
        path, frame, tile = vol.slices[index]
        facts = self.headers.get(path, {}).get("pixels")
        if tile is not None:  # a mosaic's tiles are cut from the whole file, kept for the next tile
            return self._cached((path, -1, raw), lambda: cut_mosaic(
                read_frame(path, frame, self.windows, facts, raw),
                vol.mosaic, (vol.rows, vol.columns)))[:, tile][(slice(None), *(region or ()))]
        cut = None if region is None else (region[0].start, region[0].stop, region[1].start, region[1].stop)
        return self._cached((path, frame, raw, cut), lambda: read_frame(path, frame, self.windows, facts, raw, region))

    def _cached(self, key: tuple, read) -> np.ndarray:
        """``read()``, kept for the next :attr:`keep` calls (the K slices of neighbouring slabs are read once)."""
        x = self._files.get(key)
        if x is None:
            x = read()
            self._files[key] = x
            while len(self._files) > self.keep:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(key)
        return x

