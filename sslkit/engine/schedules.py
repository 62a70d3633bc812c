"""Learning-rate schedules by optimizer step: linear warm-up, then ``cosine``, ``constant``
or ``step`` decay (``--schedule``).

A schedule is a pure function of the step, so its whole state is the step count plus
the numbers below, which a checkpoint stores and ``run.json`` shows::

    factor(k) = (k + 1) / warmup                      k < warmup   (every schedule)
    cosine:   0.5 * (1 + cos(pi * (k - warmup) / (total - warmup)))    1 -> 0
    constant: 1
    step:     0.1 ** (number of milestones passed)    milestones at 60 % and 80 % of
                                                      the steps after warm-up (MoCo v1)
    lr(k) = peak_lr * factor(k)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sslkit.errors import UsageError, unknown_name_message
from sslkit.optim import warmup_cosine

SCHEDULES = ("cosine", "constant", "step")
STEP_MILESTONES = (0.6, 0.8)
STEP_GAMMA = 0.1
_STORED_NAME = {"cosine": "warmup_cosine", "constant": "warmup_constant", "step": "warmup_step"}


@dataclass(frozen=True)
class Schedule:
    """``lr_at(k)``: the LR of 0-based optimizer step ``k`` of a ``total``-step horizon."""

    kind: str
    peak_lr: float
    total: int
    warmup: int
    bound: str = "epochs"  # what set ``total``: "epochs" or "max_steps" (the smaller wins)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise UsageError(unknown_name_message("--schedule", self.kind, SCHEDULES))

    def factor(self, step: int) -> float:
        if self.kind == "cosine":
            return warmup_cosine(step, self.total, self.warmup)
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return STEP_GAMMA ** sum(progress >= m for m in STEP_MILESTONES)

    def lr_at(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint records (plain data)."""
        return {"name": _STORED_NAME[self.kind], "step": step, "total": self.total, "warmup": self.warmup,
                "lr": self.peak_lr}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def horizon(epochs: int | None, max_steps: int | None, steps_per_epoch: int) -> tuple[int, str]:
    """Optimizer steps of a run and which bound set them: ``--max-steps`` alone sets the
    length, ``--epochs`` alone too, and with both the smaller wins (a tie names epochs)."""
    by_epochs = epochs * steps_per_epoch if epochs is not None else None
    if max_steps is not None and (by_epochs is None or max_steps < by_epochs):
        return max_steps, "max_steps"
    return by_epochs, "epochs"


def make_schedule(kind: str, peak_lr: float, total: int, warmup_epochs: float, steps_per_epoch: int,
                  bound: str = "epochs") -> Schedule:
    """The run's schedule: warm-up of ``warmup_epochs`` (at most half the run), then ``kind``."""
    warmup = min(int(warmup_epochs * steps_per_epoch), total // 2)
    return Schedule(kind, peak_lr, total, warmup, bound)
