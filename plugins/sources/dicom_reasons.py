"""Skip reasons of the ``dicom`` source: words first, then the error, no identifiers.

An image file (PNG, JPEG...) below a DICOM root is not DICOM: it is reported
(:data:`NOT_DICOM_IMAGE`), where other non-DICOM files (text, JSON, DICOMDIR) are passed over.

A reason's text before its first ``:`` is what a run's summary counts ("3 x unreadable
pixel data"), so it says what was wrong: the stage that failed (:func:`mark_stage` tags an
error where it is raised), then ``Type: message`` with quoted values removed (they can be
element values, which can name a patient).
"""

from __future__ import annotations

from typing import Any

import pydicom

from sslkit.api import skip_reason
from sslkit_plugins.sources.dicom_values import value

_STAGE = "_sslkit_dicom_stage"
NOT_DICOM_IMAGE = "not DICOM: an image file (read those with --data folder:PATH)"


def safe_reason(exc: BaseException) -> str:
    """``Type: message`` with quoted values removed (they can be element values): the core's skip reason
    (a MemoryError says what it means), at most 400 characters."""
    return skip_reason(exc)[:400]


def mark_stage(exc: BaseException, stage: str) -> None:
    """Tag ``exc`` with what was being done when it was raised (the first tag stays)."""
    try:
        if not hasattr(exc, _STAGE):
            setattr(exc, _STAGE, stage)
    except (AttributeError, TypeError):  # an exception type that takes no attributes
        pass


def failure_reason(exc: BaseException, otherwise: str) -> str:
    """A decode failure as a skip reason: ``stage: Type: message``, the stage from :func:`mark_stage`
    (``otherwise`` where the error was not tagged)."""
    if isinstance(exc, MemoryError):
        return safe_reason(exc)  # not a stage of this file's: any file may meet it (never cached)
    return f"{getattr(exc, _STAGE, None) or otherwise}: {safe_reason(exc)}"[:400]


def incomplete_image(ds: Any, has_pixels: bool, missing: str) -> str | None:
    """Why a header without ``missing`` (Rows, Columns) is a broken image and not a non-image object:
    it has pixel data, or its SOP class is an image storage class (a file cut short before them)."""
    if has_pixels:
        return f"unreadable header: pixel data without {missing}"
    meta = getattr(ds, "file_meta", None)
    sop = value(ds, "SOPClassUID", None) or (value(meta, "MediaStorageSOPClassUID", None) if meta else None)
    name = pydicom.uid.UID(str(sop)).name if sop else ""
    if name.endswith("Image Storage"):
        return f"unreadable header: a {name} object that ends without {missing} (truncated?)"
    return None
