"""The step loop: data -> views -> task loss -> optimizer, with checkpoints and logs.

One optimizer step (:func:`train_step`) is::

    for each of `accumulate` micro-batches x: (b, C, S, S), b = batch_size / world:
        views = augment(x)                      # task.views(spec), batched, on device
        with autocast(precision): out = model(views)
        scaler.scale(out["loss"] / accumulate).backward()   # DDP syncs on the last one
    clip the global gradient norm; set LR = schedule(step); optimizer step
    task.on_step_end(step, total)               # EMA teachers, queues, centres
    scalars (+ the stop flag) = mean over ranks (one all-reduce)

:func:`train` runs steps until the horizon (or a stop signal), checkpointing every
``checkpoint_every`` steps (else at every epoch end) and at the end. Each step's scalars are
read one step late (:class:`StepLog`): reading a loss waits for the device, and reading
step N's while step N+1 is queued keeps a GPU busy while Python launches work. A NaN
loss is still caught before any checkpoint could hold it: a checkpoint first reads every
step it covers.

A stop signal (:class:`~sslkit.engine.signals.StopSignal`) is a host-side flag. One process
stops as soon as the step in flight ends. Processes under torchrun must stop after the same
step, so the flag travels with a step's all-reduced scalars (read at the end of the step) and
is read one step late like them: they stop after the step in flight and one more (two more
when the signal came between steps, while the loop read a loss or wrote a checkpoint). A
pre-emption before the loop is agreed on once, before the first step (:func:`agreed_preemption`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sslkit import distributed
from sslkit.data.loader import to_unit
from sslkit.engine import state as run_state
from sslkit.engine.events import Events
from sslkit.engine.log import Progress
from sslkit.engine.setup import Setup, on_main
from sslkit.engine.state import RunState
from sslkit.engine.step_log import StepLog
from sslkit.engine.transfer import prefetch_to
from sslkit.errors import UsageError
from sslkit.optim import set_lr
from sslkit.preempt import pending
from sslkit.task import RESERVED_METRICS


SaveFn = Callable[[Setup, RunState], "Path | None"]


def train(s: Setup, state: RunState, events: Events, stop: Any, save: SaveFn | None = run_state.save,
          until: int | None = None) -> dict[str, Any]:
    """Train from ``state`` to step ``until`` (default: the horizon ``s.total``), or until
    ``stop.requested`` turns True; ``save`` writes a checkpoint (None: never). Returns the
    session's summary (the run's steps; this session's steps_this_session from from_step, its seconds and
    img_per_s; final_loss, interrupted, main)."""
    cfg, until = s.cfg, s.total if until is None else until
    log = StepLog(s, events, Progress(cfg.task, s.total, state.step, cfg.progress and s.main))
    start_step, saved_at, interrupted = state.step, state.step, False
    t_start = time.perf_counter()
    s.task.train()
    if agreed_preemption(s):  # a process of the group got SIGTERM / SIGUSR1 before the loop
        interrupted = log.requeue = True
    try:
        while state.step < until and not interrupted:
            if state.pos >= s.steps_per_epoch:
                state.epoch, state.pos = state.epoch + 1, 0
            # on CUDA each batch is copied one step ahead on its own stream (transfer.py)
            batches = prefetch_to(s.loader.epoch(state.epoch, state.pos * cfg.accumulate), s.device)
            try:
                while state.pos < s.steps_per_epoch and state.step < until:
                    t0 = time.perf_counter()
                    log.launch(lambda: train_step(s, state, batches, stop=stop, halt=log.failed is not None), state)
                    interrupted = log.read(keep=1) or stopped_alone(s, stop, log)  # one process: now
                    log.timed(time.perf_counter() - t0)  # the step's own time, not a checkpoint's
                    periodic = periodic_checkpoint(cfg.checkpoint_every, state.step, state.pos >= s.steps_per_epoch)
                    if periodic or state.step >= until or interrupted:
                        interrupted = log.read(keep=0) or interrupted
                        _checkpoint(s, state, log, save)
                        saved_at = state.step
                        # a signal while it was written: stop here (one process), no step more
                        interrupted = interrupted or stopped_alone(s, stop, log)
                    if interrupted:
                        break
            finally:
                batches.close()
        # a stop that came with the last step has nothing left to stop: the run finishes
        interrupted = (log.read(keep=0) or interrupted) and state.step < until
        if saved_at != state.step:
            _checkpoint(s, state, log, save)
        if s.world > 1:  # a failed write held since the last step's all-reduce (an on_checkpoint's)
            on_main(log.check)
    finally:
        log.progress.close()
    elapsed = time.perf_counter() - t_start
    return {
        "steps": state.step, "steps_this_session": state.step - start_step, "from_step": start_step,
        "seconds": round(elapsed, 2),
        "img_per_s": round(log.images / elapsed, 2) if elapsed > 0 and log.images else None,
        "final_loss": log.last.get("loss"), "interrupted": interrupted, "requeue": interrupted and log.requeue,
        "main": s.main,
    }


def periodic_checkpoint(every: int | None, step: int, end_of_epoch: bool) -> bool:
    """Whether the periodic checkpoints include ``step``: every ``every`` steps (``--checkpoint-every``)
    when given, and then alone (no epoch end adds one: a small data set ends an epoch every few
    steps); else every epoch end. The last step and a stop checkpoint besides."""
    return step % every == 0 if every else end_of_epoch


def _checkpoint(s: Setup, state: RunState, log: StepLog, save: SaveFn | None) -> None:
    if s.world > 1:  # none past a row rank 0 could not write (step_log's docstring)
        on_main(log.check)
    path = save(s, state) if save is not None else None
    if path is not None:
        log.emit("on_checkpoint", path)


def train_step(s: Setup, state: RunState, batches: Iterator[torch.Tensor], stop: Any = None,
               halt: bool = False) -> dict[str, torch.Tensor]:
    """Launch one optimizer step from the next ``accumulate`` batches; advance ``state``.

    Returns the step's scalars as 0-d device tensors, not yet read (means over
    micro-batches and ranks; ``stop`` > 0 when any rank was asked to stop, ``requeue`` > 0
    when by a pre-emption signal; ``halt`` > 0, under torchrun, when rank 0 holds a failed write: ``halt``,
    :mod:`~sslkit.engine.step_log`; ``grad_norm`` when clipping). ``stop``: a
    :class:`~sslkit.engine.signals.StopSignal` whose flags are read as the step ends, just
    before its scalars are all-reduced (None: no stop).
    """
    capture = getattr(s, "capture", None)  # --capture: the step replayed as one CUDA graph (capture.py)
    captured = capture is not None and capture.active
    scalars = capture.run(s, state.step, batches) if captured else accumulate(s, batches)
    grad_norm = None if captured else optimizer_step(s, state.step)  # captured: stepped in the graph
    state.step, state.pos = state.step + 1, state.pos + 1
    s.task.on_step_end(state.step, s.total)
    # read as late as can be: a signal during this step travels with it
    stop_requested, requeue = (stop.requested, stop.requeue) if stop is not None else (False, False)
    scalars["stop"], scalars["requeue"] = float(stop_requested), float(requeue)
    if s.world > 1:
        scalars["halt"] = float(halt)
    scalars = reduce_over_ranks(s, scalars)
    if grad_norm is not None:
        scalars["grad_norm"] = grad_norm
    return scalars


def stopped_alone(s: Setup, stop: Any, log: "StepLog") -> bool:
    """One process: whether a stop signal has arrived (a host-side flag: no wait for the device).
    Under torchrun the flag goes through the steps' all-reduce instead, so all ranks stop together."""
    if s.world > 1 or not stop.requested:
        return False
    log.requeue = log.requeue or bool(stop.requeue)
    return True


def agreed_preemption(s: Setup) -> bool:
    """Under torchrun, once per session before the first step: whether any process got a pre-emption
    signal before the loop (noted by :func:`sslkit.preempt.preemptible`, which under torchrun does not
    unwind one process alone), in one all-reduce; then every process stops before training."""
    if s.world == 1:
        return False
    flag = torch.tensor([1.0 if pending() else 0.0], device=s.device)
    distributed.all_reduce_sum(flag)
    return bool(flag.item() > 0)


def accumulate(s: Setup, batches: Iterator[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward and backward ``accumulate`` micro-batches; the mean of each logged scalar."""
    K = s.cfg.accumulate
    sums: dict[str, torch.Tensor] = {}
    for k in range(K):
        x = next(batches).to(s.device, non_blocking=True)
        if not x.is_floating_point():  # the cache's uint16 copied as is (half the bytes): scale on the device
            x = to_unit(x)
        if x.dim() == 4 and x.shape[-1] != s.spec.image_size:  # stored at --cache-size: resize on the device
            x = torch.nn.functional.interpolate(x, size=(s.spec.image_size,) * 2, mode="bilinear",
                                                antialias=True, align_corners=False)
        views = s.augment(x)
        if s.channels_last:
            views = tuple(v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in views)
        sync = s.ddp.no_sync() if (s.ddp is not None and k < K - 1) else contextlib.nullcontext()
        with sync:
            with torch.autocast(s.device.type, dtype=s.autocast_dtype or torch.float32,
                                enabled=s.autocast_dtype is not None):
                first = not getattr(s, "outputs_checked", False)
                result = first_forward(s, views) if first else s.model(views)
            # every step, before its backward: a later step's output can break the contract too (host-side
            # checks of types and shapes, no wait for the device)
            check_outputs(s, result)
            loss = result["loss"]
            s.scaler.scale(loss.float() / K).backward()
            if first:
                check_encoder_trained(s)
        if not RESERVED_METRICS.isdisjoint(result):
            _reserved(s, result)
        for name, v in result.items():  # checked: 1-element tensors and Python numbers
            if torch.is_tensor(v):
                sums[name] = sums.get(name, 0) + v.detach().float().reshape(()) / K
            else:
                sums[name] = sums.get(name, 0) + float(v) / K
    return sums


def first_forward(s: Setup, views: Any) -> Any:
    """A session's first forward, where a batch that BatchNorm cannot normalise in training (one value
    per channel: one image and a 1x1 map) is one line, not torch's traceback."""
    try:
        return s.model(views)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise UsageError(f"a batch of {views[0].shape[0]} image(s) leaves {s.cfg.backbone}'s BatchNorm one value per "
                         f"channel at --image-size {s.spec.image_size}; use --batch-size 2 or more, with at least "
                         f"2 images per process") from None


def check_outputs(s: Setup, result: Any) -> None:
    """Refuse, in one line naming the task, what ``forward`` returned that the step cannot use:
    no dict, a ``loss`` that is no scalar tensor, or another value that is no scalar for
    ``metrics.csv`` (a Python number or a 1-element tensor). Run on every step."""
    problem = output_problem(result)
    if problem:
        from sslkit.registry import plugin_of

        raise UsageError(f"task {s.cfg.task!r} (plugin {plugin_of('tasks', s.cfg.task)!r}) {problem}")
    s.outputs_checked = True


def check_encoder_trained(s: Setup) -> None:
    """After a session's first backward: refuse, in one line, a loss that gives no trainable encoder
    parameter a gradient (a task whose loss ignores ``self.encoder`` would train nothing to export)."""
    params = [p for p in s.task.encoder.parameters() if p.requires_grad]
    if params and all(p.grad is None for p in params):
        from sslkit.registry import plugin_of

        raise UsageError(f"task {s.cfg.task!r} (plugin {plugin_of('tasks', s.cfg.task)!r}): its loss gives no "
                         f"parameter of the encoder a gradient, so pretraining would not change it; the loss must "
                         f"depend on self.encoder's output")


def output_problem(result: Any) -> str | None:
    """Why a task's ``forward`` output breaks the contract (``returned ...``), or None."""
    import numbers

    if not isinstance(result, dict):
        return f"returned {type(result).__name__}; forward must return a dict {{'loss': scalar tensor, ...}}"
    if "loss" not in result:
        return f"returned no 'loss' (keys: {', '.join(map(str, result)) or 'none'}); forward must return one"
    loss = result["loss"]
    if not torch.is_tensor(loss) or loss.numel() != 1:
        what = f"shape {tuple(loss.shape)}" if torch.is_tensor(loss) else f"type {type(loss).__name__}"
        return f"returned a loss of {what}; it must be a scalar tensor"
    for key, v in result.items():
        if torch.is_tensor(v) and v.numel() != 1:
            return (f"returned the metric {key!r} of shape {tuple(v.shape)}; every value besides 'loss' is one "
                    f"number for metrics.csv: a Python int/float or a 1-element tensor")
        if not torch.is_tensor(v) and not isinstance(v, numbers.Real):
            return (f"returned the metric {key!r} of type {type(v).__name__}; every value besides 'loss' is one "
                    f"number for metrics.csv: a Python int/float or a 1-element tensor")
    return None


def _reserved(s: Setup, result: dict[str, Any]) -> None:
    from sslkit.registry import plugin_of

    clash = sorted(RESERVED_METRICS.intersection(result))
    raise UsageError(f"task {s.cfg.task!r} (plugin {plugin_of('tasks', s.cfg.task)!r}) returned the metric "
                     f"{clash[0]!r}, which the engine logs itself; rename it (reserved: "
                     f"{', '.join(sorted(RESERVED_METRICS))})")


def reduce_over_ranks(s: Setup, scalars: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Mean of every scalar over ranks (``stop`` > 0 if any rank's is), in one collective."""
    names = sorted(scalars)
    vec = torch.stack([torch.as_tensor(scalars[n], dtype=torch.float32, device=s.device).reshape(())
                       for n in names])
    if s.world > 1:
        distributed.all_reduce_sum(vec)
        vec = vec / s.world
    return dict(zip(names, vec.unbind()))


def optimizer_step(s: Setup, step: int) -> torch.Tensor | None:
    """Set the LR of 0-based ``step``, then :func:`apply_gradients`."""
    set_lr(s.optimizer, s.schedule.lr_at(step), step)
    return apply_gradients(s)


def apply_gradients(s: Setup) -> torch.Tensor | None:
    """Clip (with ``--grad-clip``), step at the optimizer's current LR, zero the gradients."""
    grad_norm = None
    if s.cfg.grad_clip:
        s.scaler.unscale_(s.optimizer)
        params = [p for g in s.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.cfg.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    return grad_norm
