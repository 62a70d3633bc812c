"""Pixels of the ``folder`` source: Pillow images and native arrays to float32 ``(C, H, W)`` in [0, 1].

Memory stays near the final image's: an image whose shorter side is at least twice
:data:`DECODE_SIDE` is reduced by the integer factor that keeps that side at least
``DECODE_SIDE`` (JPEG: Pillow's DCT scaling, ``Image.draft``; others: box means in their
own mode, ``Image.reduce`` or ``sslkit.api.box_reduce``) before any float copy is made; sslkit
then resizes it as any other image. Smaller images decode exactly as before. Float
pixels that hold NaN or inf are refused (``Undecodable``), never scaled into garbage.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

from sslkit.api import unit_floats

#: images whose shorter side is at least twice this are reduced while decoding (to no less than this)
DECODE_SIDE = 2048
#: Pillow reads these 16-bit PNG layouts at 8 bits: the unpacker that gives their low bytes
_PNG16 = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}
_ORIENTATION = 0x0112  # EXIF


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


def pil_pixels(img: Image.Image, side: int | None = DECODE_SIDE) -> np.ndarray:
    """An opened image's pixels, float32 ``(C, H, W)`` in [0, 1] (see the module docstring)."""
    f, raw = reduce_factor(img.width, img.height, side), _png16_rawmode(img)
    if raw:
        try:
            wide = png16_colour(img.filename, raw)
        except (AttributeError, TypeError, ValueError, OSError):  # a Pillow whose internals differ: 8 bits, as before
            wide = None
        if wide is not None:  # alpha dropped; box means of the 16-bit values where reduced
            return unit_floats(wide[:-1] if wide.shape[0] in (2, 4) else wide, f)
    x = pil_to_array(pil_decoded(img, side))
    return x[:1] if raw == "LA;16B" else x  # at 8 bits (a Pillow whose internals differ): RGBA of one grey


def pil_decoded(img: Image.Image, side: int | None) -> Image.Image:
    """``img`` decoded (reduced while decoding where :func:`reduce_factor` says so) and, for a
    photo (JPEG), turned upright by its EXIF orientation as a viewer shows it."""
    photo = img.format in ("JPEG", "MPO")
    f = reduce_factor(img.width, img.height, side)
    if photo and f > 1:
        img.draft(img.mode, (img.width // f, img.height // f))  # DCT scaling: 1/2, 1/4 or 1/8
    img.load()
    if photo and img.getexif().get(_ORIENTATION, 1) != 1:
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
    """A 16-bit RGB / RGBA / grey + alpha PNG as uint16 ``(C, H, W)``, all 16 bits kept.

    Pillow's PNG decoder (inflate, un-filter, interlace) runs unchanged; only its last step,
    unpacking each row into an 8-bit image, is pointed at other bytes: Pillow's own
    big-endian unpacker keeps the high bytes, its little-endian one (same layout) the low
    ones. Grey + alpha (4 bytes a pixel) is unpacked as four 8-bit bytes, all at once."""
    if raw == "LA;16B":
        b = _unpacked(path, "RGBA")  # grey high, grey low, alpha high, alpha low
        v = (b[..., 0::2].astype(np.uint16) << 8) | b[..., 1::2]
    else:
        v = _unpacked(path, raw).astype(np.uint16) << 8
        v |= _unpacked(path, _PNG16[raw])
    return v.transpose(2, 0, 1)


def _unpacked(path: str, rawmode: str) -> np.ndarray:
    with open_image(path) as img:
        tile = img.tile[0]
        img.tile = [tile._replace(args=rawmode) if hasattr(tile, "_replace") else (*tile[:3], rawmode, *tile[4:])]
        img.load()
        return np.asarray(img)
