"""Short supervised fine-tuning of the whole encoder plus a linear head.

The encoder (pretrained, or randomly initialised for the baseline: training from
scratch) and a linear classifier are trained end to end with cross-entropy, AdamW,
a linear warm-up then cosine schedule (optionally with layer-wise LR decay over a ViT's
blocks), and light augmentation (random resized crop with scale 0.5-1 and horizontal
flip, :mod:`sslkit.augment`; volumes ``(N, C, D, H, W)``: the 3D crop of a volume fraction
0.5-1 and a left-right (W) flip, :mod:`sslkit.augment3d`). After the last step the encoder's
BatchNorm running statistics are recomputed on the training images, un-augmented and normalised
as at prediction (:func:`sslkit.engine.batchnorm.recompute_batchnorm`, "precise BN"): a short
fine-tune leaves them between pretraining's and the augmented batches', and its predictions then
lean to one class (BENCHMARKS.md "Fine-tuning: BatchNorm statistics").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslkit.augment import Normalize, horizontal_flip, random_resized_crop
from sslkit.augment3d import random_flips, random_resized_crop_3d
from sslkit.data.loader import BatchLoader
from sslkit.engine.batchnorm import recompute_batchnorm
from sslkit.optim import build_optimizer, warmup_cosine
from sslkit.progress import counted
from sslkit.spec import InputSpec


@dataclass
class FinetuneOptions:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.05
    seed: int = 0
    #: ViTs: layer-wise LR decay (block i of L at layer_decay ** (L - i) x the LR, as in MAE's
    #: fine-tuning); None: one LR for every parameter
    layer_decay: float | None = None


#: the random resized crop's area (volumes: volume) fraction
CROP_SCALE = (0.5, 1.0)


def augment(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """The fine-tune's light augmentation of a batch in [0, 1]: images ``(B, C, H, W)``: random resized
    crop to ``spec.image_size`` and horizontal flip; volumes ``(B, C, D, H, W)``: their 3D twins, the
    crop resized back to the volume's size and only W (left-right) flipped, as the 3D views do."""
    if x.ndim == 5:
        return random_flips(random_resized_crop_3d(x, tuple(x.shape[2:]), CROP_SCALE), (2,))
    return horizontal_flip(random_resized_crop(x, spec.image_size, CROP_SCALE))


class Classifier(nn.Module):
    """``(B, C, S, S)`` (volumes ``(B, C, D, H, W)``) normalised pixels -> ``(B, K)`` logits: encoder
    then a linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.num_features), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def finetune(encoder: nn.Module, spec: InputSpec, pixels: np.ndarray, y: np.ndarray, n_classes: int,
             options: FinetuneOptions, device: torch.device, progress: bool = True) -> Classifier:
    """Train ``encoder`` + head on ``pixels: (N, C, S, S)`` (volumes ``(N, C, D, H, W)``) uint16 with
    labels ``y: (N,)``."""
    torch.manual_seed(options.seed)
    model = Classifier(encoder, n_classes).to(device).train()
    norm = Normalize(spec.mean, spec.std).to(device)
    loader = BatchLoader(pixels, options.batch_size, options.seed)
    steps = max(1, len(loader)) * options.epochs
    lr_scale = None
    if options.layer_decay is not None:
        from sslkit.init.continued import layer_decay_scale

        lr_scale = layer_decay_scale(model, options.layer_decay, "--finetune-layer-decay")
    optimizer = build_optimizer(model, "adamw", lr=options.lr, weight_decay=options.weight_decay, lr_scale=lr_scale)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, max(1, steps // 10)))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    batches = [(epoch, b) for epoch in range(options.epochs) for b in range(max(1, len(loader)))]
    for epoch, b in counted(batches, steps, "fine-tuning", "step", progress):
        idx = loader.indices(epoch, b)
        x = loader.read(idx).to(device)
        with torch.no_grad():
            x = norm(augment(x, spec))
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    recompute_batchnorm(model.encoder, loader, spec.mean, spec.std, device, options.seed)
    return model.eval()


@torch.no_grad()
def predict_proba(model: Classifier, spec: InputSpec, pixels: np.ndarray, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """``(N, C, S, S)`` (volumes ``(N, C, D, H, W)``) uint16 pixels -> ``(N, K)`` softmax probabilities."""
    norm = Normalize(spec.mean, spec.std).to(device)
    reader = BatchLoader(pixels, batch_size, seed=0)
    out = []
    for start in range(0, len(pixels), batch_size):
        x = reader.read(np.arange(start, min(start + batch_size, len(pixels)))).to(device)
        out.append(model(norm(x)).softmax(1).cpu().numpy())
    return np.concatenate(out)
