"""Pixels of the ``folder`` source: Pillow images and native arrays to float32 ``(C, H, W)`` in [0, 1].

Memory stays near the final image's: an image whose shorter side is at least twice
:data:`DECODE_SIDE` is reduced by the integer factor that keeps that side at least
``DECODE_SIDE`` (JPEG: Pillow's DCT scaling, ``Image.draft``; others: box means in their
own mode, ``Image.reduce`` or ``sslkit.api.box_reduce``) before any float copy is made; sslkit
then resizes it as any other image. Smaller images decode exactly as before. Float
pixels that hold NaN or inf are refused (``Undecodable``), never scaled into garbage, and so is a
JPEG whose file is too short for the pixels its header declares (:func:`check_jpeg_holds`: Pillow
would give their missing blocks as flat grey), as Pillow refuses a short PNG.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from sslkit.api import Undecodable, unit_floats

#: images whose shorter side is at least twice this are reduced while decoding (to no less than this)
DECODE_SIDE = 2048
#: Pillow reads these 16-bit PNG layouts at 8 bits: the unpacker that gives their low bytes
_PNG16 = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}
#: samples a pixel of those layouts (alpha included: all are decoded)
_PNG16_SAMPLES = {"RGB;16B": 3, "RGBA;16B": 4, "LA;16B": 2}
#: decoded bytes allowed per pixel of the pixel limit: an 8-bit RGBA image, as Pillow holds it
BYTES_PER_LIMIT_PIXEL = 4
#: rows a band of :func:`png16_colour` joins at a time
_BAND_ROWS = 256
_ORIENTATION = 0x0112  # EXIF
#: start-of-frame markers of Huffman-coded JPEGs (SOF0-3, SOF5-7): at least one bit a block (arithmetic-coded
#: ones, SOF9-11 and SOF13-15, have no such bound; a file whose marker is not found is not judged)
_HUFFMAN_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7})
#: bytes every JPEG libjpeg decodes has besides its data (SOI, a quantization table, frame and scan headers, EOI)
_JPEG_MIN_BYTES = 96


def open_image(path: str) -> Image.Image:
    """``Image.open`` (header only) without PIL's own decompression-bomb refusal: the one
    pixel limit, ``--max-pixels``, is checked by the caller before ``load()``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def reduce_factor(width: int, height: int, side: int | None) -> int:
    """The integer factor that keeps the shorter side at least ``side`` (1: none; ``side`` None: none)."""
    return max(1, min(width, height) // side) if side else 1


def is_grey(colours: np.ndarray) -> bool:
    """Whether palette entries ``colours`` (N, channels) are all grey (red = green = blue)."""
    return colours.shape[1] < 3 or bool((colours[:, :1] == colours[:, 1:3]).all())


def pil_palette_is_grey(img: Image.Image) -> bool:
    """Whether a ``P`` / ``PA`` image's palette is grey (read at open, before any pixel is decoded)."""
    pal = img.palette
    if pal is None or not pal.mode:
        return False
    n, colours = len(pal.mode), np.frombuffer(bytes(pal.palette), np.uint8)
    return is_grey(colours[: len(colours) // n * n].reshape(-1, n))


def pil_channels(img: Image.Image) -> int:
    """The channel count :func:`pil_pixels` gives ``img`` (1 or 3), from its header."""
    if img.mode in ("P", "PA"):
        return 1 if pil_palette_is_grey(img) else 3
    if _png16_rawmode(img) == "LA;16B":  # Pillow shows 16-bit grey + alpha as RGBA
        return 1
    return 3 if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr") else 1


def check_decoded_bytes(width: int, height: int, samples: int, itemsize: int, limit: int | None) -> None:
    """Refuse (``Undecodable``), from the header, an image whose decoded samples exceed
    :data:`BYTES_PER_LIMIT_PIXEL` x the pixel ``limit`` bytes (None or 0: no limit)."""
    nbytes = width * height * samples * itemsize
    if limit and nbytes > limit * BYTES_PER_LIMIT_PIXEL:
        raise Undecodable(f"too large to decode: {width}x{height} pixels x {samples} samples x "
                          f"{itemsize} bytes = {nbytes:,} bytes exceeds "
                          f"{BYTES_PER_LIMIT_PIXEL} x the pixel limit of {limit:,} (--max-pixels raises it)")


def pil_pixels(img: Image.Image, side: int | None = DECODE_SIDE, limit: int | None = None,
               upright: bool = True) -> np.ndarray:
    """An opened image's pixels, float32 ``(C, H, W)`` in [0, 1] (see the module docstring); a 16-bit
    colour PNG is refused from its header beyond :func:`check_decoded_bytes`'s ``limit``. ``upright``: a
    JPEG is turned by its EXIF orientation (False: as stored)."""
    f, raw = reduce_factor(img.width, img.height, side), _png16_rawmode(img)
    if raw:
        check_decoded_bytes(img.width, img.height, _PNG16_SAMPLES[raw], 2, limit)
        try:
            wide = png16_colour(img.filename, raw)
        except (AttributeError, TypeError, ValueError, OSError):  # a Pillow whose internals differ: 8 bits, as before
            wide = None
        if wide is not None:  # alpha already dropped; box means of the 16-bit values where reduced
            return unit_floats(wide, f)
    x = pil_to_array(pil_decoded(img, side, upright))
    return x[:1] if raw == "LA;16B" else x  # at 8 bits (a Pillow whose internals differ): RGBA of one grey


def pil_decoded(img: Image.Image, side: int | None, upright: bool = True) -> Image.Image:
    """``img`` decoded (reduced while decoding where :func:`reduce_factor` says so) and, for a
    photo (JPEG) with ``upright``, turned upright by its EXIF orientation as a viewer shows it."""
    photo = img.format in ("JPEG", "MPO")
    if photo:
        check_jpeg_holds(img)
    f = reduce_factor(img.width, img.height, side)
    if photo and f > 1:
        img.draft(img.mode, (img.width // f, img.height // f))  # DCT scaling: 1/2, 1/4 or 1/8
    img.load()
    if photo and upright and img.getexif().get(_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    f = reduce_factor(img.width, img.height, side)
    if f == 1:
        return img
    if img.mode.startswith("I;16"):
        return img.convert("I").reduce(f).convert("I;16")  # Image.reduce has no 16-bit mode
    if img.mode in ("P", "PA"):  # a palette's colours, never its indices, are averaged
        img = img.convert("L" if pil_palette_is_grey(img) else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    return img.reduce(f)


def check_jpeg_holds(img: Image.Image) -> None:
    """Refuse (``Undecodable``) an opened JPEG whose file is too short for the pixels its header declares: a
    Huffman-coded JPEG spends at least one bit on each 8x8 block of its full-resolution component, and
    Pillow decodes missing blocks as flat grey without a word (libjpeg's warning is dropped) when the data
    ends early in an end marker. From the file's size and header: nothing is decoded."""
    need = -(-img.width // 8) * -(-img.height // 8) // 8
    if need <= _JPEG_MIN_BYTES:  # any decodable file holds that many: its size need not be read
        return
    try:
        size = os.fstat(img.fp.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # not a file on disk: nothing to compare
        return
    if size < need and _sof_marker(img.fp) in _HUFFMAN_SOF:
        raise Undecodable(f"image file is truncated: a {img.width}x{img.height} JPEG needs at least {need:,} "
                          f"bytes of data; the file has {size:,}")


def _sof_marker(fp) -> int | None:
    """The start-of-frame marker (``0xC0``...) of the JPEG in ``fp``, read from its start (``fp`` left where it
    was); None where the segments before it cannot be walked."""
    where = fp.tell()
    try:
        fp.seek(2)  # past SOI
        for _ in range(1000):  # segments before the frame header: APPn, DQT, DHT, COM...
            if fp.read(1) != b"\xff":
                return None
            marker = fp.read(1)
            while marker == b"\xff":  # fill bytes, which the standard allows before any marker
                marker = fp.read(1)
            length = fp.read(2)
            if not marker or len(length) < 2:
                return None
            if 0xC0 <= marker[0] <= 0xCF and marker[0] not in (0xC4, 0xC8, 0xCC):  # not DHT, JPG, DAC
                return marker[0]
            fp.seek(int.from_bytes(length, "big") - 2, os.SEEK_CUR)
        return None
    finally:
        fp.seek(where)


def pil_to_array(img: Image.Image) -> np.ndarray:
    """A decoded PIL image -> float32 (C, H, W) in [0, 1], keeping 16-bit precision."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        x = np.array(img, dtype=np.float32, order="C")
        x /= 65535.0
    elif img.mode == "I":
        a = np.asarray(img, dtype=np.int64)
        x = (a / 65535.0 if a.max() > 255 else a / 255.0).astype(np.float32)
    elif img.mode == "F":
        x = unit_floats(np.asarray(img, dtype=np.float32))
    else:
        grey = img.mode in ("P", "PA") and pil_palette_is_grey(img)  # a palette's colours, not its indices
        if img.mode in ("1", "LA", "La"):  # grey + alpha: the grey, one channel as pil_channels says
            img = img.convert("L")
        elif img.mode not in ("L", "RGB"):
            img = img.convert("RGBA" if "A" in img.getbands() or img.mode == "P" else "RGB")
            if img.mode == "RGBA":
                img = img.convert("RGB")
        a = np.asarray(img)
        a = a[..., 0] if grey else a
        x = np.array(a if a.ndim == 2 else a.transpose(2, 0, 1), dtype=np.float32, order="C")
        x /= 255.0
    return x if x.ndim == 3 else x[None]


def _png16_rawmode(img: Image.Image) -> str | None:
    """The raw layout of a 16-bit colour / grey + alpha PNG that Pillow would cut to 8 bits, else None."""
    if img.format != "PNG" or len(getattr(img, "tile", ()) or ()) != 1:
        return None
    tile = img.tile[0]  # a NamedTuple from Pillow 11, a plain tuple before: (decoder, extents, offset, args)
    raw = tile[3] if isinstance(tile, tuple) and len(tile) >= 4 else None
    return raw if isinstance(raw, str) and raw in _PNG16 else None


def png16_colour(path: str, raw: str) -> np.ndarray:
    """A 16-bit RGB / RGBA / grey + alpha PNG as uint16 ``(C, H, W)``, all 16 bits kept, alpha dropped
    (RGB, or one grey channel).

    Pillow's PNG decoder (inflate, un-filter, interlace) runs unchanged; only its last step,
    unpacking each row into an 8-bit image, is pointed at other bytes: Pillow's own
    big-endian unpacker keeps the high bytes, its little-endian one (same layout) the low
    ones. Grey + alpha (4 bytes a pixel) is unpacked as four 8-bit bytes, all at once. The
    bytes are joined into the result a band of rows at a time, one 8-bit decode held at once:
    memory is the result and one 8-bit image, no full-size temporaries."""
    if raw == "LA;16B":
        b = _unpacked(path, "RGBA")  # grey high, grey low, alpha high, alpha low
        out = np.empty((1, *b.shape[:2]), np.uint16)
        for top in range(0, b.shape[0], _BAND_ROWS):
            band = b[top : top + _BAND_ROWS]
            out[0, top : top + _BAND_ROWS] = (band[..., 0].astype(np.uint16) << 8) | band[..., 1]
        return out
    high = _unpacked(path, raw)
    out = np.empty((3, *high.shape[:2]), np.uint16)
    for top in range(0, high.shape[0], _BAND_ROWS):
        out[:, top : top + _BAND_ROWS] = high[top : top + _BAND_ROWS, :, :3].transpose(2, 0, 1)
    del high
    out <<= 8
    low = _unpacked(path, _PNG16[raw])
    for top in range(0, low.shape[0], _BAND_ROWS):
        out[:, top : top + _BAND_ROWS] |= low[top : top + _BAND_ROWS, :, :3].transpose(2, 0, 1)
    return out


def _unpacked(path: str, rawmode: str) -> np.ndarray:
    with open_image(path) as img:
        tile = img.tile[0]
        img.tile = [tile._replace(args=rawmode) if hasattr(tile, "_replace") else (*tile[:3], rawmode, *tile[4:])]
        img.load()
        return np.asarray(img)
