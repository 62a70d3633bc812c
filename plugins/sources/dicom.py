"""Source ``dicom:PATH``: every DICOM image below PATH.

Indexing reads headers only (``stop_before_pixels``), in parallel processes for large
folders. Multi-frame files (enhanced CT/MR, ultrasound cine, tomosynthesis) give one
sample per frame; all frames of a file share its split group. Objects without pixel
data (SR, SEG, RTSTRUCT, PR, KO...) are skipped silently; unreadable files, and image files
that are not DICOM (PNG, JPEG...), are skipped with a reason. Decoding (modality LUT, windows,
MONOCHROME1, colour) is in :mod:`sslkit_plugins.sources.dicom_decode`.

Labels for ``eval``: the first folder below PATH, however deep the file, as for image folders
and NIfTI (:mod:`sslkit_plugins.sources.dicom_labels`).

Privacy: no identifier leaves this module. Split groups are salted hashes of PatientID
(else StudyInstanceUID, else the file) and exist only in memory; pydicom's warnings,
which can quote element values, are silenced; error reasons have quoted values removed, and any word
naming the file's identifying header values (or holding a person name's ``^``) too
(:func:`~sslkit_plugins.sources.dicom_reasons.safe_reason`). A class folder holding one patient of its
own is labelled ``folder K (one patient)``, not by its name (:mod:`.dicom_labels`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom

from sslkit.api import SampleMode, SampleRef, Source, Undecodable, check_dir, first_files, hookimpl, walk_files
from sslkit.api import IMAGE_SUFFIXES, GraphPreprocessing, UsageError, check_pixel_count, keyed_hash
from sslkit_plugins.sources.dicom_decode import codec_failure, decode, read_dataset
from sslkit_plugins.sources.dicom_window import parse_windows
from sslkit_plugins.sources.dicom_facts import FileFacts, kept_facts
from sslkit_plugins.sources.dicom_headers import cached_headers, stable_groups
from sslkit_plugins.sources.dicom_labels import (class_of, named_levels, not_patient_folders, patient_named_classes,
                                                 series_labelled)
from sslkit_plugins.sources.dicom_limits import TooLarge, frame_count
from sslkit_plugins.sources.dicom_pixels import decode_located, pixel_facts, read_frame
from sslkit_plugins.sources.dicom_reasons import (NOT_DICOM_IMAGE, failure_reason, header_of, incomplete_image,
                                                  safe_reason)
from sslkit_plugins.sources.dicom_series import assemble, geometry
from sslkit_plugins.sources.dicom_values import has, transfer_syntax, value
from sslkit_plugins.sources.dicom_volume import VolumeSampler

GROUP_SALT = b"sslkit-group-v1"
HEADER_FORMAT = 10  # bump when read_header() changes what it returns
#: objects that carry Rows/Columns (or even pixels) but are not images to learn from
NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "SEG", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD", "DOC", "ECG"}
logging.getLogger("pydicom").setLevel(logging.ERROR)


@dataclass
class DicomOptions:
    """``--data-opt`` options of the ``dicom`` source (``--window`` etc. map onto them)."""

    window: str = "auto"  # auto | minmax | W,L | PRESET | PRESET,PRESET,PRESET
    modality: str = ""  # keep only these modalities, e.g. "CT,MR" (empty: all)
    series_description: str = ""  # keep only series whose description matches this glob
    frames: Literal["all", "middle"] = "all"  # multi-frame files: every frame, or the middle one
    workers: int = 0  # header-reading processes (0: one per CPU, serial for small folders)
    sample: str = "slice"  # slice | slab:K | volume (series assembled in space: dicom_series.py)
    spacing: str = ""  # volume mode: resample to X[,Y,Z] mm (empty: the series' own)
    volume_size: str = ""  # volume mode: crop / pad to D,H,W voxels

    def __post_init__(self) -> None:
        parse_windows(self.window)  # a bad window is a usage error before any file is read
        SampleMode.parse(self.sample, self.spacing, self.volume_size)
        if self.workers < 0:
            raise UsageError(f"dicom option workers={self.workers}: give 0 (one per CPU) or a number of processes")
        if unclosed_bracket(self.series_description):  # fnmatch would take the '[' literally, silently
            raise UsageError(f"dicom option series_description={self.series_description!r} (--series-description): "
                             "the glob has an unclosed '['; write [[] to match a literal '['")


def unclosed_bracket(glob: str) -> bool:
    """Whether ``glob`` has a ``[`` that :func:`fnmatch.translate` finds no ``]`` for (scanned as it does)."""
    i = 0
    while (i := glob.find("[", i) + 1) > 0:
        j = i + glob.startswith("!", i)
        j += glob.startswith("]", j)  # a ']' first in the set is a member, not the end
        if (i := glob.find("]", j) + 1) == 0:
            return True
    return False


def is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def salted_hash(value: str) -> str:
    return hashlib.sha256(GROUP_SALT + value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def read_header(path: str) -> dict[str, Any]:
    """Header facts of one file, without pixels and without identifiers.

    ``{"kind": "image" | "nonimage" | "other" | "error", ...}``: images carry ``group``
    (salted hash), ``modality``, ``series`` (description, for filtering only),
    ``transfer_syntax``, ``photometric``, ``bits_stored``, ``rows``, ``columns``,
    ``frames`` and ``samples_per_pixel``.
    """
    p = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open(p, "rb") as fp:
                ds = read_dataset(fp, stop_before_pixels=True)
                has_pixels = fp.tell() < os.fstat(fp.fileno()).st_size  # pydicom stops early only at pixel data
                pixels = located_pixels(ds, fp)
        except Exception as exc:
            if isinstance(exc, OSError) or is_dicom_file(p):  # OSError: e.g. no read permission
                return {"kind": "error", "reason": f"unreadable header: {safe_reason(exc)}"}
            return {"kind": "other"}
        try:
            modality = str(value(ds, "Modality", "") or "unknown").upper()
            if modality in NON_IMAGE_MODALITIES:
                return {"kind": "nonimage"}
            missing = [k for k in ("Rows", "Columns") if not has(ds, k)]
            if missing:
                why = incomplete_image(ds, has_pixels, " and ".join(missing))
                return {"kind": "error", "reason": why} if why else {"kind": "nonimage"}
            ident = str(value(ds, "PatientID", "") or "")
            group = f"patient:{ident}" if ident else f"study:{value(ds, 'StudyInstanceUID', '') or ''}"
            if group == "study:":
                group = f"file:{p.resolve()}"  # frames of one file stay together
            ts = transfer_syntax(ds)
            ts_name = ts.name if ts else "none (raw data set)"
            return {
                "kind": "image",
                "group": salted_hash(group),
                "named_levels": named_levels(path, str(value(ds, "PatientName", "") or ""), ident),
                "modality": modality,
                "series": str(value(ds, "SeriesDescription", "") or ""),
                "transfer_syntax": ts_name,
                "photometric": str(value(ds, "PhotometricInterpretation", "") or "unknown"),
                "bits_stored": int(value(ds, "BitsStored", 0) or 0),
                "rows": int(value(ds, "Rows")),
                "columns": int(value(ds, "Columns")),
                "frames": frame_count(ds, p),
                "samples_per_pixel": int(value(ds, "SamplesPerPixel", 1) or 1),
                **geometry(ds, p),
                "pixels": pixels,
            }
        except Exception as exc:
            return {"kind": "error", "reason": f"bad header value: {safe_reason(exc, ds)}"}


def located_pixels(ds: pydicom.Dataset, fp: Any) -> dict[str, Any] | None:
    """:func:`pixel_facts`, None on any surprise (the decode then reads the file in full)."""
    try:
        return pixel_facts(ds, fp)
    except Exception:
        return None


class DicomSource(Source):
    scheme = "dicom"
    Options = DicomOptions
    options_not_in_cache_key = frozenset({"workers"})  # header-reading processes: the same pixels

    def __init__(self, location: str, options: DicomOptions | None = None) -> None:
        super().__init__(location, options or DicomOptions())
        self.root = check_dir(location, self.scheme)
        self.windows = parse_windows(self.options.window)
        self.sample = SampleMode.parse(self.options.sample, self.options.spacing, self.options.volume_size)
        self.sampler: VolumeSampler | None = None  # slab / volume modes, set by index()
        self.headers: dict[str, FileFacts] = {}  # path -> what loading needs of its read_header() (kept images)
        self.filtered = 0  # images left out by --modality / --series-description
        self._last: tuple[str, Any] | None = None  # (path, dataset): frames of one file in a row

    @classmethod
    def sniff(cls, path: Path) -> float:
        if path.is_dir():
            if any(f.is_file() and is_dicom_file(f) for f in first_files(path)):
                return 0.9
        return 0.0

    def index(self) -> list[SampleRef]:
        files = [str(f) for f in walk_files(self.root, lambda p: True, self.skipped)]
        headers = self._headers(files)
        modalities = {m.strip().upper() for m in self.options.modality.split(",") if m.strip()}
        glob = self.options.series_description.lower()
        refs: list[SampleRef] = []
        kept: dict[str, dict[str, Any]] = {}  # path -> read_header(), for the series' geometry
        groups: dict[str, str] = {}  # one string per split group, not one per file
        for f, h in zip(files, headers):
            if h["kind"] == "error":
                self.skipped.append((f, h["reason"]))
            elif h["kind"] == "other" and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                self.skipped.append((f, NOT_DICOM_IMAGE))  # a bare path sniffed as DICOM: not silently
            if h["kind"] != "image":
                continue
            if (modalities and h["modality"] not in modalities) or (
                glob and not fnmatch.fnmatch(h["series"].lower(), glob)
            ):
                self.filtered += 1
                continue
            try:  # from the header, before anything is decoded
                check_pixel_count(h["columns"], h["rows"], self.max_pixels)
            except Undecodable as exc:
                self.skipped.append((f, str(exc)))
                continue
            if h.get("mosaic_error") and self.sample.mode != "slice":  # its tiles cannot be cut
                self.skipped.append((f, h["mosaic_error"]))
                continue
            kept[f] = h
            n, group, label = h["frames"], groups.setdefault(h["group"], h["group"]), class_of(f, self.root)
            if n == 1:
                refs.append(SampleRef(f, group=group, label=label))
            elif self.options.frames == "middle":
                refs.append(SampleRef(f, frame=n // 2, group=group, label=label))
            else:
                refs += [SampleRef(f, frame=i, group=group, label=label) for i in range(n)]
        self.headers = kept_facts(kept)  # a few facts a file, shared values once: workers get a copy
        return not_patient_folders(refs if self.sample.mode == "slice" else self._volume_refs(kept),
                                   patient_named_classes(self.headers, self.root))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": None}  # a decoded file's data set stays here

    def patient_folders(self, ref: SampleRef) -> tuple[int, ...]:
        return tuple(self.headers.get(ref.path, {}).get("named_levels", ()))

    def _volume_refs(self, headers: dict[str, dict[str, Any]]) -> list[SampleRef]:
        """Slab / volume mode: refs of the series assembled in space (no geometry: skipped in volume mode)."""
        volumes = assemble(headers, self.root)
        self.skipped += [d for v in volumes for d in v.dropped]
        if self.sample.volumetric:
            self.skipped += [(v.slices[0][0], "not a volume: no slice geometry") for v in volumes
                             if "no slice geometry" in v.issues]
            volumes = [v for v in volumes if "no slice geometry" not in v.issues]
        self.sampler = VolumeSampler(volumes, self.sample, self.windows, self.headers)
        return series_labelled(self.sampler.refs(), self.sampler.volume_of, self.root)

    def _headers(self, files: list[str]) -> list[dict[str, Any]]:
        """:func:`read_header` of every file (unchanged files from ``header_cache``), with
        split groups named by their first file (:func:`stable_groups`)."""
        # series keys in the index are keyed hashes: another secret is another index
        version = f"{HEADER_FORMAT}.{keyed_hash('header-index', 'dicom-headers', 12)}"
        headers = cached_headers(files, self.root, self.header_cache, read_header, self.options.workers, version,
                                 need_text=bool(self.options.series_description))
        return stable_groups(files, headers, self.root)

    def channels_of(self, ref: SampleRef) -> int | None:
        h = self.headers.get(ref.path)
        if h is None:
            return None
        if h["samples_per_pixel"] == 3 or h["photometric"] == "PALETTE COLOR":
            return self.sample.channels(3)
        return self.sample.channels(len(self.windows))

    def load(self, ref: SampleRef) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if self.sampler is not None:
                    return self.sampler.load(ref)
                facts = self.headers.get(ref.path, {}).get("pixels")
                located = decode_located(ref.path, ref.frame, self.windows, facts) if facts else None
                if located is not None:  # the pixel bytes alone, where the index found them
                    return located
                if self._last is not None and self._last[0] == ref.path:
                    ds = self._last[1]
                else:
                    self._last = None
                    ds = read_dataset(ref.path)
                # keep a multi-frame file for its next frame; let go after its last one
                frames = self.headers.get(ref.path, {}).get("frames", 1)
                keep = ref.frame is not None and frames > 1 and ref.frame < frames - 1
                self._last = (ref.path, ds) if keep else None
                check_pixel_count(int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), self.max_pixels)
                try:
                    return decode(ds, ref.frame, self.windows)  # checks the stream's own size first
                except TooLarge as exc:  # its reason is not a codec's failure
                    raise Undecodable(failure_reason(exc, "cannot decode", ds)) from None
                except Exception as exc:
                    raise Undecodable(codec_failure(ds, safe_reason(exc, ds))
                                      or failure_reason(exc, "bad header value", ds)) from None
            except Undecodable:
                raise
            except Exception as exc:
                raise Undecodable(failure_reason(exc, "cannot decode", header_of(ref.path))) from None

    def load_raw(self, ref: SampleRef) -> np.ndarray:
        """:meth:`load` before windowing: modality values (e.g. HU), float32 (grayscale only)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if self.sampler is not None:
                    return self.sampler.load(ref, raw=True)
                facts = self.headers.get(ref.path, {}).get("pixels")
                return read_frame(ref.path, ref.frame, self.windows, facts, raw=True)
            except Exception as exc:
                raise Undecodable(failure_reason(exc, "cannot decode", header_of(ref.path))) from None

    def spacing_of(self, ref: SampleRef) -> list[float] | None:
        """Voxel spacing of ``load(ref)`` in mm: ``[dz, dy, dx]`` (volume) or ``[dy, dx]``, None if unknown."""
        if self.sampler is not None:
            return self.sampler.spacing_of(ref)
        ps = self.headers.get(ref.path, {}).get("pixel_spacing")
        return [float(v) for v in ps] if ps else None

    def notes(self) -> list[tuple[str, str]]:
        """Series whose slices are not evenly spaced, and what volume / slab mode did about it."""
        return self.sampler.notes() if self.sampler is not None else []

    def files_of(self, ref: SampleRef) -> list[str]:
        """The files ``load(ref)`` reads (for the cache key): a slab's or a volume's slices."""
        return self.sampler.files_of(ref) if self.sampler is not None else [ref.path]

    def sample_id(self, ref: SampleRef) -> str:
        """What ``sslkit embed`` calls a sample: ``series:<keyed hash>`` for a volume, else ``ref.id``."""
        return self.sampler.sample_id(ref) if self.sampler is not None else ref.id

    def properties(self, ref: SampleRef) -> dict[str, Any]:
        """Header facts for ``sslkit data inspect`` (no identifiers)."""
        h = self.headers.get(ref.path, {})
        return {
            "modality": h.get("modality"),
            "transfer_syntax": h.get("transfer_syntax"),
            "photometric": h.get("photometric"),
            "bits_stored": h.get("bits_stored"),
            "size": f"{h.get('columns')}x{h.get('rows')}",
            "frames": h.get("frames"),
            "samples_per_pixel": h.get("samples_per_pixel"),
            **(self._volume_properties(ref) if self.sampler else {}),
        }

    def _volume_properties(self, ref: SampleRef) -> dict[str, Any]:
        """Slab / volume mode: the volume's depth, slice size (a mosaic's tile) and issues."""
        vol = self.sampler.volume_of(ref)
        return {"size": f"{vol.columns}x{vol.rows}", "depth": vol.depth, "volume_issues": "; ".join(vol.issues) or "none"}

    def describe(self) -> dict:
        return {
            "modality_lut": True,
            "window": [w.describe() for w in self.windows],
            "auto": "file's first VOI window or VOI LUT, else min-max",
            "monochrome1": "inverted after windowing",
            "colour": "RGB (YBR and palette converted)",
            "frames": self.options.frames,
            "modality_filter": self.options.modality or None,
            "series_filter": self.options.series_description or None,
            **self.sample.describe(),
        }

    def graph_preprocessing(self) -> GraphPreprocessing:
        """Fixed windows (presets, ``W,L``) go into an exported graph, which then takes modality
        values; ``auto`` / ``minmax`` choose a window per file, which the client must apply."""
        if any(w.width is None for w in self.windows):
            return GraphPreprocessing("unit", client=(
                "the run used a per-file DICOM window (auto/minmax) that no fixed graph can apply: the client "
                "windows each file to [0, 1] as the run did; the graph normalises"))
        return GraphPreprocessing(
            "window", tuple(w.level - w.width / 2 for w in self.windows),
            tuple(w.level + w.width / 2 for w in self.windows), options=("window",), client=(
                "client passes modality values (HU for CT) after RescaleSlope/Intercept; " + (
                    "MONOCHROME1: reflect them in the window first (lower + upper - value)" if len(self.windows) == 1
                    else "MONOCHROME1 and colour files cannot use this graph (a stack of windows has no single "
                         "reflection)")))


@hookimpl
def register_sources(register):
    register("dicom", DicomSource)
