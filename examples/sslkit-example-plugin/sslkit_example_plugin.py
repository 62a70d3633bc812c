"""An sslkit plugin that lives outside sslkit: one pretext task and one data source.

Install it with ``pip install ./examples/sslkit-example-plugin`` and it shows up in
``sslkit plugins`` and can be used as ``sslkit pretrain --task relpos --data synthetic:200``.

* Task ``relpos``: relative patch position (Doersch, Gupta, Efros, ICCV 2015). The image
  is cut into a 3x3 grid; the backbone embeds the centre cell and one random neighbour,
  and a classifier predicts which of the 8 neighbours it was:
  ``L = CE(h([f(x_centre), f(x_neighbour)]), k)``, ``k`` in 0..7.
* Source ``synthetic:N``: ``N`` procedurally drawn images (ellipses and bars on a noisy
  background), handy for trying sslkit without data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslkit.api import MultiView, SampleRef, Source, Task, UsageError, ViewRecipe, hookimpl, is_token_backbone


NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


@dataclass
class RelPosOptions:
    hidden_dim: int = 256


class RelativePosition(Task):
    Options = RelPosOptions
    default_backbone = "timm:resnet18"

    @classmethod
    def check(cls, backbone, spec):
        if is_token_backbone(backbone):
            return "relpos feeds the backbone 1/3-size patches; use a CNN such as timm:resnet18"
        if spec.image_size < 48:
            return f"relpos needs --image-size >= 48 (3x3 cells of >= 16 px), got {spec.image_size}"
        return None

    def __init__(self, backbone, options: RelPosOptions, spec) -> None:
        super().__init__(backbone, options, spec)
        d = backbone.num_features
        self.head = nn.Sequential(nn.Linear(2 * d, options.hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(options.hidden_dim, len(NEIGHBOURS)))

    def views(self, spec):
        recipe = ViewRecipe(spec.image_size, scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, gamma_p=0.0)
        return MultiView([recipe], spec.mean, spec.std)

    def forward(self, views):
        (x,) = views
        b, _, s, _ = x.shape
        cell = s // 3
        labels = torch.randint(len(NEIGHBOURS), (b,), device=x.device)
        offsets = torch.tensor(NEIGHBOURS, device=x.device)[labels]  # (B, 2) row, col
        centre = x[:, :, cell : 2 * cell, cell : 2 * cell]
        rows = (1 + offsets[:, 0]) * cell
        cols = (1 + offsets[:, 1]) * cell
        idx = torch.arange(cell, device=x.device)
        r = (rows[:, None] + idx[None]).view(b, 1, cell, 1).expand(-1, x.shape[1], -1, s)
        neighbour = x.gather(2, r)
        c = (cols[:, None] + idx[None]).view(b, 1, 1, cell).expand(-1, x.shape[1], cell, -1)
        neighbour = neighbour.gather(3, c)
        feats = self.encoder(torch.cat([centre, neighbour]))
        logits = self.head(torch.cat(feats.chunk(2), dim=1))
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "accuracy": acc}


@dataclass
class SyntheticOptions:
    size: int = 64
    channels: int = 1
    seed: int = 0


class SyntheticSource(Source):
    """``synthetic:N``: N generated images; class label = number of shapes drawn (1 or 2)."""

    scheme = "synthetic"
    Options = SyntheticOptions

    def __init__(self, location: str, options: SyntheticOptions | None = None) -> None:
        super().__init__(location, options or SyntheticOptions())
        try:
            self.count = int(location)
        except ValueError:
            raise UsageError(f"synthetic: expects a number of images, e.g. synthetic:200, got {location!r}") from None
        if self.count < 1:
            raise UsageError("synthetic: needs at least 1 image")

    def index(self) -> list[SampleRef]:
        # `path` must name a file for fingerprints; the module file stands in for all frames.
        return [SampleRef(__file__, frame=i, group=str(i), label=str(1 + i % 2)) for i in range(self.count)]

    def channels_of(self, ref: SampleRef) -> int:
        return self.options.channels

    def load(self, ref: SampleRef) -> np.ndarray:
        o = self.options
        rng = np.random.default_rng([o.seed, ref.frame])
        yy, xx = np.mgrid[0 : o.size, 0 : o.size] / o.size
        img = rng.random((o.size, o.size)) * 0.15
        for _ in range(1 + ref.frame % 2):
            cy, cx, ry, rx = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2)
            img += 0.8 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
        img = np.clip(img, 0, 1).astype(np.float32)
        return np.repeat(img[None], o.channels, axis=0)

    def describe(self) -> dict:
        return {"synthetic": {"size": self.options.size, "seed": self.options.seed}}


@hookimpl
def register_tasks(register):
    register("relpos", RelativePosition)


@hookimpl
def register_sources(register):
    register("synthetic", SyntheticSource)
