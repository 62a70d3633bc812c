"""Tiny generated datasets for the checks: folders of PNG files the ``folder`` source reads,
and folders of volumes with a source of the kit's own (:class:`KitVolumes`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslkit.api import GraphPreprocessing, SampleMode, SampleRef, Source, Undecodable, UsageError


def image_folder(root: Path, n: int, size: int, channels: int, seed: int = 0) -> Path:
    """Write ``n`` PNGs of ``size``² pixels (``channels`` 1: gray, 3: RGB) into ``root``.

    Smooth oriented stripes of random frequency plus noise, so crops and flips differ and
    every task has something to learn. Written once; an existing ``root`` is reused.
    """
    from PIL import Image

    root = Path(root)
    if root.is_dir() and len(list(root.glob("*.png"))) == n:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        f, g, phase = rng.uniform(1, 6), rng.uniform(-3, 3), rng.uniform(0, 6)
        base = (np.sin((xx * f + yy * g) * np.pi * 2 + phase) + 1) / 2
        img = np.clip(0.8 * base + 0.2 * rng.random((size, size)), 0, 1)
        if channels == 3:
            img = np.stack([img, np.roll(img, 3, 0), 1 - img], -1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


def volume_folder(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """Write ``n`` float32 volumes ``(1, D, H, W)`` in [0, 1] as ``.npy`` files into ``root``
    (smooth blobs plus noise), for :class:`KitVolumes`. Written once; an existing ``root`` is reused."""
    root = Path(root)
    if root.is_dir() and len(list(root.glob("*.npy"))) == n:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]] / np.array(shape).reshape(3, 1, 1, 1)
    for i in range(n):
        c = rng.uniform(0.3, 0.7, 3).reshape(3, 1, 1, 1)
        blob = np.exp(-((grid - c) ** 2).sum(0) / rng.uniform(0.02, 0.1))
        np.save(root / f"{i:03d}.npy", np.clip(0.8 * blob + 0.2 * rng.random(shape), 0, 1)[None].astype(np.float32))
    return root


@dataclass
class KitVolumesOptions:
    volume_size: str = "16,16,16"  # D,H,W of every volume (``--data-opt volume_size=...``)


class KitVolumes(Source):
    """``kit-volumes:FOLDER``: each ``.npy`` file one ``(1, D, H, W)`` volume in [0, 1], sampled
    whole (as ``--sample volume``): the volumes :func:`check_task` trains on, registered only
    for the check, so the kit needs no imaging format."""

    scheme = "kit-volumes"
    Options = KitVolumesOptions
    parallel_decode = False

    def __init__(self, location: str, options: KitVolumesOptions | None = None) -> None:
        super().__init__(location, options or KitVolumesOptions())
        self.sample = SampleMode.parse("volume", volume_size=self.options.volume_size)

    def index(self) -> list[SampleRef]:
        refs = [SampleRef(str(p)) for p in sorted(Path(self.location).glob("*.npy"))]
        if not refs:
            raise UsageError(f"kit-volumes: no .npy volumes in {self.location!r}")
        return refs

    def load(self, ref: SampleRef) -> np.ndarray:
        x = np.load(ref.path).astype(np.float32)
        if x.shape[1:] != tuple(self.sample.size):
            raise Undecodable(f"a volume of shape {x.shape}, not (C, {self.options.volume_size})")
        return x

    def describe(self) -> dict:
        return self.sample.describe()

    def graph_preprocessing(self) -> GraphPreprocessing:
        return GraphPreprocessing("unit", client="the client gives float32 volumes in [0, 1]")
