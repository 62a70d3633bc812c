"""Write small synthetic DICOM files for tests and benchmarks (pydicom only, no templates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000, JPEG2000Lossless, RLELossless, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SYNTAXES = {"explicit": None, "rle": RLELossless, "j2k": JPEG2000Lossless, "j2k-lossy": JPEG2000}


def write_dicom(path: str | Path, pixels: np.ndarray, *, patient_id: str = "", patient_name: str = "",
                birth_date: str = "", study_uid: str | None = None, modality: str = "CR",
                photometric: str = "MONOCHROME2", syntax: str = "explicit", bits_stored: int = 16,
                slope: float | None = None, intercept: float | None = None,
                window: tuple[float, float] | None = None, series_description: str = "") -> Path:
    """``pixels``: uint16 ``(H, W)`` (or ``(F, H, W)`` for a multi-frame file)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, birth_date
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.set_pixel_data(np.ascontiguousarray(pixels, dtype=np.uint16), photometric, bits_stored,
                      generate_instance_uid=False)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept or 0.0, "US"
    if window is not None:
        ds.WindowWidth, ds.WindowCenter = window
    if SYNTAXES[syntax] is not None:
        kwargs = {"j2k_cr": [20]} if syntax == "j2k-lossy" else {}
        ds.compress(SYNTAXES[syntax], generate_instance_uid=False, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
