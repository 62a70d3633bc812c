"""Option types shared by the ``sslkit`` commands."""

from __future__ import annotations

import math

import click


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and inf (click's range check lets nan through:
    every comparison with it is false), so ``--finetune-lr nan`` is one line, not a traceback."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv
