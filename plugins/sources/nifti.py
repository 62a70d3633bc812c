"""Source ``nifti:PATH``: NIfTI volumes (``.nii``, ``.nii.gz``), one file or every file below a folder.

Read with nibabel (sslkit's ``volumes`` extra: ``pip install '.[volumes]'`` in the checkout). Each 3D image is one volume; a 4D
image is one volume per time point. Voxels are scaled by the header (``scl_slope`` /
``scl_inter``), the volume is turned to its closest canonical (RAS+) axes and laid out
as an axial DICOM series is displayed (:data:`sslkit.api.ORIENTATION`): D inferior to
superior, H anterior to posterior, W right to left; spacing ``(dz, dy, dx)`` comes from
the voxel sizes of the affine (sform, else qform: the geometry the voxels are laid out by, not
the header's pixdim where the two disagree). A ``.nii.gz`` is decompressed whole, so a corrupt
stream is an error (its CRC), not garbage voxels. Class sub-folders give labels to ``eval``, as
for image folders. ``--window`` maps values to [0, 1]: ``minmax`` over the whole volume
(default) or a linear ``W,L`` in the file's units (e.g. Hounsfield units for CT).

``--sample`` (:class:`sslkit.api.SampleMode`): ``slice`` (one 2D image per axial slice),
``slab:K`` or ``volume``. A volume is resampled in the file's units and mapped to [0, 1] after
(as MONAI's Spacing then ScaleIntensityRange; the same order an exported ``--with-preprocessing``
graph needs: the client resamples values, the graph windows them), padded with 0 in [0, 1];
``load_raw`` pads with the value the window maps to 0 (:meth:`NiftiSource.pad_value`).

Only headers are read by ``index()``, and a file is skipped there, before any voxel is read, when
its slices exceed ``--max-pixels`` or it cannot hold the voxels its header declares (a ``.nii``
shorter than them; a ``.nii.gz`` smaller than them over gzip's largest expansion, 1032:1): a
crafted 1 KB header never becomes a 100 TB allocation; so is one whose voxels, as stored and as float32,
exceed 16 bytes per pixel of ``--max-pixels`` (what a 2D image at the limit takes to decode), and an empty
image (a dimension of 0).
Every file is its own split group: a hash of its path relative to the data root (a single file: its
name), so ``./vols``, ``/abs/vols`` and a link to it give the same groups, hence the same ``--val-fraction``
split and eval folds (:func:`group_key`); ``--data-opt group_key=as-given`` keeps the hash of the path as
``--data`` spelled it, what runs recorded before gave (:attr:`NiftiSource.legacy_option_values`). Nothing
from the header's free-text fields (``descrip``, ``db_name``, ``aux_file``) is read.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sslkit.api import (ORIENTATION, GraphPreprocessing, SampleMode, SampleRef, Source, Undecodable, UsageError,
                        check_dir, check_pixel_count, first_files, hookimpl, slab_indices, stack_slab,
                        unknown_name_message, volume_fit, walk_files)
from sslkit_plugins.sources.nifti_read import (BYTES_PER_LIMIT_PIXEL, canonical_geometry, canonical_volume, check_holds,
                                               check_working_bytes, nibabel_module, read_header, read_image)

SUFFIXES = (".nii", ".nii.gz")
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)"
#: what +-inf values become before a volume is resampled (a NaN becomes the pad value: mapped to 0)
LARGE = 1e30
#: how a file's split group is keyed (:func:`group_key`): its path below the data root, or (runs recorded
#: before that) its path as ``--data`` spelled it
GROUP_KEYS = ("relative", "as-given")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def group_key(path: str, root: Path, how: str = "relative") -> str:
    """The split group of file ``path`` found below ``root`` (the data root, or the file itself): a hash of its
    path relative to ``root`` (POSIX, a single file's name), the same however ``root`` is spelled (relative,
    absolute, through a link); ``how="as-given"``: a hash of ``path`` as spelled, the key of runs recorded before.
    Never a name: a folder below the root may carry a patient's (the key is only compared, never stored)."""
    if how == "as-given":
        return hashlib.sha256(b"sslkit-nifti-v1" + path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    rel = Path(path).relative_to(root).as_posix() if root.is_dir() else Path(path).name
    return hashlib.sha256(b"sslkit-nifti-v2\0" + rel.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def parse_window(text: str) -> tuple[float, float] | None:
    """``"minmax"`` -> None; ``"W,L"`` or ``"W:L"`` -> (width, level)."""
    text = (text or "minmax").strip().lower().replace(" ", "")
    if text == "minmax":
        return None
    m = re.fullmatch(f"({_NUM})[,:]({_NUM})", text)
    if not m or not float(m.group(1)) > 0:
        raise UsageError(f"nifti: --window {text!r} is not minmax or W,L with W > 0 (e.g. 400,40)")
    return float(m.group(1)), float(m.group(2))


@dataclass
class NiftiOptions:
    """``--data-opt`` options of the ``nifti`` source."""

    window: str = "minmax"  # minmax (over the volume) | W,L in the file's units
    sample: str = "slice"  # slice | slab:K | volume
    spacing: str = ""  # volume mode: resample to X[,Y,Z] mm (empty: the file's own)
    volume_size: str = ""  # volume mode: crop / pad to D,H,W voxels
    group_key: str = "relative"  # split groups: relative (path below the data root) | as-given (runs recorded before)

    def __post_init__(self) -> None:
        parse_window(self.window)
        if self.group_key not in GROUP_KEYS:
            raise UsageError(f"nifti: {unknown_name_message('group_key', self.group_key, GROUP_KEYS)}")
        SampleMode.parse(self.sample, self.spacing, self.volume_size)


class NiftiSource(Source):
    scheme = "nifti"
    Options = NiftiOptions
    #: any slice loads (decompresses) its whole file: the first decoding pass gives each file to one process
    loads_whole_file = True
    options_not_in_cache_key = frozenset({"group_key"})  # split groups only: the same pixels
    #: what a run recorded before ``group_key`` existed used: a resume keeps its split (and so its data fingerprint)
    legacy_option_values = {"group_key": "as-given"}

    def __init__(self, location: str, options: NiftiOptions | None = None) -> None:
        super().__init__(location, options or NiftiOptions())
        nibabel_module()
        path = Path(location).expanduser()
        self.root = path if path.is_file() else check_dir(location, self.scheme)
        self.window = parse_window(self.options.window)
        self.sample = SampleMode.parse(self.options.sample, self.options.spacing, self.options.volume_size)
        self.volumes: list[tuple[str, int, int]] = []  # (path, time point, depth)
        self.facts: dict[str, tuple[str, int]] = {}  # path -> ("WxH" of a slice as loaded, time points): header
        self.where: dict[str, tuple[int, int | None]] = {}  # ref id -> (volume, slice or None)
        self._last: tuple[str, np.ndarray, tuple] | None = None  # (path, (T, D, H, W), spacing)
        self._ranges: dict[tuple[str, int], tuple[float, float]] = {}  # min-max of each volume

    def __getstate__(self):
        return {**self.__dict__, "_last": None, "_ranges": {}}

    @classmethod
    def sniff(cls, path: Path) -> float:
        if path.is_file():
            return 0.95 if is_nifti(path) else 0.0
        if path.is_dir():
            if any(is_nifti(f) for f in first_files(path)):
                return 0.8
        return 0.0

    def index(self) -> list[SampleRef]:
        files = [self.root] if self.root.is_file() else walk_files(self.root, is_nifti, self.skipped)
        refs: list[SampleRef] = []
        for f in map(str, files):
            try:
                img = read_header(f)
                shape = canonical_geometry(img)[0]
            except Exception as exc:  # nibabel's message may quote the path: the type alone, or sslkit's own
                why = str(exc) if isinstance(exc, Undecodable) else type(exc).__name__
                self.skipped.append((f, f"unreadable NIfTI header: {why}"))
                continue
            if len(shape) not in (3, 4):
                self.skipped.append((f, f"not a volume: {len(shape)} dimensions"))
                continue
            if 0 in shape:
                self.skipped.append((f, f"empty image: shape {'x'.join(map(str, shape))}"))
                continue
            try:  # from the header and the file's size, before any voxel is read
                check_pixel_count(int(shape[0]), int(shape[1]), self.max_pixels)
                check_holds(Path(f), img)
                check_working_bytes(img, self.max_pixels)
            except ValueError as exc:  # Undecodable too
                self.skipped.append((f, str(exc)))
                continue
            group = group_key(f, self.root, self.options.group_key)
            parts = Path(f).relative_to(self.root).parts if self.root.is_dir() else ()
            label = parts[0] if len(parts) > 1 else None  # the first folder below the root is the class, as folder's
            depth = int(shape[2])
            points = int(shape[3]) if len(shape) == 4 else 1
            self.facts[f] = (f"{int(shape[0])}x{int(shape[1])}", points)  # W: x (R-L), H: y (A-P), as loaded
            for t in range(points):
                v = len(self.volumes)
                self.volumes.append((f, t, depth))
                if self.sample.volumetric:
                    ref = SampleRef(f, t if len(shape) == 4 else None, group, label=label)
                    self.where[ref.id] = (v, None)
                    refs.append(ref)
                    continue
                for z in range(depth):
                    ref = SampleRef(f, t * depth + z, group, label=label)
                    self.where[ref.id] = (v, z)
                    refs.append(ref)
        return refs

    def channels_of(self, ref: SampleRef) -> int | None:
        return self.sample.channels(1)

    def _volume(self, path: str) -> tuple[np.ndarray, tuple]:
        if self._last is None or self._last[0] != path:
            vol, spacing = canonical_volume(read_image(path))
            self._last = (path, vol, spacing)
        return self._last[1], self._last[2]

    def _range(self, volume: np.ndarray, key: tuple[str, int]) -> tuple[float, float]:
        """The finite min and max of the whole ``volume`` (kept per volume)."""
        if key not in self._ranges:
            lo, hi = math.inf, -math.inf
            for plane in volume.reshape(-1, *volume.shape[-2:]):  # a slice at a time: no volume-sized mask
                finite = plane[np.isfinite(plane)]
                if finite.size:
                    lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            self._ranges[key] = (lo, hi) if lo <= hi else (0.0, 0.0)
        return self._ranges[key]

    def to_unit(self, x: np.ndarray, volume: np.ndarray, key: tuple[str, int]) -> np.ndarray:
        """Values -> [0, 1]: the window, or min-max over the whole ``volume``."""
        if self.window is None:
            lo, hi = self._range(volume, key)
            y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        else:
            w, level = self.window
            y = (x - level) / w + 0.5
        return np.clip(np.nan_to_num(y), 0.0, 1.0).astype(np.float32)

    def pad_value(self, volume: np.ndarray, key: tuple[str, int]) -> float:
        """The value in the file's units that :meth:`to_unit` maps to 0: the window's lower bound, or
        the volume's minimum (min-max): what ``load_raw`` pads a volume with."""
        if self.window is None:
            return self._range(volume, key)[0]
        w, level = self.window
        return level - w / 2

    def _fit(self, volume: np.ndarray, spacing: tuple, key: tuple[str, int], raw: bool) -> np.ndarray:
        """``(1, D, H, W)``: ``volume`` resampled in the file's units, cropped, then mapped to [0, 1]
        and padded with 0 (``raw``: not mapped, padded with :meth:`pad_value`)."""
        fit = volume_fit(volume.shape, spacing, self.sample)
        pad = self.pad_value(volume, key)
        x = volume[None][(slice(None), *fit.region)]
        if not np.isfinite(x).all():  # NaN: the pad value (mapped to 0, as to_unit maps a NaN)
            x = np.nan_to_num(x, nan=pad, posinf=LARGE, neginf=-LARGE)
        block = fit.compute(x)
        return fit.place(block, pad) if raw else fit.place(self.to_unit(block, volume, key), 0.0)

    def load(self, ref: SampleRef, raw: bool = False) -> np.ndarray:
        """``(1, H, W)`` slice, ``(K, H, W)`` slab or ``(1, D, H, W)`` volume; ``raw``: file units."""
        try:
            v, z = self.where[ref.id]
            path, t, depth = self.volumes[v]
            vols, spacing = self._volume(path)
            vol = vols[t]
            unit = (lambda x: x) if raw else (lambda x: self.to_unit(x, vol, (path, t)))
            if z is None:
                return self._fit(vol, spacing, (path, t), raw)
            return stack_slab([unit(vol[i])[None] for i in slab_indices(depth, z, self.sample.slab)])
        except (OSError, ValueError, EOFError) as exc:
            raise Undecodable(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None

    def load_raw(self, ref: SampleRef) -> np.ndarray:
        """:meth:`load` before the window: float32 values in the file's units."""
        return self.load(ref, raw=True)

    def spacing_of(self, ref: SampleRef) -> list[float]:
        """``[dz, dy, dx]`` mm of a loaded volume (the mode's spacing, else the file's), ``[dy, dx]`` of a slice."""
        v, z = self.where[ref.id]
        zooms = canonical_geometry(read_header(self.volumes[v][0]))[1]
        native = [zooms[2], zooms[1], zooms[0]]
        if z is None:
            return list(self.sample.spacing or native)
        return native[1:]

    def properties(self, ref: SampleRef) -> dict[str, Any]:
        """Header facts for ``sslkit data inspect``: ``size`` (``WxH`` of a slice as loaded), ``depth``
        (slices) and ``time_points`` (volumes in the file: a 4D image has one per time point)."""
        v, _ = self.where.get(ref.id, (None, None))
        if v is None:
            return {}
        path, _, depth = self.volumes[v]
        size, points = self.facts[path]
        return {"size": size, "depth": depth, "time_points": points}

    def orientation(self) -> str:
        """How :meth:`load` lays its arrays out (for ``sslkit data dump``): turned to RAS+, not as stored."""
        axes = "H anterior to posterior, W right to left (the closest canonical RAS+ axes, not as stored)"
        if self.sample.mode == "slice":
            return f"axial slices as displayed: {axes}"
        return f"{ORIENTATION}; D inferior to superior, {axes}"

    def describe(self) -> dict[str, Any]:
        return {
            "window": "min-max over the volume" if self.window is None else f"W {self.window[0]:g}, L {self.window[1]:g}",
            "scaling": "NIfTI scl_slope / scl_inter",
            "axes": "closest canonical (RAS+), laid out as a displayed axial series",
            **self.sample.describe(),
            **({"orientation": self.orientation()} if self.sample.mode != "slice" else {}),  # RAS+, not as stored
        }

    def graph_preprocessing(self) -> GraphPreprocessing:
        """A ``W,L`` window goes into an exported graph, which then takes values in the file's
        units; ``minmax`` is per volume, so the client applies it."""
        if self.window is None:
            return GraphPreprocessing("unit", client=(
                "the run scaled each volume by its own min-max, which no fixed graph can apply: the client "
                "does the same; the graph normalises"))
        w, level = self.window
        return GraphPreprocessing("window", (level - w / 2,), (level + w / 2,), options=("window",),
                                  client="client passes values in the file's units (after scl_slope / scl_inter)")


@hookimpl
def register_sources(register):
    register("nifti", NiftiSource)
