"""``--compile``: the model, and on CUDA the task's augmentation, through ``torch.compile``,
each falling back to eager when the compiler fails.

A view recipe is a few dozen small tensor ops on the whole batch (crop coordinates, flips,
colour jitter, blur, normalisation); eagerly each is a kernel launch and a round trip
through memory. Compiled, inductor fuses the elementwise chains into a handful of kernels.
Random draws stay torch's own (``fallback_random``): the compiled views use the same
random numbers as the eager ones, so a run's RNG stream, and its checkpoints, do not depend
on whether the views were compiled; the pixel values agree to float rounding.

Compilation happens on the first call. When it fails there (a graph the compiler refuses, or
a crash inside it: Triton 3.6 under torch 2.11 fails on the fused cross-entropy of SimCLR's
loss, BENCHMARKS.md "CUDA graphs on the H200"), that callable runs eagerly from then on and
the run says so in one line instead of ending in a compiler traceback. A failed first call
may have run the part of the graph before the break (random draws, batch-norm statistics):
the retried step is a real step, not a bit-identical replay of an eager run. Once a compiled
call has worked, later errors are the caller's, as without ``--compile``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from sslkit.errors import first_line


class CompiledOrEager:
    """``fn`` through ``torch.compile(fn, **options)``; the eager ``fn`` when the first compiled
    call fails (said once, naming ``what``). ``_orig_mod`` is ``fn``, as on a compiled module;
    other attributes are read through to it."""

    def __init__(self, fn: Callable[..., Any], what: str, say: Callable[[str], None] | None = None,
                 **options: Any) -> None:
        self._orig_mod = fn
        self.what = what
        self.compiled: Callable[..., Any] | None = torch.compile(fn, **options)
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.proven = False  # once a compiled call succeeded, errors are the caller's again

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            if self.proven:
                return self.compiled(*args, **kwargs)
            try:
                out = self.compiled(*args, **kwargs)
                self.proven = True
                return out
            except torch.OutOfMemoryError:  # not the compiler's: eagerly it would not fit either
                raise
            except Exception as exc:
                self.compiled = None
                self.say(f"note: --compile: {self.what} stays eager ({type(exc).__name__}: {first_line(exc)[:160]})")
        return self._orig_mod(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._orig_mod, name)


def compile_model(model: torch.nn.Module) -> CompiledOrEager:
    """The training model (the task, or DDP around it) compiled, eager if the compiler fails."""
    return CompiledOrEager(model, "the model")


def compile_views(augment: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``augment`` compiled when it is a module (shapes static: one batch size, one image
    size); any other callable is returned as it is."""
    if not isinstance(augment, torch.nn.Module):
        return augment
    return CompiledOrEager(augment, "the augmentation", dynamic=False, options={"fallback_random": True})
