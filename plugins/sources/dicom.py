"""Source ``dicom:PATH``: every DICOM image below PATH.

Indexing reads headers only (``stop_before_pixels``), in parallel processes for large
folders. Multi-frame files (enhanced CT/MR, ultrasound cine, tomosynthesis) give one
sample per frame; all frames of a file share its split group. Objects without pixel
data (SR, SEG, RTSTRUCT, PR, KO...) are skipped silently; unreadable files are skipped
with a reason. Decoding (modality LUT, windows, MONOCHROME1, colour) is in
:mod:`sslkit_plugins.sources.dicom_decode`.

Privacy: no identifier leaves this module. Split groups are salted hashes of PatientID
(else StudyInstanceUID, else the file) and exist only in memory; pydicom's warnings,
which can quote element values, are silenced; error reasons have quoted values removed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom

from sslkit.api import SampleRef, Source, Undecodable, check_dir, hookimpl, parallel_map, walk_files
from sslkit_plugins.sources.dicom_decode import decode, parse_windows, read_dataset

GROUP_SALT = b"sslkit-group-v1"
HEADER_FORMAT = 2  # bump when read_header() changes what it returns
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

    def __post_init__(self) -> None:
        parse_windows(self.window)  # a bad window is a usage error before any file is read


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
    return hashlib.sha256(GROUP_SALT + value.encode()).hexdigest()[:16]


def safe_reason(exc: BaseException) -> str:
    """``Type: message`` with quoted values removed (they can be element values)."""
    msg = " ".join(str(exc).split())
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", msg)
    return f"{type(exc).__name__}: {msg}"[:400]


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
            ds = read_dataset(path, stop_before_pixels=True)
        except Exception as exc:
            if is_dicom_file(p):
                return {"kind": "error", "reason": f"unreadable header: {safe_reason(exc)}"}
            return {"kind": "other"}
        try:
            modality = str(ds.get("Modality", "") or "unknown").upper()
            if "Rows" not in ds or "Columns" not in ds or modality in NON_IMAGE_MODALITIES:
                return {"kind": "nonimage"}
            ident = str(ds.get("PatientID", "") or "")
            group = f"patient:{ident}" if ident else f"study:{ds.get('StudyInstanceUID', '') or ''}"
            if group == "study:":
                group = f"file:{p.resolve()}"  # frames of one file stay together
            meta = getattr(ds, "file_meta", None)
            ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            ts_name = pydicom.uid.UID(ts).name if ts else "none (raw data set)"
            return {
                "kind": "image",
                "group": salted_hash(group),
                "modality": modality,
                "series": str(ds.get("SeriesDescription", "") or ""),
                "transfer_syntax": ts_name,
                "photometric": str(ds.get("PhotometricInterpretation", "") or "unknown"),
                "bits_stored": int(ds.get("BitsStored", 0) or 0),
                "rows": int(ds.Rows),
                "columns": int(ds.Columns),
                "frames": max(1, int(ds.get("NumberOfFrames", 1) or 1)),
                "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
            }
        except Exception as exc:
            return {"kind": "error", "reason": f"bad header value: {safe_reason(exc)}"}


class DicomSource(Source):
    scheme = "dicom"
    Options = DicomOptions

    def __init__(self, location: str, options: DicomOptions | None = None) -> None:
        super().__init__(location, options or DicomOptions())
        self.root = check_dir(location, self.scheme)
        self.windows = parse_windows(self.options.window)
        self.headers: dict[str, dict[str, Any]] = {}  # path -> read_header() of kept images
        self.filtered = 0  # images left out by --modality / --series-description
        self._last: tuple[str, Any] | None = None  # (path, dataset): frames of one file in a row

    @classmethod
    def sniff(cls, path: Path) -> float:
        if path.is_dir():
            for _, f in zip(range(200), path.rglob("*")):
                if f.is_file() and is_dicom_file(f):
                    return 0.9
        return 0.0

    def index(self) -> list[SampleRef]:
        files = [str(f) for f in walk_files(self.root, lambda p: True)]
        headers = self._headers(files)
        modalities = {m.strip().upper() for m in self.options.modality.split(",") if m.strip()}
        glob = self.options.series_description.lower()
        refs: list[SampleRef] = []
        for f, h in zip(files, headers):
            if h["kind"] == "error":
                self.skipped.append((f, h["reason"]))
            if h["kind"] != "image":
                continue
            if (modalities and h["modality"] not in modalities) or (
                glob and not fnmatch.fnmatch(h["series"].lower(), glob)
            ):
                self.filtered += 1
                continue
            self.headers[f] = {k: v for k, v in h.items() if k != "series"}
            n = h["frames"]
            if n == 1:
                refs.append(SampleRef(f, group=h["group"]))
            elif self.options.frames == "middle":
                refs.append(SampleRef(f, frame=n // 2, group=h["group"]))
            else:
                refs += [SampleRef(f, frame=i, group=h["group"]) for i in range(n)]
        return refs

    def _headers(self, files: list[str]) -> list[dict[str, Any]]:
        """:func:`read_header` of every file; unchanged files come from ``header_cache``."""
        store = None
        known: dict[str, list] = {}
        if self.header_cache is not None:
            root_id = hashlib.sha256(f"{HEADER_FORMAT}\0{self.root.resolve()}".encode()).hexdigest()[:24]
            store = Path(self.header_cache) / f"dicom-{root_id}.json"
            try:
                known = json.loads(store.read_text())
            except (OSError, ValueError):
                known = {}
        stamps = []
        for f in files:
            try:
                st = os.stat(f)
                stamps.append(f"{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                stamps.append("")
        todo = [i for i, (f, s) in enumerate(zip(files, stamps)) if not s or known.get(f, [None])[0] != s]
        # ~1-2 ms per header: processes pay off only for thousands of files
        fresh = parallel_map(read_header, [files[i] for i in todo], workers=self.options.workers, min_parallel=2000)
        headers = [known[f][1] if f in known else None for f in files]
        for i, h in zip(todo, fresh):
            headers[i] = h
        if store is not None and (todo or len(known) != len(files)):
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({f: [s, h] for f, s, h in zip(files, stamps, headers) if s}))
            os.replace(tmp, store)
        return headers

    def channels_of(self, ref: SampleRef) -> int | None:
        h = self.headers.get(ref.path)
        if h is None:
            return None
        if h["samples_per_pixel"] == 3 or h["photometric"] == "PALETTE COLOR":
            return 3
        return len(self.windows)

    def load(self, ref: SampleRef) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if self._last is not None and self._last[0] == ref.path:
                    ds = self._last[1]
                else:
                    self._last = None
                    ds = read_dataset(ref.path)
                # keep a multi-frame file for its next frame; let go after its last one
                frames = self.headers.get(ref.path, {}).get("frames", 1)
                keep = ref.frame is not None and frames > 1 and ref.frame < frames - 1
                self._last = (ref.path, ds) if keep else None
                return decode(ds, ref.frame, self.windows)
            except Exception as exc:
                raise Undecodable(safe_reason(exc)) from None

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
        }

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
        }


@hookimpl
def register_sources(register):
    register("dicom", DicomSource)
