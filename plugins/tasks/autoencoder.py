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
    decoder_width: int = 256
    min_scale: float = 0.5

    def __post_init__(self) -> None:
        if self.decoder_width < 8:
            raise ValueError("decoder_width must be >= 8")
        check_unit_interval("min_scale", self.min_scale)


class Autoencoder(Task):
    Options = AutoencoderOptions
    #: base_lr measured (benchmarks/task_table.py, BENCHMARKS.md "Every task at one small CPU budget"):
    #: CIFAR-10 kNN 21.0 % at 3e-3 vs 19.7 % at 1e-3 (SE 0.9), random init 19.7 %
    engine_defaults = {"base_lr": 3e-3}
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
