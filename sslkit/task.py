"""The task protocol: a pretext task wraps a backbone and turns views into a loss.

The engine does, for every batch of images ``x: (B, C, S, S)`` in ``[0, 1]``::

    views = task.augment(x)        # built once by task.views(spec); batched, on device
    out = task(views)              # {"loss": scalar tensor, other scalars to log}
    ...backward, optimizer step...
    task.on_step_end(step, total)  # EMA teachers, queues, centres, schedules

Only ``task.encoder`` (the backbone alone) is exported.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from sslkit.spec import InputSpec

Views = tuple[torch.Tensor, ...]
"""What ``Task.views(spec)(x)`` returns and ``Task.forward`` receives: a tuple of tensors
(normalised views, and e.g. labels or masks a task draws with them), all on the batch's device."""


class Task(nn.Module):
    """Base class of every pretext task.

    Subclasses set ``Options`` (a dataclass whose fields are the ``--task-opt`` options;
    ``None`` for no options) and ``default_backbone``, and implement ``views`` and
    ``forward``.
    """

    Options: ClassVar[type | None] = None
    default_backbone: ClassVar[str] = "timm:resnet18"

    def __init__(self, backbone: nn.Module, options: Any, spec: InputSpec) -> None:
        super().__init__()
        self.encoder = backbone
        self.options = options
        self.spec = spec

    @classmethod
    def check(cls, backbone: nn.Module, spec: InputSpec) -> str | None:
        """Why this backbone/input pairing cannot work (one line), or None."""
        return None

    def views(self, spec: InputSpec) -> Callable[[torch.Tensor], Views]:
        """The augmentation: ``(B, C, S, S)`` in [0, 1] -> tuple of normalised views."""
        raise NotImplementedError

    def forward(self, views: Views) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called by the engine after every optimizer step (1-based ``step``)."""
