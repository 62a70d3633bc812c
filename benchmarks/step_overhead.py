"""sslkit's SimCLR training step vs a bare PyTorch loop on the same tensors.

Both run timm resnet18 + the SimCLR projection head + NT-Xent + backward + the optimizer
``sslkit pretrain --task simclr`` resolves (the task's engine_defaults: LARS, base_lr 1.2 with
sqrt scaling, weight decay 1e-6; built by ``sslkit.optim.build_optimizer`` on both sides) on the
same pre-made views. The sslkit side is the engine's real loop (autocast context, loss
reduction and finiteness check, LR schedule, optimizer step, on_step_end, metrics.csv
row, progress bar), fed the fixed views instead of fresh augmentations; its per-step
times are read back from metrics.csv. Blocks of the two alternate, so load from other
processes on the machine hits both alike; the ratio of the medians is printed. The process sets
glibc's malloc as ``sslkit``'s command does at its start (``sslkit.host_malloc``; both sides share it;
``SSLKIT_MALLOC=system`` leaves glibc's own).

    .venv/bin/python benchmarks/step_overhead.py [--steps 24] [--batch-size 256] [--image-size 32]
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslkit.engine import Events, RunInfo, RunState, Setup, StopSignal, build, train
from sslkit.engine.callbacks import create_callbacks
from sslkit.config import resolve
from sslkit.host_malloc import tune_host_malloc
from sslkit.optim import build_optimizer
from sslkit_plugins.tasks.simclr import nt_xent_loss


def synthetic_folder(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "x").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "x" / f"{i}.png")
    return root


class EngineRun:
    """A built engine run: its :class:`Setup`, position and callbacks (metrics.csv only).

    The setup's fields read and write through this object (``run.loader = ...``)."""

    def __init__(self, setup: Setup, state: RunState, events: Events) -> None:
        object.__setattr__(self, "setup", setup)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "events", events)

    def __getattr__(self, name: str):
        return getattr(self.setup, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.setup, name, value)


def sslkit_trainer(data: str, work: Path, batch_size: int, image_size: int | None, task: str = "simclr",
                   backbone: str = "timm:resnet18", device: str = "cpu", **cfg) -> EngineRun:
    """An engine run (SimCLR/resnet18 by default), built through the engine's public
    :func:`sslkit.engine.build`, writing only metrics.csv (run dir in ``work``). The config is
    resolved as ``sslkit pretrain`` resolves it (:func:`sslkit.config.resolve`: defaults < the task's
    engine_defaults < ``cfg``), so the task's optimizer, LR rule and weight decay apply.
    ``image_size=None`` leaves the side unset, as a volume run must (its samples are the source's
    ``volume_size``: ``--image-size`` is refused there)."""
    sizes = {} if image_size is None else {"image_size": image_size}
    config = resolve(dict(task=task, data=data, out=str(work / "run"), backbone=backbone, batch_size=batch_size,
                          **sizes, epochs=1, progress=False, device=device, callbacks="csv", **cfg))
    setup = build(config, torch.device(device))
    (work / "run").mkdir(parents=True, exist_ok=True)
    events = Events(create_callbacks("csv"))
    events.emit("on_run_start", RunInfo(setup.out, setup.info, 0, setup.total, 0, 1))
    return EngineRun(setup, RunState(), events)


class FixedLoader:
    """Stands in for BatchLoader: the same batch every time."""

    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def epoch(self, epoch: int, start: int = 0):
        while True:
            yield self.batch


def optimizer_label(run: EngineRun) -> str:
    """The optimizer a run actually steps with, for a report's header: e.g. ``LARS lr 1.2 (base_lr 1.2,
    sqrt scaling), weight decay 1e-06``."""
    c = run.cfg
    rule = f"base_lr {c.base_lr:g}, {c.lr_scaling} scaling" if getattr(c, "lr", None) is None else "--lr as given"
    return f"{type(run.optimizer).__name__} lr {run.schedule.peak_lr:.3g} ({rule}), weight decay {c.weight_decay:g}"


def run_engine(run: EngineRun, steps: int) -> None:
    """Run the engine's real loop (:func:`sslkit.engine.train`) for ``steps`` more optimizer
    steps, as one epoch with the schedule's horizon at its end; checkpoints are not part of
    a step and are not written."""
    s, state = run.setup, run.state
    s.steps_per_epoch = state.pos + steps
    s.schedule = dataclasses.replace(s.schedule, total=state.step + steps)
    train(s, state, run.events, StopSignal(), save=None, until=state.step + steps)


def engine_step_times(run: EngineRun) -> list[float]:
    """Seconds per step from metrics.csv (``img_per_s`` is measured over each step's own time)."""
    with open(Path(run.cfg.out) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [run.step_images / float(r["img_per_s"]) for r in rows]


def fixed_views(batch_size: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch_size, 3, image_size, image_size, generator=g),
            torch.randn(batch_size, 3, image_size, image_size, generator=g))


def bare_step_fn(task, cfg, lr: float):
    """The bare loop: same modules (a copy), NT-Xent, backward, the run's optimizer (``cfg``: the
    resolved RunConfig; :func:`sslkit.optim.build_optimizer`, as the engine builds it), nothing else."""
    model = copy.deepcopy(task)
    opt = build_optimizer(model, cfg.optimizer, lr, cfg.weight_decay, cfg.momentum, cfg.betas)
    model.train()

    def step(views) -> None:
        x1, x2 = views
        z = model.projector(model.encoder(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        loss = nt_xent_loss(z1, z2, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleave(blocks: int, per_block: int, engine_block, other_block):
    """Alternate blocks of the two sides, swapping which goes first every round.

    Returns per-step wall times (the first step of every block is a warm-up and left out)
    and the CPU time per step of each side (``time.process_time`` over whole blocks, which
    other processes on the machine disturb much less than wall time).
    """
    a: list[float] = []
    b: list[float] = []
    cpu = {"a": 0.0, "b": 0.0}

    def run(side: str, fn) -> list[float]:
        t = time.process_time()
        times = fn(per_block)
        cpu[side] += time.process_time() - t
        return times[1:]

    for i in range(blocks):
        if i % 2 == 0:
            a += run("a", engine_block)
            b += run("b", other_block)
        else:
            b += run("b", other_block)
            a += run("a", engine_block)
    n = blocks * per_block
    return a, b, cpu["a"] / n, cpu["b"] / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24, help="steps per side (in blocks of 4)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    malloc = tune_host_malloc()  # as sslkit's command does first (sslkit/cli.py); SSLKIT_MALLOC=system: glibc's own
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_folder(work / "data", args.batch_size, args.image_size)
        trainer = sslkit_trainer(f"folder:{data}", work, args.batch_size, args.image_size)
        views = fixed_views(args.batch_size, args.image_size)
        trainer.loader = FixedLoader(torch.zeros(args.batch_size, 3, args.image_size, args.image_size))
        trainer.augment = lambda x: views
        bare = bare_step_fn(trainer.task, trainer.cfg, trainer.schedule.peak_lr)
        per_block = 4
        blocks = max(1, args.steps // per_block)
        seen = [0]

        def engine_block(n: int) -> list[float]:
            run_engine(trainer, n)
            times = engine_step_times(trainer)[seen[0]:]
            seen[0] += n
            return times

        # a fresh process runs its first steps several times slower (allocator and kernel
        # caches warming up): one untimed block of each side first
        engine_block(6)
        time_calls(lambda: bare(views), 6)
        ours, theirs, cpu_ours, cpu_bare = interleave(blocks, per_block, engine_block,
                                                      lambda n: time_calls(lambda: bare(views), n))
    m_ours, m_bare = statistics.median(ours), statistics.median(theirs)
    print(f"simclr resnet18 {args.image_size}px batch {args.batch_size}, {optimizer_label(trainer)}, "
          f"{len(ours)} timed steps per side, torch threads {torch.get_num_threads()}; malloc {malloc}")
    print(f"sslkit engine step  median wall {m_ours * 1000:8.1f} ms   CPU {cpu_ours * 1000:8.1f} ms")
    print(f"bare loop step      median wall {m_bare * 1000:8.1f} ms   CPU {cpu_bare * 1000:8.1f} ms")
    print(f"ratio sslkit / bare = {m_ours / m_bare:.3f} wall, {cpu_ours / cpu_bare:.3f} CPU time  (target <= 1.05)")


if __name__ == "__main__":
    main()
