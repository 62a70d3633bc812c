"""Source ``folder:PATH``: every image below PATH (PNG, JPEG, TIFF, BMP, WebP).

Class sub-folders are ignored for pretraining and used as labels by ``eval``.
8-bit images are scaled by 255, 16-bit ones by 65535 (never squashed to 8 bits first);
TIFFs are read with tifffile, which keeps 16-bit RGB and multi-page stacks as they are.
A palette image (PNG, BMP or TIFF) gives its colours, never its indices: RGB, or one
channel where every palette entry is grey.
Splits group files by the ``group`` regex (``--data-opt group='^(patient[0-9]+)/'``):
files whose relative path gives the same match (first capture group, else the whole
match) stay on one side; without a match a file is its own group.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sslkit.api import SampleRef, Source, UsageError, check_dir, check_pixel_count, hookimpl, walk_files


EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass
class FolderOptions:
    group: str = ""  # regex on the path relative to PATH; its match is the split group

    def __post_init__(self) -> None:
        try:
            re.compile(self.group)
        except re.error as exc:
            raise UsageError(f"folder: group {self.group!r} is not a valid regular expression: {exc}") from None


def group_of(rel: str, pattern: str) -> str:
    """The split group of relative path ``rel``: the regex match, else the path itself."""
    if pattern:
        m = re.search(pattern, rel)
        if m:
            return "g:" + (m.group(1) if m.groups() and m.group(1) is not None else m.group(0))
    return "f:" + rel


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


def pil_to_array(img: Image.Image) -> np.ndarray:
    """PIL image -> float32 (C, H, W) in [0, 1], keeping 16-bit precision."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    elif img.mode == "I":
        a = np.asarray(img, dtype=np.int64)
        arr = (a / 65535.0 if a.max() > 255 else a / 255.0).astype(np.float32)
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        arr = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    else:
        grey = img.mode in ("P", "PA") and pil_palette_is_grey(img)  # a palette's colours, not its indices
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGBA" if "A" in img.getbands() or img.mode == "P" else "RGB")
            if img.mode == "RGBA":
                img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[..., 0] if grey else arr
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


class FolderSource(Source):
    scheme = "folder"
    Options = FolderOptions

    def __init__(self, location: str, options=None) -> None:
        super().__init__(location, options or FolderOptions())
        self.root = check_dir(location, self.scheme)

    @classmethod
    def sniff(cls, path: Path) -> float:
        if path.is_dir():
            for _, i in zip(range(200), path.rglob("*")):
                if i.suffix.lower() in EXTENSIONS:
                    return 0.5
        return 0.0

    def index(self) -> list[SampleRef]:
        files = walk_files(self.root, lambda p: p.suffix.lower() in EXTENSIONS, self.skipped)
        refs = []
        for f in files:
            rel = f.relative_to(self.root)
            label = rel.parts[-2] if len(rel.parts) > 1 else None
            refs.append(SampleRef(str(f), group=group_of(rel.as_posix(), self.options.group), label=label))
        return refs

    def channels_of(self, ref: SampleRef) -> int | None:
        try:
            if Path(ref.path).suffix.lower() in TIFF:
                return 3 if _tiff_array(ref.path, header=True).shape[0] >= 3 else 1
            with open_image(ref.path) as img:
                if img.mode in ("P", "PA"):
                    return 1 if pil_palette_is_grey(img) else 3
                return 3 if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr") else 1
        except Exception:
            return None

    def properties(self, ref: SampleRef) -> dict:
        try:
            with open_image(ref.path) as img:
                return {"format": img.format, "mode": img.mode, "size": f"{img.width}x{img.height}",
                        "frames": getattr(img, "n_frames", 1)}
        except Exception:
            return {"format": Path(ref.path).suffix.lower().lstrip(".")}

    def load(self, ref: SampleRef) -> np.ndarray:
        if Path(ref.path).suffix.lower() in TIFF:
            return _tiff_array(ref.path, limit=self.max_pixels)
        with open_image(ref.path) as img:
            check_pixel_count(img.width, img.height, self.max_pixels)  # from the header, before decoding
            img.load()
            return pil_to_array(img)

    def describe(self) -> dict:
        return {"scale": "8-bit / 255, 16-bit / 65535, float min-max"}


TIFF = {".tif", ".tiff"}


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


def _tiff_array(path: str, header: bool = False, limit: int | None = None) -> np.ndarray:
    """A TIFF's first page as float32 ``(C, H, W)`` in [0, 1] (``header``: shape only, zeros).

    A page of more than ``limit`` pixels is refused from its header, before decoding."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        check_pixel_count(int(page.imagewidth), int(page.imagelength), limit)
        colormap = page.colormap if page.photometric == 3 else None  # PALETTE: indices into the colormap
        if header and colormap is not None:
            return np.zeros((1 if is_grey(colormap.T) else 3, 1, 1), np.float32)
        if header:
            shape = page.shape
            c = shape[-1] if len(shape) == 3 and shape[-1] <= 4 else (shape[0] if len(shape) == 3 else 1)
            return np.zeros((c, 1, 1), np.float32)
        a = page.asarray()
    if colormap is not None:
        return tiff_palette_colours(a, colormap)
    if a.ndim == 3 and a.shape[-1] <= 4 and a.shape[0] > 4:  # (H, W, C)
        a = a.transpose(2, 0, 1)
    elif a.ndim == 2:
        a = a[None]
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif a.dtype == bool:
        x = a.astype(np.float32)
    else:  # float or wide integer data: its own range
        x = a.astype(np.float32)
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if x.shape[0] == 4 or x.shape[0] == 2:
        x = x[:-1]  # alpha
    return np.ascontiguousarray(x, dtype=np.float32)


def tiff_palette_colours(index: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """A palette TIFF's indices -> float32 ``(C, H, W)`` of its colours: RGB, one channel where the map is grey."""
    top = 255.0 if colormap.max() <= 255 else 65535.0  # some writers put 8-bit values in the 16-bit map
    lut = colormap.astype(np.float32) / top
    lut = lut[:1] if is_grey(colormap.T) else lut
    return np.ascontiguousarray(np.take(lut, index.astype(np.intp), axis=1, mode="clip"), dtype=np.float32)


@hookimpl
def register_sources(register):
    register("folder", FolderSource)
