"""What the ``dicom`` source keeps of each image file once indexed: :class:`FileFacts`.

:func:`~sslkit_plugins.sources.dicom.read_header` gives some 25 facts a file: the geometry
that assembles series, and where the pixels lie with the file's group 0028 elements as hex
text; about 6 KB a file as Python objects. After ``index()`` has assembled the series and
chosen the samples, loading and the source's other answers (``channels_of``, ``properties``,
``spacing_of``, ``patient_folders``) need only :data:`FIELDS` and the pixel location, and the
source is pickled into every decoding process. So each file becomes one slotted record whose
values that many files share (text, spacings, the pixel layout with its group 0028 elements
packed in one bytes object) are one object each (:class:`Pool`): about 0.4 KB a file here and
in each worker and 40 pickled bytes besides its path where a series shares its group 0028
values, 0.75 KB and 240 bytes where each file has a window of its own (was 5.3 KB and 530).

A record answers as the header dict did for those keys (``h["frames"]``, ``h.get("pixels")``:
the same dict of facts, lists as tuples); ``get`` gives the default for a fact it does not keep
(geometry: the assembled volumes hold it). ``h["pixels"] = None`` makes the file decode in full.
"""

from __future__ import annotations

import struct
from typing import Any

#: the header facts a record keeps (besides the pixel location)
FIELDS = ("group", "modality", "transfer_syntax", "photometric", "bits_stored", "rows", "columns", "frames",
          "samples_per_pixel", "named_levels", "pixel_spacing")
_FIELDS = frozenset(FIELDS)
#: the pixel facts each file has of its own; the rest of them (the layout) is shared
_PER_FILE = ("offset", "end")
_ELEMENT = struct.Struct("<I2sI")  # a packed group 0028 element: tag, VR (b"\0\0": None), value length


class Pool:
    """One object per distinct value, per kind of value (``1 == 1.0 == True`` never crosses kinds)."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[Any, Any]] = {}

    def one(self, kind: str, value: Any) -> Any:
        """``value`` with lists made tuples and dicts tuples of pairs (their items shared too), as the
        first equal one seen."""
        if isinstance(value, (list, tuple)):
            value = tuple(self.one(kind + "[]", v) for v in value)
        elif isinstance(value, dict):
            value = tuple(self._shared(f"{kind}.items", (k, self.one(f"{kind}.{k}", v))) for k, v in value.items())
        return self._shared(kind, value)

    def _shared(self, kind: str, value: Any) -> Any:
        try:
            return self._seen.setdefault(kind, {}).setdefault(value, value)
        except TypeError:  # unhashable: kept as it is
            return value


class FileFacts:
    """The kept facts of one file (:data:`FIELDS`, and the pixel location); see the module docstring."""

    __slots__ = (*FIELDS, "_layout", "_offset", "_end")

    def __init__(self, header: dict[str, Any], pool: Pool | None = None) -> None:
        pool = pool or Pool()
        for name in FIELDS:
            setattr(self, name, pool.one(name, header.get(name)))
        self._place(header.get("pixels"), pool)

    def _place(self, pixels: dict[str, Any] | None, pool: Pool) -> None:
        if pixels is None:
            self._layout = self._offset = self._end = None
            return
        self._offset, self._end = pixels.get("offset"), pixels.get("end")
        layout = {k: v for k, v in pixels.items() if k not in _PER_FILE}
        if "elements" in layout:  # one bytes object, not a tuple of tuples of text: ~300 bytes less a file
            layout["elements"] = _packed(layout["elements"]) or layout["elements"]
        self._layout = pool.one("pixels", layout)

    @property
    def pixels(self) -> dict[str, Any] | None:
        """Where the pixels lie and how to read them (:func:`~.dicom_pixels.pixel_facts`), None: read in full."""
        if self._layout is None:
            return None
        out = {"offset": self._offset, "end": self._end, **dict(self._layout)}
        if isinstance(out.get("elements"), bytes):
            out["elements"] = _unpacked(out["elements"])
        return out

    def __getitem__(self, key: str) -> Any:
        if key == "pixels":
            return self.pixels
        if key in _FIELDS:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "pixels":
            self._place(value, Pool())
        elif key in _FIELDS:
            setattr(self, key, Pool().one(key, value))
        else:
            raise KeyError(key)

    def __reduce__(self) -> tuple:  # a tuple of (mostly shared) values: no slot names per file
        return _restored, tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in FIELDS)
        return f"FileFacts({shown}, pixels={'located' if self._layout is not None else None})"


def _packed(elements: Any) -> bytes | None:
    """``[[tag, VR or None, value as hex], ...]`` as one bytes object; None where one does not fit."""
    out = bytearray()
    try:
        for tag, vr, text in elements:
            code = b"\0\0" if vr is None else vr.encode("ascii")
            if len(code) != 2 or (vr is not None and code == b"\0\0"):  # b"\0\0" stands for None
                return None
            value = bytes.fromhex(text)
            out += _ELEMENT.pack(tag, code, len(value)) + value
    except (TypeError, ValueError, AttributeError, struct.error):
        return None
    return bytes(out)


def _unpacked(packed: bytes) -> tuple[tuple[int, str | None, str], ...]:
    """:func:`_packed` undone: ``((tag, VR or None, value as hex), ...)``."""
    out, at = [], 0
    while at < len(packed):
        tag, vr, length = _ELEMENT.unpack_from(packed, at)
        at += _ELEMENT.size
        out.append((tag, None if vr == b"\0\0" else vr.decode("ascii"), packed[at : at + length].hex()))
        at += length
    return tuple(out)


def _restored(*values: Any) -> FileFacts:
    facts = FileFacts.__new__(FileFacts)
    for name, v in zip(FileFacts.__slots__, values):
        setattr(facts, name, v)
    return facts


def kept_facts(headers: dict[str, dict[str, Any]]) -> dict[str, FileFacts]:
    """``{path: header}`` -> ``{path: FileFacts}``, equal values shared across the files."""
    pool = Pool()
    return {path: FileFacts(h, pool) for path, h in headers.items()}
