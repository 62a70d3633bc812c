"""Tiny generated datasets for the checks: folders of PNG files the ``folder`` source reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
