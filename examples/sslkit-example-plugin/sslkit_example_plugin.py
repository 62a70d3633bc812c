"""An sslkit plugin outside sslkit, on ``sslkit.api`` alone: one task and one source.

* Task ``relpos``: relative patch position (Doersch, Gupta, Efros, ICCV 2015). The backbone
  embeds the centre cell of a 3x3 grid and one random neighbour ``k`` in 0..7; a classifier
  predicts ``k``: ``L = CE(h([f(x_centre), f(x_neighbour)]), k)``.
* Source ``synthetic:N``: ``N`` drawn images (ellipses on noise), for trying sslkit without data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslkit.api import MultiView, SampleRef, Source, Task, UsageError, ViewRecipe, hookimpl, is_token_backbone

sslkit_api = ">=1,<2"
NEIGHBOURS = torch.tensor([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


@dataclass
class RelPosOptions:
    hidden_dim: int = 256


class RelativePosition(Task):
    Options = RelPosOptions

    @classmethod
    def check(cls, backbone, spec):
        if is_token_backbone(backbone):
            return "relpos feeds the backbone 1/3-size patches; use a CNN such as timm:resnet18"
        if spec.image_size < 48:
            return f"relpos needs --image-size >= 48 (3x3 cells of >= 16 px), got {spec.image_size}"
        return None

    def __init__(self, backbone, options: RelPosOptions, spec) -> None:
        super().__init__(backbone, options, spec)
        self.head = nn.Sequential(nn.Linear(2 * backbone.num_features, options.hidden_dim), nn.ReLU(),
                                  nn.Linear(options.hidden_dim, len(NEIGHBOURS)))

    def views(self, spec):
        crop = ViewRecipe(spec.image_size, scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, gamma_p=0.0)
        return MultiView([crop], spec.mean, spec.std)

    def forward(self, views):
        (x,) = views
        cell = x.shape[-1] // 3
        labels = torch.randint(len(NEIGHBOURS), (x.shape[0],), device=x.device)
        r, c = (1 + NEIGHBOURS.to(x.device)[labels]).unbind(1)
        neighbour = torch.stack([img[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
                                 for img, i, j in zip(x, r.tolist(), c.tolist())])
        feats = self.encoder(torch.cat([x[:, :, cell:2 * cell, cell:2 * cell], neighbour]))
        logits = self.head(torch.cat(feats.chunk(2), dim=1))
        return {"loss": F.cross_entropy(logits, labels), "accuracy": (logits.argmax(1) == labels).float().mean()}


@dataclass
class SyntheticOptions:
    size: int = 64
    channels: int = 1


class SyntheticSource(Source):
    """``synthetic:N``: N generated images; class label = number of ellipses (1 or 2)."""

    scheme = "synthetic"
    Options = SyntheticOptions

    def __init__(self, location: str, options: SyntheticOptions | None = None) -> None:
        super().__init__(location, options or SyntheticOptions())
        if not location.isdigit() or int(location) < 1:
            raise UsageError(f"synthetic: expects a number of images, e.g. synthetic:200, got {location!r}")

    def index(self) -> list[SampleRef]:  # `path` must be a real file: this module stands in for all
        return [SampleRef(__file__, frame=i, group=str(i), label=str(1 + i % 2)) for i in range(int(self.location))]

    def load(self, ref: SampleRef) -> np.ndarray:
        rng, n = np.random.default_rng(ref.frame), self.options.size
        yy, xx = np.mgrid[0:n, 0:n] / n
        img = rng.random((n, n)) * 0.15
        for _ in range(1 + ref.frame % 2):
            cy, cx, ry, rx = rng.uniform(0.2, 0.8, 2).tolist() + rng.uniform(0.05, 0.2, 2).tolist()
            img += 0.8 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
        return np.repeat(np.clip(img, 0, 1).astype(np.float32)[None], self.options.channels, axis=0)


@hookimpl
def register_tasks(register):
    register("relpos", RelativePosition)


@hookimpl
def register_sources(register):
    register("synthetic", SyntheticSource)
