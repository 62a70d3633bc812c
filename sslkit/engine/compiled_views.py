"""The task's augmentation through ``torch.compile`` (with ``--compile`` on CUDA).

A view recipe is a few dozen small tensor ops on the whole batch (crop coordinates, flips,
colour jitter, blur, normalisation); eagerly each is a kernel launch and a round trip
through memory. Compiled, inductor fuses the elementwise chains into a handful of kernels.
Random draws stay torch's own (``fallback_random``): the compiled views use the same
random numbers as the eager ones, so a run's RNG stream, and its checkpoints, do not depend
on whether the views were compiled; the pixel values agree to float rounding. Where the
compiler refuses the views, the eager views are used and that is said once.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch


class CompiledViews:
    """``augment`` compiled; the eager ``augment`` when the first compiled call fails
    (said once).

    ``_orig_mod`` is the eager callable (as on a compiled module)."""

    def __init__(self, augment: torch.nn.Module, say: Callable[[str], None] | None = None) -> None:
        self._orig_mod = augment
        self.compiled: Callable[[torch.Tensor], Any] | None = torch.compile(
            augment, dynamic=False, options={"fallback_random": True})
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.proven = False  # once a compiled call succeeded, errors are the caller's again

    def __call__(self, x: torch.Tensor) -> Any:
        if self.compiled is not None:
            if self.proven:
                return self.compiled(x)
            try:
                out = self.compiled(x)
                self.proven = True
                return out
            except Exception as exc:  # compilation happens on the first call, before any op runs
                self.compiled = None
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self.say(f"note: --compile: the augmentation stays eager ({type(exc).__name__}: {first[:160]})")
        return self._orig_mod(x)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._orig_mod, name)


def compile_views(augment: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``augment`` compiled when it is a module (shapes static: one batch size, one image
    size); any other callable is returned as it is."""
    if not isinstance(augment, torch.nn.Module):
        return augment
    return CompiledViews(augment)
