"""Task ``autoencoder``: a plain convolutional autoencoder (Hinton & Salakhutdinov, Science 2006;
Masci et al., ICANN 2011 for the convolutional form).

The backbone ``f`` is the encoder; its pooled embedding ``f(x): (B, D)`` is the bottleneck,
and a convolutional decoder ``d`` (:class:`sslkit.heads.ConvDecoder`) reconstructs the
normalised image from it::

    L = 1 / (B C S S) * || d(f(x)) - x ||_2^2

Defaults: decoder width 256 at 4x4, halved at every 2x upsampling; views = random resized
crop (scale 0.5-1) + flip, no colour augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from sslkit.api import ConvDecoder, Task, check_unit_interval, hookimpl, reconstruction_views


@dataclass
class AutoencoderOptions:
    decoder_width: int = 256  # decoder channels at its first 4x4 map, halved at every 2x upsampling (down to 32), >= 8
    min_scale: float = 0.5  # smallest area fraction of the random resized crop (scale min_scale-1), in (0, 1]

    def __post_init__(self) -> None:
        if self.decoder_width < 8:
            raise ValueError("decoder_width must be >= 8")
        check_unit_interval("min_scale", self.min_scale)


class Autoencoder(Task):
    Options = AutoencoderOptions
    #: LARS at rotation's LR, measured (benchmarks/task_table.py, BENCHMARKS.md "LARS for the CNN
    #: reconstruction tasks"): against the former AdamW 3e-3 at 2 CPU min, CIFAR-10 kNN (ResNet-18, 32 px,
    #: 5,000 test images) +4.4 / +3.6 (paired SE 0.6) over two seeds, chest X-ray AUROC +0.004 (0.004) / +0.013 (0.005)
    engine_defaults = {"optimizer": "lars", "base_lr": 2.4, "lr_scaling": "sqrt", "weight_decay": 1e-6}
    #: a ViT-like backbone keeps the former AdamW default (LARS not measured there)
    token_engine_defaults = {"optimizer": "adamw", "base_lr": 3e-3, "lr_scaling": "linear", "weight_decay": 0.05}
    default_backbone = "timm:resnet18"

    def __init__(self, backbone, options: AutoencoderOptions, spec) -> None:
        super().__init__(backbone, options, spec)
        self.decoder = ConvDecoder(backbone.num_features, spec.channels, spec.image_size, options.decoder_width)

    def views(self, spec):
        return reconstruction_views(spec, self.options.min_scale)

    def forward(self, views):
        (x,) = views
        return {"loss": F.mse_loss(self.decoder(self.encoder(x)), x)}


@hookimpl
def register_tasks(register):
    register("autoencoder", Autoencoder)
