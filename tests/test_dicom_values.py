"""Header values from raw bytes equal pydicom's, element by element (plugins/sources/dicom_values.py)."""

from __future__ import annotations

import math
import warnings

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from sslkit_plugins.sources.dicom_values import _UNSURE, _plain, value
from tests.conftest import PYDICOM_FILES


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            return None


def test_every_element_of_pydicom_files_reads_as_pydicom_reads_it():
    """Every public element with a keyword, in every pydicom test file and its file meta:
    value() equals ds.get(keyword) of the same file read afresh."""
    fast = compared = 0
    for path in sorted(PYDICOM_FILES.rglob("*")):
        if not path.is_file():
            continue
        ours, theirs = _read(path), _read(path)
        if ours is None:
            continue
        pairs = [(ours, theirs), (ours.file_meta, theirs.file_meta)]
        for ds_a, ds_b in pairs:
            for tag in list(ds_a.keys()):
                kw = keyword_for_tag(tag)
                if not kw or tag.is_private or tag_for_keyword(kw) != tag:  # private, or a repeating group
                    continue
                raw = ds_a.get_item(tag)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        expected = ds_b.get(kw)
                    except Exception:
                        continue  # pydicom cannot read it either: value() falls back and raises the same way
                    if isinstance(raw, RawDataElement) and _plain(raw, dictionary_VR(tag)) is not _UNSURE:
                        fast += 1
                    got = value(ds_a, kw)
                compared += 1
                assert _same(got, expected), f"{path.name} {tag} {kw}: {got!r} != {expected!r}"
    assert compared > 2000 and fast > 1000, (compared, fast)


def _same(a, b) -> bool:
    """Equal as the source's callers use them: numbers by value, strings as strings, lists item by item."""
    if isinstance(b, (list, MultiValue)):
        return isinstance(a, (list, MultiValue)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(b, str):
        return isinstance(a, str) and str(a) == str(b)
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    return a == b


def _element(tag: int, vr: str | None, data: bytes) -> Dataset:
    ds = Dataset()
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(data), data, 0, vr is None, True)
    return ds


@pytest.mark.parametrize("kw,vr,data", [
    ("ImagePositionPatient", "DS", b"-12.5\\3e2\\ .5 "),
    ("ImagePositionPatient", "DS", b"1\\\\2 "),          # an empty value in the middle
    ("ImagePositionPatient", "DS", b"1,5\\2\\3 "),       # a comma: pydicom's business
    ("SliceThickness", "DS", b"nan "),
    ("SliceThickness", "DS", b"1_0 "),                  # Python's float() accepts it, DICOM does not
    ("SliceThickness", "DS", b"2.5\x00"),
    ("NumberOfFrames", "IS", b"12"),
    ("NumberOfFrames", "IS", b"2.0 "),
    ("NumberOfFrames", "IS", b" +7 "),
    ("EchoNumbers", "IS", b"1\\2 "),
    ("Rows", "US", b"\x00\x02"),
    ("Rows", None, b"\x00\x02"),                        # implicit VR
    ("Rows", "SS", b"\x00\x02"),                        # the file's VR disagrees with the dictionary
    ("Rows", "US", b"\x00\x02\x01"),                    # odd length
    ("Modality", "CS", b"CT"),
    ("ImageType", "CS", b"ORIGINAL\\PRIMARY\\MOSAIC "),
    ("ImageType", "CS", b" DERIVED\\\\X"),
    ("SeriesInstanceUID", "UI", b"1.2.840.5\x00"),
    ("PatientID", "LO", b"AB 12  "),
    ("PatientID", "LO", b"A\\B "),
    ("PatientID", "LO", "Mül".encode("latin-1")),      # not ASCII: pydicom decodes with the character set
    ("SeriesDescription", "LO", b"\x1b$B..."),          # an ISO 2022 escape
])
def test_hand_made_values_read_as_pydicom_reads_them(kw, vr, data):
    tag = tag_for_keyword(kw)
    ours, theirs = _element(tag, vr, data), _element(tag, vr, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = theirs.get(kw)
        except Exception as exc:
            with pytest.raises(type(exc)):
                value(ours, kw)
            return
        got = value(ours, kw)
    assert _same(got, expected), (got, expected)


def test_missing_element_gives_the_default():
    assert value(Dataset(), "Rows") is None
    assert value(Dataset(), "NumberOfFrames", 1) == 1
    with pytest.raises(KeyError):
        value(Dataset(), "NotAKeyword")
