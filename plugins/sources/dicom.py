"""Source ``dicom:PATH``: every DICOM image below PATH.

Pixels go through pydicom: modality LUT (rescale slope/intercept) in float32, then the
file's first VOI window (or min-max when it has none) to [0, 1]; MONOCHROME1 is inverted
so that high attenuation is bright. Files without pixel data (SR, SEG, ...) are skipped
as non-images; files that fail to decode are skipped and reported, never a crash.
No patient identifier leaves this module: splits group by a salted hash of PatientID.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, pixel_array

import sslkit
from sslkit.data.source import SampleRef, Source

from sslkit_plugins.sources.folder import check_dir, walk_files

GROUP_SALT = b"sslkit-group-v1"


@dataclass
class DicomOptions:
    pass


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


class DicomSource(Source):
    scheme = "dicom"
    Options = DicomOptions

    def __init__(self, location: str, options=None) -> None:
        super().__init__(location, options)
        self.root = check_dir(location, self.scheme)
        self._channels: dict[str, int] = {}

    @classmethod
    def sniff(cls, path: Path) -> float:
        if path.is_dir():
            for _, f in zip(range(200), path.rglob("*")):
                if f.is_file() and is_dicom_file(f):
                    return 0.9
        return 0.0

    def index(self) -> list[SampleRef]:
        refs: list[SampleRef] = []
        for f in walk_files(self.root, lambda p: True):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception as exc:
                if is_dicom_file(f):
                    self.skipped.append((str(f), f"unreadable header: {type(exc).__name__}"))
                continue
            try:
                if "Rows" not in ds or "Columns" not in ds:
                    continue  # not an image (SR, KO, RTSTRUCT, ...)
                group = salted_hash(str(ds.get("PatientID", "") or ds.get("StudyInstanceUID", "") or f))
                channels = int(ds.get("SamplesPerPixel", 1))
                frames = int(ds.get("NumberOfFrames", 1) or 1)
            except Exception as exc:
                self.skipped.append((str(f), f"bad header value: {type(exc).__name__}: {exc}"))
                continue
            self._channels[str(f)] = channels
            if frames > 1:
                refs += [SampleRef(str(f), frame=i, group=group) for i in range(frames)]
            else:
                refs.append(SampleRef(str(f), group=group))
        return refs

    def channels_of(self, ref: SampleRef) -> int | None:
        return self._channels.get(ref.path)

    def load(self, ref: SampleRef) -> np.ndarray:
        ds = pydicom.dcmread(ref.path)
        if "PixelData" not in ds:
            raise ValueError("no pixel data")
        arr = pixel_array(ds, index=ref.frame)
        spp = int(ds.get("SamplesPerPixel", 1))
        if spp == 3:
            if arr.ndim == 4:
                arr = arr[0]
            bits = int(ds.get("BitsStored", 8))
            return (arr.astype(np.float32) / float(2**bits - 1)).transpose(2, 0, 1).copy()
        if arr.ndim == 3:  # multi-frame read whole; take the first frame
            arr = arr[0]
        x = apply_modality_lut(arr, ds).astype(np.float32)
        window = _first_window(ds)
        if window is not None:
            center, width = window
            lo, hi = center - width / 2, center + width / 2
        else:
            lo, hi = float(x.min()), float(x.max())
        x = np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)
        if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
            x = 1.0 - x
        return x[None].astype(np.float32)

    def describe(self) -> dict:
        return {"modality_lut": True, "window": "auto (file's first VOI window, else min-max)",
                "monochrome1": "inverted"}


def _first_window(ds) -> tuple[float, float] | None:
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    c = float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c)
    w = float(w[0] if isinstance(w, pydicom.multival.MultiValue) else w)
    return (c, w) if w > 0 else None


@sslkit.hookimpl
def register_sources(register):
    register("dicom", DicomSource)
