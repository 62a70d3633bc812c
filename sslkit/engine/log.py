"""What a run prints while it trains: a progress bar on a terminal, plain lines in a file.

On a TTY the bar (tqdm, on stderr) shows steps, loss, LR and images/s. When stderr is
not a terminal (a log file, a SLURM job, CI) a ``\\r``-redrawn bar would pile up in the
file, so one plain line is printed every :func:`log_interval` steps instead::

    simclr step 200/1000 epoch 3 loss 4.1203 lr 9.62e-04 img/s 41.3
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def note(line: str) -> None:
    """A one-line message that does not break a progress bar (stdout)."""
    tqdm.write(line)


def done_line(summary: dict[str, Any], out: str) -> str:
    """The last line of a finished ``sslkit pretrain``: the run's steps and the bound that ended it, then the time,
    img/s and steps of this session (after a resume said as this session's: they cover it alone)."""
    steps, loss = summary["steps"], summary.get("final_loss")
    bound = {"max_steps": " (the --max-steps bound)", "epochs": " (the --epochs bound)"}.get(
        summary.get("stopped_by"), "")
    if loss is None:  # no step trained in this session
        return f"done: {steps} steps{bound}; run saved in {out}"
    ips = summary.get("img_per_s")
    speed = f"in {summary['seconds']:.1f} s" + (f", {ips:.1f} img/s" if ips else "")
    own = summary.get("steps_this_session", steps)
    if own == steps:
        return f"done: {steps} steps{bound} {speed}, final loss {loss:.4f}; run saved in {out}"
    return (f"done: {steps} steps{bound}; this session trained {own} of them (from step "
            f"{summary.get('from_step', steps - own)}) {speed}; final loss {loss:.4f}; run saved in {out}")


def log_interval(total: int) -> int:
    """Steps between two plain log lines: every 10 % of the run rounded up (15 steps: every 2), at most
    every 100 steps."""
    return max(1, min(100, -(-total // 10)))


class Progress:
    """Steps done out of ``total``, shown as a bar (TTY) or lines (otherwise), or not at all."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool) -> None:
        self.desc, self.total, self.enabled = desc, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = log_interval(total)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not self.tty)

    def update(self, row: dict[str, Any]) -> None:
        """After each logged step: ``row`` holds ``step``, ``epoch``, ``loss``, ``lr``, ``img_per_s``."""
        if self.tty:  # the values first: update() draws them with this step's count
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.0f}",
                                 refresh=False)
            self.bar.update(1)
        elif self.enabled and (row["step"] % self.every == 0 or row["step"] == self.total):
            print(f"{self.desc} step {row['step']}/{self.total} epoch {row['epoch']} loss {row['loss']:.4f} "
                  f"lr {row['lr']:.2e} img/s {row['img_per_s']:.1f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
