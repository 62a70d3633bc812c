"""Embeddings of a dataset from a trained encoder: shared by ``embed`` and ``eval``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sslkit.data.loader import BatchLoader
from sslkit.data.pipeline import load_data
from sslkit.run import load_run


@dataclass
class Embeddings:
    embeddings: np.ndarray  # (N, D) float32
    ids: list[str]  # file path, plus "#frame" for multi-frame files
    labels: list[str | None]


@torch.no_grad()
def embed_run(run_dir: str, data: str, batch_size: int = 64, source_options: dict[str, Any] | None = None,
              progress: bool = True, weights: bool = True) -> Embeddings:
    """Embed every image of ``data`` with the run's encoder and preprocessing.

    ``weights=False`` uses a randomly initialised encoder of the same architecture
    (the baseline of ``eval``).
    """
    run = load_run(run_dir)
    spec = run.spec
    loaded = load_data(data, spec.image_size, spec.channels, source_options, progress=progress)
    encoder = run.build_encoder(weights=weights)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    pixels = loaded.prepared.pixels
    reader = BatchLoader(pixels, batch_size, seed=0)
    out = []
    for start in tqdm(range(0, len(pixels), batch_size), desc="embedding", unit="batch",
                      disable=not progress, leave=False):
        x = reader.read(np.arange(start, min(start + batch_size, len(pixels))))
        out.append(encoder((x - mean) / std).float().numpy())
    refs = loaded.prepared.refs
    return Embeddings(np.concatenate(out).astype(np.float32), [r.id for r in refs], [r.label for r in refs])
