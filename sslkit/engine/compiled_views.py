"""The task's augmentation through ``torch.compile`` (with ``--compile`` on CUDA).

A view recipe is a few dozen small tensor ops on the whole batch (crop coordinates, flips,
colour jitter, blur, normalisation); eagerly each is a kernel launch and a round trip
through memory. Compiled, inductor fuses the elementwise chains into a handful of kernels.
Random draws stay torch's own (``fallback_random``): the compiled views use the same
random numbers as the eager ones, so a run's RNG stream, and its checkpoints, do not depend
on whether the views were compiled; the pixel values agree to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def compile_views(augment: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``augment`` compiled when it is a module (shapes static: one batch size, one image
    size); any other callable is returned as it is."""
    if not isinstance(augment, torch.nn.Module):
        return augment
    return torch.compile(augment, dynamic=False, options={"fallback_random": True})
