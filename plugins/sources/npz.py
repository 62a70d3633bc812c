"""Source ``npz:FILE.npz``: images stored as arrays (MedMNIST layout).

The file holds ``<split>_images`` ``(N, H, W)`` or ``(N, H, W, C)`` (``(N, C, H, W)`` when
``C`` is the second axis and small) and optionally ``<split>_labels`` ``(N,)`` or
``(N, 1)``; ``split`` defaults to ``train`` (MedMNIST also has ``val`` and ``test``).
A plain ``images`` / ``labels`` pair is accepted too. uint8 is scaled by 255, uint16 by
65535, floats by their own range. Every image is its own split group.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslkit.api import SampleRef, Source, Undecodable, UsageError, check_pixel_count, hookimpl


@dataclass
class NpzOptions:
    split: str = "train"  # which <split>_images array to read


class NpzSource(Source):
    scheme = "npz"
    Options = NpzOptions
    parallel_decode = False  # an array slice: workers would only copy the whole array

    def __init__(self, location: str, options: NpzOptions | None = None) -> None:
        super().__init__(location, options or NpzOptions())
        self.path = Path(location).expanduser()
        if not self.path.is_file():
            raise UsageError(f"npz: file {location!r} does not exist")
        try:
            with np.load(self.path) as z:
                names = set(z.files)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise UsageError(f"npz: {location!r} is not a readable .npz file ({type(exc).__name__})") from None
        split = self.options.split
        self.images_key = next((k for k in (f"{split}_images", "images") if k in names), None)
        if self.images_key is None:
            raise UsageError(f"npz: {location!r} has no '{split}_images' array; arrays: {', '.join(sorted(names))}")
        label_key = self.images_key.replace("images", "labels")
        self.labels_key = label_key if label_key in names else None
        self._images: np.ndarray | None = None

    def __getstate__(self):
        return {**self.__dict__, "_images": None}  # workers load the file themselves

    @classmethod
    def sniff(cls, path: Path) -> float:
        return 0.9 if path.is_file() and path.suffix.lower() == ".npz" else 0.0

    def _array(self) -> np.ndarray:
        if self._images is None:
            with np.load(self.path) as z:
                a = z[self.images_key]
            if a.ndim == 3:
                a = a[:, None]
            elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
                a = a.transpose(0, 3, 1, 2)
            elif a.ndim != 4:
                raise UsageError(f"npz: {self.images_key} has shape {a.shape}; expected (N, H, W) or (N, H, W, C)")
            self._images = a
        return self._images

    def image_shape(self) -> tuple[int, ...]:
        """``(N, H, W)`` / ``(N, H, W, C)`` / ``(N, C, H, W)`` of the images array, from its
        ``.npy`` header inside the zip: nothing is decompressed."""
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.images_key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return tuple(read(f)[0])

    def index(self) -> list[SampleRef]:
        shape = self.image_shape()
        if len(shape) in (3, 4):
            h, w = shape[1:3] if len(shape) == 3 or shape[1] not in (1, 3, 4) else shape[2:4]
            try:  # before np.load decompresses the whole array
                check_pixel_count(int(w), int(h), self.max_pixels)
            except Undecodable as exc:
                raise UsageError(f"npz: {self.images_key} {shape}: {exc}") from None
        n = len(self._array())
        labels = [None] * n
        if self.labels_key:
            with np.load(self.path) as z:
                lab = np.asarray(z[self.labels_key]).reshape(n, -1)
            labels = [str(int(v[0])) if v.size == 1 else ",".join(str(int(t)) for t in v) for v in lab]
        return [SampleRef(str(self.path), frame=i, group=f"npz:{i}", label=labels[i]) for i in range(n)]

    def channels_of(self, ref: SampleRef) -> int | None:
        return int(self._array().shape[1])

    def properties(self, ref: SampleRef) -> dict:
        a = self._array()
        return {"array": self.images_key, "dtype": str(a.dtype), "size": f"{a.shape[3]}x{a.shape[2]}",
                "channels": int(a.shape[1])}

    def load(self, ref: SampleRef) -> np.ndarray:
        a = self._array()[ref.frame]
        if a.dtype == np.uint8:
            return a.astype(np.float32) / 255.0
        if a.dtype == np.uint16:
            return a.astype(np.float32) / 65535.0
        x = a.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

    def describe(self) -> dict:
        return {"array": self.images_key, "scale": "uint8 / 255, uint16 / 65535, float min-max"}


@hookimpl
def register_sources(register):
    register("npz", NpzSource)
