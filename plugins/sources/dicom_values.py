"""Header values decoded straight from an element's bytes, where that is sure to give
what pydicom would.

Indexing a folder of small slices spends most of its time not in parsing headers but
in pydicom turning about twenty elements per file into Python values (keyword lookup,
hooks, validation: ~15 µs each). :func:`value` is ``ds.get(keyword)`` for the common,
plain encodings (little-endian numbers; ``DS`` / ``IS`` numbers in plain decimal notation;
code strings and UIDs; ASCII-only text) done in a few microseconds from the raw bytes,
and pydicom's own conversion for everything else (a VR that disagrees with the
dictionary, big endian, empty values, odd characters, anything unusual). The values are
the same either way (tests compare both on every element of pydicom's test files);
the element is left unconverted in the data set.
"""

from __future__ import annotations

import re
import struct
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

_UNSURE = object()
_NUMBERS = {"US": ("H", 2), "UL": ("I", 4), "SS": ("h", 2), "SL": ("i", 4)}
_DECIMAL = re.compile(r" *[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)? *\Z")
_INTEGER = re.compile(r" *[+-]?\d+ *\Z")
#: text VRs whose only transformation, for ASCII bytes, is a split on backslash and rstrip("\0 ")
_TEXT = ("LO", "SH")
#: string VRs pydicom decodes as its default encoding (latin-1), rstrip(" \0"), split on backslash
_STRINGS = ("CS", "UI", "AE", "AS")


@lru_cache(maxsize=None)
def _tag_and_vr(keyword: str) -> tuple[BaseTag, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"not a DICOM keyword: {keyword}")
    return BaseTag(tag), dictionary_VR(tag)


def has(ds: Dataset, keyword: str) -> bool:
    """``keyword in ds``, without pydicom's keyword lookup on every call."""
    return _tag_and_vr(keyword)[0] in ds


def transfer_syntax(ds: Dataset) -> UID:
    """The data set's Transfer Syntax UID from its file meta (an empty UID if none)."""
    meta = getattr(ds, "file_meta", None)
    return _uid(str(value(meta, "TransferSyntaxUID", "")) if meta is not None else "")


@lru_cache(maxsize=64)
def _uid(text: str) -> UID:
    return UID(text)


def value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``: the same value, from the raw bytes where that is plain.

    Numbers come back as ``int`` / ``float`` (a list of them when multi-valued), strings
    as ``str`` (a list when multi-valued): equal to pydicom's ``IS`` / ``DSfloat`` /
    ``UID`` / ``MultiValue`` values.
    """
    tag, vr = _tag_and_vr(keyword)
    elem = ds.get_item(tag)
    if elem is None:
        return default
    if isinstance(elem, RawDataElement):
        out = _plain(elem, vr)
        if out is not _UNSURE:
            return out
    return ds.get(keyword, default)


def _plain(elem: RawDataElement, vr: str) -> Any:
    """The value of a raw element with dictionary VR ``vr``, or ``_UNSURE``."""
    data = elem.value
    if elem.VR not in (None, vr) or not data or not elem.is_little_endian or not isinstance(data, bytes):
        return _UNSURE
    if vr in _NUMBERS:
        code, size = _NUMBERS[vr]
        if len(data) % size:
            return _UNSURE
        out = list(struct.unpack(f"<{len(data) // size}{code}", data))
        return out[0] if len(out) == 1 else out
    if vr in ("DS", "IS"):
        text = data.decode("latin-1").rstrip(" \x00")
        items = text.split("\\")
        pattern = _DECIMAL if vr == "DS" else _INTEGER
        if not all(pattern.match(i) for i in items):
            return _UNSURE
        out = [float(i) for i in items] if vr == "DS" else [int(i) for i in items]
        return out[0] if len(out) == 1 else out
    if vr in _STRINGS:
        text = data.decode("latin-1")
        items = (text.rstrip("\x00 ") if vr == "UI" else text).rstrip(" \x00").split("\\")
    elif vr in _TEXT:
        if not data.isascii() or b"\x1b" in data:
            return _UNSURE
        items = [i.rstrip("\x00 ") for i in data.decode("ascii").split("\\")]
    else:
        return _UNSURE
    return items[0] if len(items) == 1 else items
