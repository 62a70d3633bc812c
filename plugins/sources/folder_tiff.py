"""TIFF pages for the ``folder`` source, read with tifffile (16-bit RGB and float kept as they are).

The page's own tags say how its samples lie (samples per pixel, planar configuration),
never a guess from the array's shape. Before a byte of pixels is decoded the header is
checked: at most ``--max-pixels`` pixels, 1 to 4 samples a pixel (grey, grey + alpha, RGB,
RGBA), and no more decoded bytes than Pillow would allocate for an RGBA image at the
pixel limit. A page far larger than sslkit keeps is reduced by box means in its own data
type before any float copy is made (:func:`box_reduce`); floats holding NaN or inf are refused.

Pixels are the values as displayed: MINISWHITE grey is inverted, CMYK is converted to RGB
as Pillow converts it. A page tifffile cannot decode (a photometric it returns raw, such as
YCbCr or CIELAB; a compression whose codec package, imagecodecs, is missing) is decoded by
Pillow where Pillow can (LZW, JPEG, PackBits, CCITT), else refused with the reason.
tifffile's logger is silenced while a file is read: its warnings quote the file's name.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import numpy as np

from sslkit.api import Undecodable, box_reduce, check_pixel_count, unit_floats
from sslkit_plugins.sources.folder_decode import (DECODE_SIDE, check_decoded_bytes, is_grey, open_image, pil_pixels,
                                                  reduce_factor)
#: TIFF photometric interpretations
MINISWHITE, MINISBLACK, RGB, PALETTE, SEPARATED, YCBCR = 0, 1, 2, 3, 5, 6
#: the skip reason of a TIFF file that holds no page
NO_PAGES = "TIFF with no pages"
#: Pillow modes whose pixels :func:`pil_pixels` gives as displayed (a TIFF page tifffile cannot decode)
PILLOW_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I;16N"}
_QUIET = {"depth": 0, "level": logging.NOTSET}
_QUIET_LOCK = threading.Lock()


class _UsePillow(Exception):
    """tifffile cannot give the page's displayed values: try Pillow, else refuse with ``reason``."""

    def __init__(self, reason: str, pillow: bool = True) -> None:
        super().__init__(reason)
        self.reason, self.pillow = reason, pillow


@contextmanager
def quiet_tifffile():
    """tifffile's logger silent while a file is read (its warnings quote the file's name, which can
    name a patient); its level is restored after, once the last of nested or concurrent reads ends."""
    log = logging.getLogger("tifffile")
    with _QUIET_LOCK:
        if _QUIET["depth"] == 0:
            _QUIET["level"] = log.level
            log.setLevel(logging.CRITICAL + 1)
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                log.setLevel(_QUIET["level"])


def tiff_channels(path: str) -> int | None:
    """The channel count of a TIFF's first page, from its tags (1 or 3; None: not an image sslkit reads)."""
    import tifffile

    with quiet_tifffile(), tifffile.TiffFile(path) as tif:
        if not len(tif.pages):
            return None
        page = tif.pages[0]
        if page.photometric == PALETTE and page.colormap is not None:
            return 1 if is_grey(page.colormap.T) else 3
        samples = int(page.samplesperpixel)
        return None if samples > 4 else (3 if samples >= 3 else 1)


def tiff_array(path: str, limit: int | None = None, side: int | None = DECODE_SIDE) -> np.ndarray:
    """A TIFF's first page as float32 ``(C, H, W)`` in [0, 1], as displayed; alpha dropped.

    Refused from the header (``Undecodable``) when it breaks the limits in the module
    docstring; reduced by an integer factor while its shorter side stays at least ``side``."""
    try:
        with quiet_tifffile():
            a, shaped, photometric, colormap, bits = read_page(path, limit)
    except _UsePillow as why:
        return pillow_page(path, side, why)
    a = channels_first(a, shaped)
    f = reduce_factor(a.shape[2], a.shape[1], side)
    if colormap is not None:
        return tiff_palette_colours(a[0], colormap, f)
    if photometric == SEPARATED:
        return unit_floats(cmyk_to_rgb(a), f)
    if a.shape[0] in (2, 4):
        a = a[:-1]  # alpha
    return unit_floats(a, f) if photometric != MINISWHITE else white_is_zero(a, bits, f)


def white_is_zero(a: np.ndarray, bits: int, f: int = 1) -> np.ndarray:
    """A MINISWHITE page's grey ``(1, H, W)`` as displayed: inverted within its range (bool: not;
    unsigned: white - value; signed or float: 1 - its own min-max), then as :func:`unit_floats`."""
    if a.dtype == np.bool_:
        return unit_floats(np.logical_not(a), f)
    if a.dtype.kind == "u":
        return unit_floats(np.subtract(white_of(a, bits), a, dtype=a.dtype), f)
    x = unit_floats(a, f)
    return np.subtract(1.0, x, out=x)


def read_page(path: str, limit: int | None):
    """The first page's samples as tifffile decodes them, its normalised shape, photometric,
    colormap (palette pages only) and bits per sample; raises :class:`_UsePillow` where
    tifffile's values would not be the displayed ones or it cannot decode the page."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not len(tif.pages):
            raise Undecodable(NO_PAGES)
        page = tif.pages[0]
        check_header(page, limit)
        photometric = int(page.photometric)
        problem = codec_problem(page)
        if problem:
            raise _UsePillow(problem, pillow=pillow_reads(page))
        if photometric not in (MINISWHITE, MINISBLACK, RGB, PALETTE, SEPARATED) or (
                photometric == SEPARATED and not is_cmyk(page)):
            raise _UsePillow(f"TIFF photometric {name_of(page.photometric)} is not supported"
                             + (" (only CMYK)" if photometric == SEPARATED else ""))
        colormap = page.colormap if photometric == PALETTE else None  # indices into the colormap
        shaped = tuple(int(v) for v in page.shaped)
        return page.asarray(), shaped, photometric, colormap, int(page.bitspersample)


def name_of(value) -> str:
    """A tifffile enum value's name (an unknown one's number)."""
    return str(getattr(value, "name", value))


def codec_problem(page) -> str | None:
    """Why tifffile cannot decode ``page``'s compression or predictor, else None."""
    from tifffile import TIFF

    for what, table, key in (("compression", TIFF.DECOMPRESSORS, page.compression),
                             ("predictor", TIFF.UNPREDICTORS, page.predictor)):
        if int(key) == 1:  # none
            continue
        try:
            table[key]
        except KeyError as exc:
            if "imagecodecs" in str(exc):
                return f"TIFF {what} {name_of(key)} needs the imagecodecs package (pip install imagecodecs)"
            return f"TIFF {what} {name_of(key)} is not supported"
    return None


def pillow_reads(page) -> bool:
    """Whether Pillow gives the page's displayed values as tifffile would: unsigned 8/16-bit grey, 1-bit,
    8-bit palette, RGB, RGBA, CMYK, YCbCr."""
    bits, samples = int(page.bitspersample), int(page.samplesperpixel)
    if int(page.sampleformat) != 1:
        return False
    photometric = int(page.photometric)
    if photometric in (MINISWHITE, MINISBLACK):  # Pillow does not invert 16-bit MINISWHITE
        depths = (1, 8) if photometric == MINISWHITE else (1, 8, 16)
        return bits in depths if samples == 1 else (samples == 2 and bits == 8)
    if photometric == PALETTE:
        return samples == 1 and bits <= 8
    return bits == 8 and (photometric, samples) in ((RGB, 3), (RGB, 4), (SEPARATED, 4), (YCBCR, 3))


def pillow_page(path: str, side: int | None, why: _UsePillow) -> np.ndarray:
    """The TIFF's first page decoded by Pillow (as displayed), else ``Undecodable(why.reason)``."""
    if not why.pillow:
        raise Undecodable(why.reason)
    try:
        with open_image(path) as img:
            if img.mode not in PILLOW_MODES:
                raise Undecodable(why.reason)
            return pil_pixels(img, side)
    except Undecodable:
        raise
    except Exception:  # Pillow cannot either: the first reason
        raise Undecodable(why.reason) from None


def is_cmyk(page) -> bool:
    """Whether a SEPARATED page is CMYK: InkSet CMYK, four unsigned-integer inks, no extra samples."""
    return (int(page.tags.valueof(332, 1)) == 1 and int(page.samplesperpixel) == 4 and not page.extrasamples
            and int(page.sampleformat) == 1 and int(page.bitspersample) in (8, 16))


def white_of(a: np.ndarray, bits: int) -> int:
    """White of an unsigned MINISWHITE page ``a`` of ``bits`` bits a sample: the largest value of
    that depth (4-bit: 15), at most the largest of its data type."""
    top = int(np.iinfo(a.dtype).max)
    return min(top, (1 << bits) - 1) if 0 < bits else top


def cmyk_to_rgb(a: np.ndarray, band: int = 256) -> np.ndarray:
    """CMYK ``(4, H, W)`` of unsigned ints -> RGB of the same type, as Pillow converts:
    round((top - C) (top - K) / top), a band of ``band`` rows at a time, written over ``a``'s C, M, Y
    planes where ``a`` is writable: the wide temporaries are a band's, no new image."""
    top = int(np.iinfo(a.dtype).max)
    wide = np.uint32 if a.dtype == np.uint8 else np.uint64
    out = a[:3] if a.flags.writeable else np.empty((3, *a.shape[1:]), a.dtype)
    for row in range(0, a.shape[1], band):
        rows = slice(row, row + band)
        paper = top - a[3, rows].astype(wide)
        for i in range(3):
            v = (top - a[i, rows].astype(wide)) * paper
            v += top // 2  # top is odd: no exact halves
            out[i, rows] = v // top
    return out


def check_header(page, limit: int | None) -> None:
    """Refuse a page from its tags alone: too many pixels, samples or decoded bytes, or a volume."""
    width, height = int(page.imagewidth), int(page.imagelength)
    check_pixel_count(width, height, limit)
    samples, depth = int(page.samplesperpixel), int(getattr(page, "imagedepth", 1) or 1)
    if depth != 1:
        raise Undecodable(f"TIFF page of depth {depth} (a volume tile): not a 2D image")
    if page.photometric != 3 and not 1 <= samples <= 4:
        raise Undecodable(f"{samples} samples per pixel: an image has 1 to 4 (grey, grey + alpha, RGB, RGBA)")
    if page.dtype is None:
        raise Undecodable(f"unsupported TIFF sample format ({page.bitspersample} bits)")
    check_decoded_bytes(width, height, samples, np.dtype(page.dtype).itemsize, limit)


def channels_first(a: np.ndarray, shaped: tuple[int, ...]) -> np.ndarray:
    """A decoded page ``a`` as ``(C, H, W)``, by tifffile's normalised shape ``shaped``:
    (separate samples, depth, length, width, contiguous samples)."""
    separate, depth, height, width, contig = shaped
    if a.size != separate * depth * height * width * contig or depth != 1:
        raise Undecodable(f"TIFF page of shape {tuple(a.shape)} does not match its tags {shaped}")
    a = a.reshape(separate, height, width, contig)
    return a[..., 0] if contig == 1 else a[0].transpose(2, 0, 1)


def tiff_palette_colours(index: np.ndarray, colormap: np.ndarray, f: int = 1) -> np.ndarray:
    """A palette TIFF's indices -> float32 ``(C, H, W)`` of its colours: RGB, one channel where
    the map is grey; box means over ``f x f`` when ``f > 1`` (of the colours, never the indices)."""
    top = 255.0 if colormap.max() <= 255 else 65535.0  # some writers put 8-bit values in the 16-bit map
    lut = colormap[:1] if is_grey(colormap.T) else colormap
    lut = lut.astype(np.float32) / top if f == 1 else lut
    out = np.empty((lut.shape[0], *index.shape), lut.dtype)
    for row in range(0, index.shape[0], 512):  # a band at a time: the indices as intp are 8 bytes a pixel
        out[:, row : row + 512] = np.take(lut, index[row : row + 512].astype(np.intp), axis=1, mode="clip")
    if f == 1:
        return out
    x = box_reduce(out, f)
    x /= top
    return x
