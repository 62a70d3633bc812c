"""BatchNorm statistics recomputed on whole images at the end of pretraining.

A task whose encoder trains on something other than the images it will later embed
(jigsaw: standardised tiles of a ninth of the image) leaves BatchNorm running statistics
that describe those inputs, not whole images; the exported encoder would normalise whole
images with them. A task that sets ``Task.recompute_batchnorm = True`` gets them
recomputed after its last step ("precise BN", Wu & Johnson, *Rethinking "Batch" in
BatchNorm*, 2021): the encoder's weights are kept, every BatchNorm layer's running mean and
variance become the average over up to :data:`IMAGES` training images, un-augmented and
normalised exactly as ``embed`` and the ONNX graph normalise them.

Only the saved encoder (``encoder.safetensors``) gets the new statistics; the last
checkpoint keeps the training ones, so a run extended with ``--resume`` continues from
what it trained with and recomputes them again at its new end.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from sslkit.data.loader import to_unit

#: how many training images the statistics are averaged over (fewer when the data has fewer)
IMAGES = 2048


def recompute_batchnorm(encoder: nn.Module, loader: Any, mean, std, device: torch.device, seed: int,
                        images: int = IMAGES) -> dict[str, int] | None:
    """Reset ``encoder``'s BatchNorm running statistics and average them over whole images.

    ``loader``: the run's :class:`~sslkit.data.loader.BatchLoader` (``pixels``, ``batch_size``,
    ``read``). Batches are full (the count is rounded down to a multiple of the batch size
    unless the data holds less than one batch), so each running mean is exactly the mean
    over the images used.
    Returns ``{"layers", "images"}`` for ``run.json``, or None when there is no BatchNorm.
    """
    layers = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return None
    n, batch = len(loader.pixels), loader.batch_size
    count = min(n, images)
    if count >= batch:
        count = count // batch * batch
    order = np.random.default_rng([seed, 0xB4]).permutation(n)[:count]
    ones = (1,) * (loader.pixels.ndim - 2)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, *ones)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).reshape(1, -1, *ones)
    momenta = [m.momentum for m in layers]
    was_training = encoder.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    encoder.train()
    try:
        with torch.no_grad():
            for start in range(0, count, batch):
                x = loader.read(np.sort(order[start:start + batch])).to(device)
                if not x.is_floating_point():  # a loader of raw cache integers
                    x = to_unit(x)
                encoder((x - mean_t) / std_t)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        encoder.train(was_training)
    return {"layers": len(layers), "images": int(count)}
