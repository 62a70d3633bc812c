"""The training engine, in parts, each a module with one job:

* :mod:`.setup` — :func:`build`: seeding, determinism, the pairing check, DDP-aware data
  loading, input spec, backbone and task, augmentation, loader, schedule, optimizer,
  scaler, DDP, compile; returns a plain :class:`Setup`. Its parts: :mod:`.model_setup`
  (backbone, pairing check, task, augmentation) and :mod:`.data_setup` (the run's data, the
  cache lock, batches and schedule).
* :mod:`.loop` — :func:`train`: the step loop (accumulation, AMP, DDP, NaN check,
  checkpoints at their steps) and :func:`train_step`, one optimizer step.
* :mod:`.state` — :class:`RunState` and what a checkpoint holds (model, optimizer,
  scaler, schedule, every RNG of every rank, the data position); save and restore.
* :mod:`.capture` — ``--capture graphs``: the whole step replayed as one CUDA graph
  (static input buffers, a device-tensor LR), or a one-line fall-back to the eager step.
* :mod:`.transfer` — batches copied to the GPU one step ahead on their own stream;
  :mod:`.compiled` — ``--compile``: the model (and on CUDA the augmentation) through
  ``torch.compile``, eager where the compiler fails.
* :mod:`.schedules` — warm-up + ``cosine``, ``constant`` or ``step`` (``--schedule``).
* :mod:`.signals` — SIGINT / SIGTERM: finish the step, checkpoint, stop.
* :mod:`.events`, :mod:`.callbacks` — run events for plugin callbacks (metrics.csv and
  TensorBoard are built-in callbacks in ``sslkit_plugins.callbacks``).
* :mod:`.log` — the progress bar on a terminal, plain lines in a log file.
* :mod:`.session` — :func:`pretrain`: one run from start to finish.

The engine knows no task by name: tasks plug in through ``views``, ``forward`` and
``on_step_end`` (see :mod:`sslkit.task`). Everything a step depends on is in a
checkpoint, so a resumed run repeats the uninterrupted one step for step.

Driving the loop yourself (what ``benchmarks/step_overhead.py`` does; in a script, under
``if __name__ == "__main__":``, since the first decoding pass spawns worker processes that import the
script again: an unguarded one's workers stop in one line, :func:`sslkit.data.parallel.stop_a_rerun_script`)::

    s = build(cfg, torch.device("cpu"))      # nothing written yet
    state = RunState()
    train(s, state, Events([]), StopSignal(), save=None, until=state.step + 10)
"""

from sslkit.engine.events import Callback, Events, RunInfo
from sslkit.engine.loop import train, train_step
from sslkit.engine.step_log import Diverged
from sslkit.engine.schedules import SCHEDULES, Schedule
from sslkit.engine.session import pretrain
from sslkit.engine.setup import Setup, build, check_pairing, resolve_device, seed_everything
from sslkit.engine.signals import StopSignal
from sslkit.engine.state import RunState

_check_pairing = check_pairing  # the name tests and older code use

__all__ = ["pretrain", "build", "Setup", "train", "train_step", "RunState", "Schedule", "SCHEDULES", "Events",
           "Callback", "RunInfo", "StopSignal", "Diverged", "resolve_device", "seed_everything", "check_pairing"]
