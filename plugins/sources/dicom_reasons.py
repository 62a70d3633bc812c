"""Skip reasons of the ``dicom`` source: words first, then the error, no identifiers.

An image file (PNG, JPEG...) below a DICOM root is not DICOM: it is reported
(:data:`NOT_DICOM_IMAGE`), where other non-DICOM files (text, JSON, DICOMDIR) are passed over.

A reason's text before its first ``:`` is what a run's summary counts ("3 x unreadable
pixel data"), so it says what was wrong: the stage that failed (:func:`mark_stage` tags an
error where it is raised), then ``Type: message`` with quoted values removed (they can be
element values, which can name a patient), and each word that is a value of the file's identifying
elements, where its data set is at hand, or that has a person name's ``^`` (:func:`safe_reason`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag

from sslkit.api import skip_reason
from sslkit_plugins.sources.dicom_values import value

_STAGE = "_sslkit_dicom_stage"
NOT_DICOM_IMAGE = "not DICOM: an image file (read those with --data folder:PATH)"


def safe_reason(exc: BaseException, ds: Any = None) -> str:
    """``Type: message`` with quoted values removed (they can be element values): the core's skip reason
    (a MemoryError says what it means), at most 400 characters. A value can also be in the message
    unquoted ("Invalid value DOE^JOHN for PN"): each word that has a ``^`` (a person's name) or, with the
    file's data set ``ds`` at hand, one of its :func:`identifying_words`, is shown as ``…``; a codec's
    message keeps its words."""
    words, uids = identifying_words(ds) if ds is not None else (set(), set())
    shown = [word if not _identifying(word, words, uids) else "…" for word in skip_reason(exc).split(" ")]
    return " ".join(shown)[:400]


#: elements (besides every person's name, VR PN) whose values can identify a patient or a study
IDENTIFYING = frozenset({
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
    "PatientTelephoneNumbers", "MedicalRecordLocator", "AccessionNumber", "StudyID", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "StudyDescription", "SeriesDescription", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"})


def identifying_words(ds: Any) -> tuple[set[str], set[str]]:
    """The words (runs of 3 or more letters or digits, upper case) of the values of ``ds``'s person names
    and :data:`IDENTIFYING` elements, and its UIDs whole; read raw, so a value that cannot be
    converted (what may have failed) is found too."""
    words: set[str] = set()
    uids: set[str] = set()
    for tag in list(getattr(ds, "keys", lambda: [])()):
        try:
            elem = ds.get_item(tag)
            vr = elem.VR or dictionary_VR(tag)
            if vr != "PN" and keyword_for_tag(tag) not in IDENTIFYING:
                continue
            texts = _texts(elem.value)
        except Exception:  # a private or unknown tag, a value of another kind
            continue
        for text in texts:
            if vr == "UI":  # whole: a UID's numbers alone (840...) are in every other UID
                uids.update(u.strip(" \x00") for u in text.split("\\") if len(u.strip(" \x00")) >= 8)
            else:
                words |= _words(text)
    return words, uids


def header_of(path: str) -> Any:
    """The data set of ``path`` without pixels, for :func:`safe_reason` where an error left none at hand;
    None where it cannot be read."""
    from sslkit_plugins.sources.dicom_decode import read_dataset  # it imports this module

    try:  # read as the source reads it: a deflated data set inflated within its limit
        return read_dataset(path, stop_before_pixels=True)
    except Exception:
        return None


def _texts(raw: Any) -> list[str]:
    """A raw value as text (bytes in both encodings a name is likely in), values of a multi-value joined."""
    if isinstance(raw, bytes):
        return [raw.decode("utf-8", "replace"), raw.decode("latin-1")]
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        return ["\\".join(map(str, raw))]
    return [str(raw)]


def _words(text: str) -> set[str]:
    return {t for t in re.split(r"[\W_]+", text.upper()) if len(t) >= 3}


def _identifying(word: str, words: set[str], uids: set[str]) -> bool:
    """A word of a message that is (or holds) a value of the file: a person's name (``^``), a word
    of ``words``, a UID of ``uids``."""
    return "^" in word or bool(_words(word) & words) or any(u in word for u in uids)


def mark_stage(exc: BaseException, stage: str) -> None:
    """Tag ``exc`` with what was being done when it was raised (the first tag stays)."""
    try:
        if not hasattr(exc, _STAGE):
            setattr(exc, _STAGE, stage)
    except (AttributeError, TypeError):  # an exception type that takes no attributes
        pass


def failure_reason(exc: BaseException, otherwise: str, ds: Any = None) -> str:
    """A decode failure as a skip reason: ``stage: Type: message``, the stage from :func:`mark_stage`
    (``otherwise`` where the error was not tagged); ``ds``: the file's data set, where it is at hand
    (:func:`safe_reason`)."""
    if isinstance(exc, MemoryError):
        return safe_reason(exc)  # not a stage of this file's: any file may meet it (never cached)
    return f"{getattr(exc, _STAGE, None) or otherwise}: {safe_reason(exc, ds)}"[:400]


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
