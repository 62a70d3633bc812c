"""Slabs and volumes of DICOM series: the ``dicom`` source's ``--sample slab:K|volume``.

:class:`VolumeSampler` turns the volumes of :func:`dicom_series.assemble` into sample
refs (one per slice for ``slab:K``, one per volume for ``volume``) and loads them. A slab's
slices go through the same decoding as a 2D file (:func:`dicom_decode.decode`: modality
LUT, window, MONOCHROME1), slice by slice; a mosaic is decoded once and cut into its
tiles. The last few decoded files are kept, so the K slices of neighbouring slabs are
read once.

A volume is resampled at its slices' positions along the normal (a missing slice is
interpolated across: :func:`sslkit.api.volume_fit`). Where every window is fixed (``W,L``,
presets) and the series is grayscale, it is resampled in modality values (HU for CT) and
windowed after, each window one channel, then MONOCHROME1 inverted, and padded with 0: what
an exported ``--with-preprocessing`` graph computes on the client's resampled values padded
with :meth:`VolumeSampler.pad_value` (the lowest window's lower bound). A per-file window
(``auto``: the file's own window or VOI LUT; ``minmax``) and colour keep the other order:
each slice windowed to [0, 1] as a 2D file, then resampled and padded with 0.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import numpy as np

from sslkit.api import SampleMode, SampleRef, slab_indices, stack_slab, volume_fit
from sslkit_plugins.sources.dicom_window import Window, linear_window
from sslkit_plugins.sources.dicom_mosaic import GRID_ISSUES
from sslkit_plugins.sources.dicom_pixels import read_frame
from sslkit_plugins.sources.dicom_series import Volume, cut_mosaic

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: what +-inf modality values become before resampling (a NaN: the lowest window bound, windowed to 0)
LARGE = 1e30


class VolumeSampler:
    """Refs and pixels of volumes in one :class:`SampleMode` (slab or volume).

    ``raw=True`` gives modality values (e.g. Hounsfield units) instead of windowed [0, 1].
    """

    def __init__(self, volumes: list[Volume], mode: SampleMode, windows: tuple[Window, ...],
                 headers: dict[str, dict[str, Any]] | None = None, keep: int = 16):
        self.volumes = volumes
        self.headers = headers or {}  # path -> its header facts (dicom_facts.FileFacts): where its pixels lie
        self.mode = mode
        self.windows = windows
        self.keep = keep
        self.where: dict[str, tuple[int, int | None]] = {}  # ref id -> (volume, slice or None)
        self._files: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}  # decoded slices stay in this process

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
        if i is None:
            return self._volume(vol, raw)
        return stack_slab([self.slice(vol, j, raw) for j in slab_indices(vol.depth, i, self.mode.slab)])

    def _volume(self, vol: Volume, raw: bool) -> np.ndarray:
        """``vol`` fitted to the mode; only the slices, rows and columns the fitted volume keeps are read."""
        fit = volume_fit((vol.depth, vol.rows, vol.columns), vol.spacing, self.mode, vol.distances)
        depth, rows, cols = fit.region
        photometric = self.modality_first(vol)
        if photometric is None and not raw:  # a per-file window, or colour: each slice windowed first
            return fit.apply(np.stack([self.slice(vol, j, False, (rows, cols))
                                       for j in range(depth.start, depth.stop)], axis=1))
        pad = self.pad_value(vol)
        values = np.stack([self.slice(vol, j, True, (rows, cols)) for j in range(depth.start, depth.stop)], axis=1)
        if not np.isfinite(values).all():  # NaN: the lowest lower bound, windowed to 0 as a 2D decode windows it
            low = min((w.level - w.width / 2 for w in self.windows), default=0.0) if photometric else 0.0
            values = np.nan_to_num(values, nan=low, posinf=LARGE, neginf=-LARGE)
        block = fit.compute(values)
        if raw:
            return fit.place(block, pad)
        out = np.stack([linear_window(block[0], w.width, w.level, "LINEAR_EXACT") for w in self.windows])
        if photometric == "MONOCHROME1":  # inverted after windowing, as a 2D decode does
            out = 1.0 - out
        return fit.place(out.astype(np.float32, copy=False), 0.0)

    def modality_first(self, vol: Volume) -> str | None:
        """The photometric interpretation of ``vol`` (MONOCHROME1 / 2) where it is resampled in modality
        values and windowed after: every window fixed and every file grayscale of that one kind;
        None where each slice is windowed first (``auto`` / ``minmax``, colour, mixed or unknown)."""
        if any(w.width is None for w in self.windows):
            return None
        kinds = set()
        for path in dict.fromkeys(s[0] for s in vol.slices):
            h = self.headers.get(path, {})
            kinds.add(str(h.get("photometric", "")).strip().upper() if h.get("samples_per_pixel") == 1 else "")
        kind = kinds.pop() if len(kinds) == 1 else None
        return kind if kind in MONOCHROME else None

    def pad_value(self, vol: Volume) -> float:
        """The modality value a volume's padding holds with ``raw=True``: the one every window maps to 0
        (the lowest lower bound; MONOCHROME1, inverted after windowing: the highest upper bound),
        so the raw volume windowed as training windows it gives the padding training gives. A
        per-file window has no such value: 0."""
        photometric = self.modality_first(vol)
        if photometric is None:
            return 0.0
        if photometric == "MONOCHROME1":
            return max(w.level + w.width / 2 for w in self.windows)
        return min(w.level - w.width / 2 for w in self.windows)

    def notes(self) -> list[tuple[str, str]]:
        """``(sample id, note)`` per volume whose slices are not evenly spaced (a missing slice, an
        uneven step), or a mosaic cut on its AcquisitionMatrix grid (its slice count missing or
        contradicting its image): what was done about it, for the run's data report (no file
        name, no UID)."""
        out = []
        for vol in self.volumes:
            out += [(f"series:{vol.key}", i) for i in vol.issues if i.startswith(GRID_ISSUES)]
            found = [i for i in vol.issues if "missing slices" in i or "non-uniform" in i]
            if found:
                done = ("resampled at the slices' positions along the normal (gaps interpolated across)"
                        if self.mode.volumetric else "slabs stack the nearest slices across the gaps")
                out.append((f"series:{vol.key}", f"{'; '.join(found)}: {done}"))
        return out

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

