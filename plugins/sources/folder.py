"""Source ``folder:PATH``: every image below PATH (PNG, JPEG, TIFF, BMP, WebP).

Class sub-folders are ignored for pretraining and used as labels by ``eval``: a file's class is
the first folder below PATH (as torchvision's ``ImageFolder``), however deep it lies
(``PATH/<class>/<patient>/img.jpg``: the class, never the patient's folder); a file in PATH
itself has none.
8-bit images are scaled by 255, 16-bit ones by 65535 (never squashed to 8 bits first);
TIFFs are read with tifffile, which keeps 16-bit RGB as it is (as displayed: MINISWHITE
inverted, CMYK as RGB; Pillow decodes what tifffile cannot, see ``folder_tiff``); so are
16-bit PNGs in colour or with alpha (Pillow would cut them to 8 bits; see
:func:`~sslkit_plugins.sources.folder_decode.png16_colour`). Of a multi-page TIFF or an
animated image only the first page (frame) is used. A palette image (PNG, BMP or
TIFF) gives its colours, never its indices: RGB, or one channel where every palette entry
is grey. A JPEG is turned upright by its EXIF orientation. Float pixels holding NaN or inf
are a skipped file, and an image far larger than any training size is reduced while it is
decoded (``folder_decode``), so memory stays near the final image's. ``--data-opt
exif_orientation=false`` keeps JPEGs as stored and ``--data-opt reduce_large=false`` never reduces:
how runs recorded before 2026-12-05 decoded, which is how they resume (runs recorded since, before
these options, resume turning and reducing: :attr:`FolderSource.legacy_option_values`).
Splits group files by the ``group`` regex (``--data-opt group='^(patient[0-9]+)/'``):
files whose relative path gives the same match (first capture group, else the whole
match) stay on one side; without a match a file is its own group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslkit.api import (IMAGE_SUFFIXES, SampleRef, Source, UsageError, check_dir, check_pixel_count, first_files,
                        hookimpl, walk_files)
from sslkit_plugins.sources.folder_decode import DECODE_SIDE, open_image, pil_channels, pil_pixels
from sslkit_plugins.sources.folder_tiff import tiff_array, tiff_channels


EXTENSIONS = IMAGE_SUFFIXES
TIFF = {".tif", ".tiff"}


@dataclass
class FolderOptions:
    group: str = ""  # regex on the path relative to PATH; its match is the split group
    exif_orientation: bool = True  # JPEG: turn upright by its EXIF orientation (false: as stored, as before 2026-12-05)
    reduce_large: bool = True  # shorter side >= 2 x max(2048, 2 x sample side): reduce while decoding (false: never)

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


class FolderSource(Source):
    scheme = "folder"
    Options = FolderOptions
    options_not_in_cache_key = frozenset({"group"})  # split groups only: the same pixels
    #: how a run recorded before these options existed decoded, read from the describe() it recorded: runs
    #: before 2026-12-05 neither turned nor reduced (their record holds only "scale"), later ones did both
    legacy_option_values = {"exif_orientation": lambda described: "orientation" in described,
                            "reduce_large": lambda described: "reduce" in described}
    _decode_side: int | None | bool = False  # set: that side (None: never reduce); False: the rule below

    @property
    def decode_side(self) -> int | None:
        """An image whose shorter side is at least twice this is reduced while decoding, to no less than
        this: DECODE_SIDE, or twice the run's sample side (``Source.sample_side``) where that is larger,
        so no detail the run keeps is lost; None (never reduce) with ``reduce_large=false``."""
        if self._decode_side is not False:
            return self._decode_side
        if not self.options.reduce_large:
            return None
        return max(DECODE_SIDE, 2 * (getattr(self, "sample_side", None) or 0))

    @decode_side.setter
    def decode_side(self, value: int | None) -> None:
        self._decode_side = value

    def __init__(self, location: str, options=None) -> None:
        super().__init__(location, options or FolderOptions())
        self.root = check_dir(location, self.scheme)

    @classmethod
    def sniff(cls, path: Path) -> float:
        if path.is_dir():
            if any(f.suffix.lower() in EXTENSIONS for f in first_files(path)):
                return 0.5
        return 0.0

    def index(self) -> list[SampleRef]:
        files = walk_files(self.root, lambda p: p.suffix.lower() in EXTENSIONS, self.skipped)
        refs = []
        for f in files:
            rel = f.relative_to(self.root)
            label = rel.parts[0] if len(rel.parts) > 1 else None  # the first level: the class
            refs.append(SampleRef(str(f), group=group_of(rel.as_posix(), self.options.group), label=label))
        return refs

    def channels_of(self, ref: SampleRef) -> int | None:
        try:
            if Path(ref.path).suffix.lower() in TIFF:
                return tiff_channels(ref.path)
            with open_image(ref.path) as img:
                return pil_channels(img)
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
            return tiff_array(ref.path, limit=self.max_pixels, side=self.decode_side)
        with open_image(ref.path) as img:
            check_pixel_count(img.width, img.height, self.max_pixels)  # from the header, before decoding
            return pil_pixels(img, self.decode_side, self.max_pixels, self.options.exif_orientation)

    def orientation(self) -> str:
        """How :meth:`load` lays its arrays out (for ``sslkit data dump``)."""
        upright = "; a JPEG turned upright by its EXIF orientation" if self.options.exif_orientation else ""
        return "as stored (rows, columns)" + upright

    def describe(self) -> dict:
        out = {"scale": "8-bit / 255, 16-bit / 65535, float min-max"}  # all that runs before 2026-12-05 recorded
        if self.options.exif_orientation:
            out["orientation"] = "JPEG: upright by EXIF"
        if self.decode_side:  # in the cache key: an entry decoded another way is not reused
            out["reduce"] = f"shorter side >= {2 * self.decode_side}: to >= {self.decode_side} while decoding"
        return out


@hookimpl
def register_sources(register):
    register("folder", FolderSource)
