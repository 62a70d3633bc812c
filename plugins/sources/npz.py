"""Source ``npz:FILE``: images stored as NumPy arrays (MedMNIST layout, or one ``.npy``).

A ``.npz`` holds ``<split>_images`` and optionally ``<split>_labels`` (``split`` defaults
to ``train``; MedMNIST also has ``val`` and ``test``); a plain ``images`` / ``labels`` pair
is accepted too. A ``.npy`` file is one images array, unlabelled. The images array is
``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` with ``C`` = 1 to 4 (2: grey + alpha,
read as grey; 4: RGBA, read as RGB); a 4-axis shape that fits both channel positions is
refused unless ``--data-opt layout=nchw`` (or ``nhwc``) says which. uint8 is scaled by 255,
uint16 by 65535, other integers, bools and floats by each image's own range; an image
holding NaN or inf is skipped (``data_report.json``). Every image is its own split group.

Reading: an array stored uncompressed (``np.save`` / ``np.savez``) is memory-mapped, so
only the images used are read; a compressed one (``np.savez_compressed``) is decompressed
into memory once, and refused from its header when it would take more than half the
available memory (``--data-opt max_gb=G`` sets another bound); so is an image count whose index
(:data:`INDEX_BYTES_PER_IMAGE` each) would not fit that bound. Every header is checked
before any pixel is read: object arrays (pickles) are never loaded, and a header that
declares more bytes than its file holds is one error line. Labels are class names
(integers, or strings such as MedMNIST's); labels that cannot name classes (NaN, fractions,
objects, a count other than the images') are ignored with one note on stderr: the
images are still read (pretraining needs no labels; ``sslkit eval`` then finds none).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslkit.api import (GraphPreprocessing, SampleRef, Source, Undecodable, UsageError, available_memory,
                        check_pixel_count, first_line, hookimpl, human_bytes, skip_reason, unit_floats, without_quoted)

LAYOUTS = ("auto", "nhw", "nchw", "nhwc")
ACCEPTED = "(N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 to 4 channels"
NPY_MAGIC = b"\x93NUMPY"
#: the most values one image's labels row may hold (multi-label MedMNIST has 14)
MAX_LABEL_VALUES = 1024
#: the bound on a compressed array where the available memory is unknown
FALLBACK_LIMIT = 4 * 2**30
#: memory one image's index entry takes in a run (its SampleRef, id and the run's per-sample
#: bookkeeping; ~280 bytes measured for the SampleRef and id alone), checked from the header
INDEX_BYTES_PER_IMAGE = 1024


@dataclass
class NpzOptions:
    split: str = "train"  # which <split>_images array to read
    layout: str = "auto"  # auto, nhw, nchw or nhwc: the images' axes, where the shape fits two
    max_gb: float = 0.0  # a compressed array and the index take up to this many GB (0: half the available memory)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout}: choose one of {', '.join(LAYOUTS)}")
        if not (math.isfinite(self.max_gb) and self.max_gb >= 0):
            raise ValueError(f"max_gb={self.max_gb}: give a size in GB, or 0 for half the available memory")


@dataclass(frozen=True)
class Header:
    """One ``.npy`` array as its header declares it, and where its bytes are."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None  # where its data starts in the file, if stored uncompressed (memory-mappable)
    stored: int  # bytes the file holds for its data
    member: str | None = None  # its name in the zip; None: a .npy file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _parse_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, header length)`` of the ``.npy`` stream ``f`` (nothing
    past the header is read; ``dtype`` is only described, an object array is not unpickled)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    if any(d < 0 for d in shape):
        raise ValueError(f"negative shape {shape}")
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype), f.tell()


def _npy_header(path: Path) -> Header:
    with open(path, "rb") as f:
        shape, fortran, dtype, start = _parse_header(f)
    return Header(shape, dtype, fortran, start, os.path.getsize(path) - start)


def _npz_header(path: Path, member: str) -> Header:
    """A zip member's header; a member stored uncompressed gets its data's offset in the file
    (from its local file header) and counts only the bytes the file really holds."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.flag_bits & 0x1:
            raise ValueError("the member is encrypted")
        with zf.open(info) as f:
            shape, fortran, dtype, start = _parse_header(f)
    stored, offset = info.file_size - start, None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as fp:
            fp.seek(info.header_offset)
            local = fp.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError("damaged local file header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len + start
        stored = min(stored, os.path.getsize(path) - offset)
    return Header(shape, dtype, fortran, offset, stored, member)


def _layout(shape: tuple[int, ...], forced: str, what: str) -> str:
    """``nhw``, ``nchw`` or ``nhwc`` for ``shape``; one error line when none or two fit."""
    if len(shape) == 3 and 1 <= shape[2] <= 4 < min(shape[:2]) and forced == "auto":
        raise UsageError(f"npz: {what} has shape {shape}: one (H, W, C) image, or {shape[0]} images {shape[2]} "
                         f"pixels wide? save images as (N, H, W) or (N, H, W, C) (one image: a[None]), or give "
                         f"--data-opt layout=nhw for {shape[0]} images")
    if len(shape) == 3:
        fits = ["nhw"]
    else:
        fits = [name for name, axis in (("nchw", 1), ("nhwc", 3)) if len(shape) == 4 and 1 <= shape[axis] <= 4]
    if forced != "auto":
        if forced in fits:
            return forced
        raise UsageError(f"npz: {what} has shape {shape}, which does not fit layout={forced}; accepted: {ACCEPTED}")
    if len(fits) == 2:
        raise UsageError(f"npz: {what} has shape {shape}, which fits both (N, C, H, W) and (N, H, W, C); "
                         "say which with --data-opt layout=nchw or --data-opt layout=nhwc")
    if not fits:
        raise UsageError(f"npz: {what} has shape {shape}; accepted layouts: {ACCEPTED}")
    return fits[0]


def _check_images(h: Header, what: str) -> None:
    """One error line for an images array that cannot be read as pixels."""
    if h.dtype.hasobject:
        raise UsageError(f"npz: {what} holds Python objects (dtype object), which are never unpickled "
                         "(that can run code); save a numeric array")
    if h.dtype.kind not in "uifb" or h.dtype.fields or h.dtype.subdtype:
        raise UsageError(f"npz: {what} has dtype {h.dtype}; images must be integers, floats or booleans")
    if h.nbytes > h.stored:
        raise UsageError(f"npz: {what} declares {h.shape} {h.dtype} ({human_bytes(h.nbytes)}) but the file holds "
                         f"{human_bytes(max(h.stored, 0))} of it: truncated or damaged")


def _label_rows(lab: np.ndarray) -> list[str | None]:
    """``(N, K)`` labels -> one class name per row (``"a,b"`` for several values; None: empty).
    Raises ValueError naming why the values cannot be class names."""
    kind = lab.dtype.kind
    if kind == "f":
        if not np.isfinite(lab).all():
            raise ValueError("they hold NaN or inf values")
        if not (lab == np.round(lab)).all():
            raise ValueError("they hold values that are not whole numbers")
    if kind in "uifb":
        text = [[str(int(t)) for t in row] for row in lab]
    elif kind == "S":
        text = [[t.decode("utf-8", "replace").strip() for t in row] for row in lab]
    else:
        text = [[str(t).strip() for t in row] for row in lab]
    return [",".join(row) or None for row in text]


class NpzSource(Source):
    scheme = "npz"
    Options = NpzOptions
    options_not_in_cache_key = frozenset({"max_gb"})  # a memory bound: the same pixels or a refusal
    parallel_decode = False  # an array slice: workers would only copy the whole array

    def __init__(self, location: str, options: NpzOptions | None = None) -> None:
        super().__init__(location, options or NpzOptions())
        self.path = Path(location).expanduser()
        if self.path.is_dir():
            raise UsageError(f"npz: {location!r} is a folder; give one .npz or .npy file")
        if not self.path.is_file():
            raise UsageError(f"npz: file {location!r} does not exist")
        self.labels_key: str | None = None  # the labels array, and its zip member
        self.labels_member: str | None = None
        self.images_key, self.header = self._open(location)
        self.what = self.images_key or "the .npy array"
        _check_images(self.header, self.what)
        self.layout = _layout(self.header.shape, self.options.layout, self.what)
        s = self.header.shape  # (height, width, channels) of every image:
        self.hwc = (s[1], s[2], 1) if self.layout == "nhw" else (s[2], s[3], s[1]) if self.layout == "nchw" else s[1:]
        self._images: np.ndarray | None = None
        self._failed: str | None = None  # why the array could not be read (not retried per image)
        self._noted = False  # the note on ignored labels is printed once

    def _open(self, location: str) -> tuple[str | None, Header]:
        """``(images array name, its header)``, the labels noted; one line when unreadable."""
        try:
            with open(self.path, "rb") as f:
                magic = f.read(len(NPY_MAGIC))
            if not magic:
                raise UsageError(f"npz: {location!r} is empty (0 bytes)")
            if magic == NPY_MAGIC:
                return None, _npy_header(self.path)
            with zipfile.ZipFile(self.path) as zf:
                members = {(n[:-4] if n.endswith(".npy") else n): n for n in zf.namelist()}
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"npz: {location!r} is not a readable .npz or .npy file ({skip_reason(exc)})") from None
        split = self.options.split
        images = next((k for k in (f"{split}_images", "images") if k in members), None)
        if images is None:
            names = sorted(members)
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise UsageError(f"npz: {location!r} has no '{split}_images' array; arrays: {shown or 'none'}")
        labels = images.replace("images", "labels")
        try:
            header = _npz_header(self.path, members[images])
        except Exception as exc:
            raise UsageError(f"npz: {images} in {location!r} is not a readable .npy array ({skip_reason(exc)})") from None
        if labels in members:
            self.labels_key, self.labels_member = labels, members[labels]
        return images, header

    def __getstate__(self):
        return {**self.__dict__, "_images": None}  # workers map or load the file themselves

    @classmethod
    def sniff(cls, path: Path) -> float:
        return 0.9 if path.is_file() and path.suffix.lower() in (".npz", ".npy") else 0.0

    def image_shape(self) -> tuple[int, ...]:
        """The images array's shape as its ``.npy`` header declares it: nothing is decompressed."""
        return self.header.shape

    def _memory_limit(self) -> tuple[int, str]:
        if self.options.max_gb:
            return int(self.options.max_gb * 2**30), "--data-opt max_gb"
        avail = available_memory()
        return (avail // 2, "half the available memory") if avail else (FALLBACK_LIMIT, "the default bound")

    def _check_memory(self) -> None:
        """Refuse, from the header, a compressed array that would not fit the bound in memory."""
        h = self.header
        if h.offset is not None:
            return  # memory-mapped
        limit, bound = self._memory_limit()
        if h.nbytes > limit:
            raise UsageError(f"npz: {self.what} {h.shape} {h.dtype} is compressed and decompresses to "
                             f"{human_bytes(h.nbytes)} in memory, more than {bound} ({human_bytes(limit)}); save it "
                             "uncompressed (np.savez: read memory-mapped) or raise --data-opt max_gb=G")

    def _check_count(self, n: int) -> None:
        """Refuse, from the header, an image count whose index would not fit the memory bound."""
        limit, bound = self._memory_limit()
        if n * INDEX_BYTES_PER_IMAGE > limit:
            raise UsageError(f"npz: {self.what} {self.header.shape} holds {n:,} images, whose index takes about "
                             f"{human_bytes(n * INDEX_BYTES_PER_IMAGE)} in memory, more than {bound} "
                             f"({human_bytes(limit)}); save fewer images per file or raise --data-opt max_gb=G")

    def index(self) -> list[SampleRef]:
        n, (h, w, _) = self.header.shape[0], self.hwc
        try:
            check_pixel_count(int(w), int(h), self.max_pixels)
        except Undecodable as exc:
            raise UsageError(f"npz: {self.what} {self.header.shape}: {exc}") from None
        if n and min(h, w) < 2:
            raise UsageError(f"npz: {self.what} {self.header.shape}: images of {w}x{h} pixels; at least 2x2 needed")
        self._check_memory()
        self._check_count(n)
        labels = self._labels(n)
        return [SampleRef(str(self.path), frame=i, group=f"npz:{i}", label=labels[i]) for i in range(n)]

    def _labels(self, n: int) -> list[str | None]:
        """One class name (or None) per image; unusable labels are ignored with one note."""
        if not self.labels_key:
            return [None] * n
        try:
            return self._read_labels(n)
        except Exception as exc:
            if not self._noted:
                self._noted = True
                print(f"sslkit: npz: {self.labels_key} ignored ({without_quoted(first_line(exc))}); "
                      "the images are read unlabelled", file=sys.stderr)
            return [None] * n

    def _read_labels(self, n: int) -> list[str | None]:
        h = _npz_header(self.path, self.labels_member)
        if h.dtype.hasobject:
            raise ValueError("they are Python objects (dtype object), never unpickled")
        if h.dtype.kind not in "uifbUS" or h.dtype.fields or h.dtype.subdtype:
            raise ValueError(f"dtype {h.dtype} cannot name classes")
        if not h.shape or h.shape[0] != n:
            raise ValueError(f"{h.shape[0] if h.shape else 'a single value, not'} labels for {n} images")
        if math.prod(h.shape[1:]) > MAX_LABEL_VALUES or h.nbytes > 2**26 + 4096 * n:
            raise ValueError(f"{math.prod(h.shape[1:])} values per image, {human_bytes(h.nbytes)}: too large for labels")
        if h.nbytes > h.stored:
            raise ValueError(f"declared {human_bytes(h.nbytes)}, the file holds {human_bytes(max(h.stored, 0))}: truncated")
        with zipfile.ZipFile(self.path) as zf, zf.open(h.member) as f:
            lab = np.lib.format.read_array(f, allow_pickle=False)
        return _label_rows(lab.reshape(n, -1))

    def _array(self) -> np.ndarray:
        """The images as ``(N, C, H, W)``: a memory map where stored uncompressed, else decompressed
        once (within the bound :meth:`_check_memory` enforced). A failure is kept, not retried."""
        if self._images is None:
            if self._failed:
                raise Undecodable(self._failed)
            h = self.header
            try:
                if h.offset is not None:
                    a = np.memmap(self.path, dtype=h.dtype, mode="r", offset=h.offset, shape=h.shape,
                                  order="F" if h.fortran else "C")
                else:
                    self._check_memory()
                    with zipfile.ZipFile(self.path) as zf, zf.open(h.member) as f:
                        a = np.lib.format.read_array(f, allow_pickle=False)
                    if a.shape != h.shape or a.dtype != h.dtype:
                        raise ValueError(f"read {a.shape} {a.dtype}")
            except Exception as exc:
                self._failed = f"the images array cannot be read: {skip_reason(exc)}"
                raise Undecodable(self._failed) from None
            self._images = a[:, None] if self.layout == "nhw" else a.transpose(0, 3, 1, 2) \
                if self.layout == "nhwc" else a
        return self._images

    def channels_of(self, ref: SampleRef) -> int | None:
        return int(self.hwc[2])

    def properties(self, ref: SampleRef) -> dict:
        h, w, c = self.hwc
        return {"array": self.what, "dtype": str(self.header.dtype), "size": f"{w}x{h}", "channels": int(c)}

    def load(self, ref: SampleRef) -> np.ndarray:
        try:
            return unit_floats(np.asarray(self._array()[ref.frame]))
        except Undecodable as exc:
            raise Undecodable(f"{exc}: image {ref.frame}") from None

    def content_key(self, ref: SampleRef) -> str:
        """The image's own bytes (dtype, shape and values): the ``train`` and ``test`` arrays of one
        ``.npz`` are told apart, and the same image in two files is found."""
        image = np.ascontiguousarray(self._array()[ref.frame])
        h = hashlib.sha256(f"{image.dtype.newbyteorder('=').str}{image.shape}".encode())
        h.update(image.astype(image.dtype.newbyteorder("="), copy=False).tobytes())
        return h.hexdigest()

    def graph_preprocessing(self) -> GraphPreprocessing:
        """uint8 and uint16 arrays are pixels the graph scales; any other dtype was scaled by each
        image's own range (bools as 0 / 1), which no fixed graph can apply: the client does."""
        dtype = self.header.dtype.newbyteorder("=")
        if dtype in (np.uint8, np.uint16):
            return GraphPreprocessing()
        rule = "took bools as 0 / 1" if dtype == np.bool_ else "scaled each image by its own min-max"
        return GraphPreprocessing("unit", client=(
            f"the run {rule} ({self.header.dtype.name} arrays), which no fixed graph can apply: the client does the "
            "same and passes float32 in [0, 1]; the graph normalises"))

    def describe(self) -> dict:
        return {"array": self.what, "layout": self.layout,
                "scale": "uint8 / 255, uint16 / 65535, others min-max; NaN/inf images skipped"}


@hookimpl
def register_sources(register):
    register("npz", NpzSource)
