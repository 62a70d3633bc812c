"""TIFF pages for the ``folder`` source, read with tifffile (16-bit RGB and float kept as they are).

The page's own tags say how its samples lie (samples per pixel, planar configuration),
never a guess from the array's shape. Before a byte of pixels is decoded the header is
checked: at most ``--max-pixels`` pixels, 1 to 4 samples a pixel (grey, grey + alpha, RGB,
RGBA), and no more decoded bytes than Pillow would allocate for an RGBA image at the
pixel limit. A page far larger than sslkit keeps is reduced by box means in its own data
type before any float copy is made (:func:`box_reduce`); floats holding NaN or inf are refused.
"""

from __future__ import annotations

import numpy as np

from sslkit.api import Undecodable, box_reduce, check_pixel_count, unit_floats
from sslkit_plugins.sources.folder_decode import DECODE_SIDE, is_grey, reduce_factor

#: decoded bytes allowed per pixel of the pixel limit: an 8-bit RGBA image, as Pillow holds it
BYTES_PER_LIMIT_PIXEL = 4


def tiff_channels(path: str) -> int | None:
    """The channel count of a TIFF's first page, from its tags (1 or 3; None: not an image sslkit reads)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.photometric == 3 and page.colormap is not None:  # PALETTE
            return 1 if is_grey(page.colormap.T) else 3
        samples = int(page.samplesperpixel)
        return None if samples > 4 else (3 if samples >= 3 else 1)


def tiff_array(path: str, limit: int | None = None, side: int | None = DECODE_SIDE) -> np.ndarray:
    """A TIFF's first page as float32 ``(C, H, W)`` in [0, 1]; alpha dropped.

    Refused from the header (``Undecodable``) when it breaks the limits in the module
    docstring; reduced by an integer factor while its shorter side stays at least ``side``."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        check_header(page, limit)
        colormap = page.colormap if page.photometric == 3 else None  # PALETTE: indices into the colormap
        a = page.asarray()
        shaped = tuple(int(v) for v in page.shaped)
    a = channels_first(a, shaped)
    f = reduce_factor(a.shape[2], a.shape[1], side)
    if colormap is not None:
        return tiff_palette_colours(a[0], colormap, f)
    if a.shape[0] in (2, 4):
        a = a[:-1]  # alpha
    return unit_floats(a, f)


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
    nbytes = width * height * samples * np.dtype(page.dtype).itemsize
    if limit and nbytes > limit * BYTES_PER_LIMIT_PIXEL:
        raise Undecodable(f"too large to decode: {width}x{height} pixels x {samples} samples x "
                          f"{np.dtype(page.dtype).itemsize} bytes = {nbytes:,} bytes exceeds "
                          f"{BYTES_PER_LIMIT_PIXEL} x the pixel limit of {limit:,} (--max-pixels raises it)")


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
