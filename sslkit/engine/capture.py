"""The whole training step in one CUDA graph (``--capture graphs``).

A small model on a fast GPU waits on Python: every augmentation op, every layer of the
forward and backward, the optimizer and the bookkeeping is a separate kernel launch. With
``--capture graphs`` the engine records one optimizer step (all ``accumulate``
micro-batches: augmentation, forward, backward, gradient clipping, the optimizer step)
once, as a CUDA graph, and then replays it: one launch per step.

What makes a step replayable:

* **Static inputs.** The batch is copied (non-blocking, from pinned memory) into buffers
  the graph reads; the graph's scalars land in one static vector, copied out after each
  replay (the loop reads a step's scalars one step late).
* **The LR as a device tensor.** A Python float would be frozen into the graph; the
  optimizer's groups share one 0-d tensor that is filled before each replay. AdamW and
  SGD run ``capturable``, and :class:`sslkit.optim.LARS` multiplies by the tensor;
  checkpoints still hold a plain float LR and ``capturable=False`` (state-dict hooks),
  so a run captured on a GPU resumes anywhere.
* **Random numbers.** Augmentation and masking draw from torch's CUDA generator, which
  graphs advance per replay exactly as eager calls do, so a checkpoint's RNG state still
  pins down every later step.
* **Warm-up.** The first :data:`WARMUP_STEPS` steps of every session run eagerly, through
  the same code on the same buffers (on a side stream: lazy optimizer state, cuBLAS
  workspaces, ``torch.compile``). They are real training steps; capturing executes
  nothing, so the step sequence is the same whether or not (or when) a session captured.

``task.on_step_end`` (EMA teachers, queues, centres) runs after each replay, eagerly: its
momentum is a Python function of the step. A task opts in with the class attribute
``capturable = True`` when its ``forward`` and ``views`` draw random numbers only from
torch's generators, never read a value on the host (``.item()``, data-dependent shapes or
branches) and keep no state on the Python side between ``forward`` and ``on_step_end``.

Where a step cannot be captured (not CUDA, several processes, fp16's gradient scaler,
a task that does not opt in, or capture raising) the run continues eagerly; with
``--capture graphs`` that is said once, in one line. ``--capture auto`` captures where it
can and says only when a capture it tried failed.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

import torch

from sslkit.errors import first_line

CAPTURE_MODES = ("off", "auto", "graphs")

#: eager steps of every session before the step is captured
WARMUP_STEPS = 3

#: the optimizers whose step has no host-side state once warmed up (``sslkit.optim`` names)
CAPTURABLE_OPTIMIZERS = ("adamw", "sgd", "lars")

Replay = Callable[[], torch.Tensor]
#: ``(body, stream) -> replay``: records ``body`` (executing nothing) and returns a function
#: that runs the recording and returns the body's output tensor (the same tensor every time)
Recorder = Callable[[Callable[[], torch.Tensor], Any], Replay]


def blocker(s: Any, need_cuda: bool = True) -> str | None:
    """Why the step of the built run ``s`` (a :class:`~sslkit.engine.setup.Setup`) cannot
    be captured, as a phrase, or None. ``need_cuda=False`` skips the device check (a
    stand-in recorder on the CPU, in tests)."""
    cfg = s.cfg
    if need_cuda and s.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, this run is on {s.device.type}"
    if s.world > 1:
        return "the step of a multi-process (DDP) run is not captured"
    if cfg.precision == "fp16":
        return "fp16's gradient scaler reads the device every step (use --precision bf16)"
    if cfg.optimizer not in CAPTURABLE_OPTIMIZERS:
        return f"--optimizer {cfg.optimizer} is not capturable (use {', '.join(CAPTURABLE_OPTIMIZERS)})"
    declared = getattr(type(s.task), "capturable", False)
    if declared is not True:
        why = declared if isinstance(declared, str) else "does not declare itself capturable (Task.capturable)"
        return f"task {cfg.task!r} {why}"
    return None


def cuda_graph(body: Callable[[], torch.Tensor], stream: Any) -> Replay:
    """Record ``body`` as a CUDA graph on ``stream``; the replay returns its static output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = body()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    replay.graph = graph  # kept alive with the replay
    return replay


class TensorLR:
    """The optimizer's LR as one shared 0-d device tensor, filled before each step.

    ``apply()`` puts it into every param group (and ``capturable=True`` on CUDA); the
    optimizer's state dict still reads a float LR and the original ``capturable``, and
    loading a state dict puts the tensor back. ``release()`` undoes ``apply()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        # float32 is what the fused CUDA kernels read; elsewhere float64 equals a Python float
        dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=dtype, device=device)
        self.capturable = device.type == "cuda"
        self.original: list[dict[str, Any]] = []
        self.handles: list[Any] = []

    def apply(self) -> None:
        self.original = [{k: g[k] for k in ("lr", "capturable") if k in g} for g in self.optimizer.param_groups]
        self._install()
        self.handles = [self.optimizer.register_state_dict_post_hook(self._saved),
                        self.optimizer.register_load_state_dict_post_hook(lambda opt: self._install())]

    def _install(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
            if self.capturable and "capturable" in g:
                g["capturable"] = True

    def _saved(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        groups = []
        for g, orig in zip(state["param_groups"], self.original):
            g = dict(g)
            if torch.is_tensor(g.get("lr")):
                g["lr"] = float(g["lr"])
            if "capturable" in orig:
                g["capturable"] = orig["capturable"]
            groups.append(g)
        return {**state, "param_groups": groups}

    def set(self, value: float) -> None:
        """The LR of the next step (a fill on the device; no host sync)."""
        self.lr.fill_(value)

    def release(self) -> None:
        """Plain float LRs and the original ``capturable`` again; hooks removed."""
        value = float(self.lr)
        for g, orig in zip(self.optimizer.param_groups, self.original):
            g["lr"] = value
            if "capturable" in orig:
                g["capturable"] = orig["capturable"]
        for h in self.handles:
            h.remove()
        self.handles = []


class StepCapture:
    """Runs a run's optimizer steps from static buffers, captured after a warm-up.

    ``run(s, step, batches)`` takes the step's ``accumulate`` batches and returns the
    step's scalars (as :func:`sslkit.engine.loop.accumulate` plus ``grad_norm``), with
    the optimizer already stepped; ``active`` is False once the run went back to the
    eager step. ``recorder`` records the step (:func:`cuda_graph`; tests pass a stand-in
    that runs on the CPU, and then the device is not checked).
    """

    def __init__(self, s: Any, mode: str, recorder: Recorder | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture mode {mode!r} is not one of {CAPTURE_MODES}")
        self.mode = mode
        self.say_fn = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.main = s.main
        self.said = False
        self.reason: str | None = None
        self.recorder = recorder or cuda_graph
        self.inputs: list[torch.Tensor] = []
        self.names: list[str] = []
        self.numbers: list[str] = []
        self.replay: Replay | None = None
        self.warm = 0
        self.lr: TensorLR | None = None
        self.stream = torch.cuda.Stream(s.device) if s.device.type == "cuda" else None
        why = blocker(s, need_cuda=recorder is None)
        if why is not None:
            self.fall_back(why, tell=mode == "graphs")
        else:
            self.lr = TensorLR(s.optimizer, s.device)
            self.lr.apply()

    @property
    def active(self) -> bool:
        return self.reason is None

    @property
    def captured(self) -> bool:
        return self.replay is not None

    def fall_back(self, reason: str, tell: bool = True) -> None:
        """Go back to the eager step for the rest of the run; say why once (main rank)."""
        self.reason = reason
        self.replay, self.inputs = None, []
        if self.lr is not None:
            self.lr.release()
            self.lr = None
        if tell and not self.said and self.main:
            self.said = True
            self.say_fn(f"note: --capture {self.mode}: {reason}; the step runs eagerly")

    def run(self, s: Any, step: int, batches: Iterator[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step (0-based ``step``) from the next ``accumulate`` batches."""
        xs = [next(batches) for _ in range(s.cfg.accumulate)]
        if self.inputs and [x.shape for x in xs] != [b.shape for b in self.inputs]:
            self.fall_back(f"the batch shape changed to {tuple(xs[0].shape)}")
        if not self.active:
            return self._eager(s, step, xs)
        if not self.inputs:
            self.inputs = [torch.empty(x.shape, dtype=x.dtype, device=s.device) for x in xs]
        for buf, x in zip(self.inputs, xs):
            buf.copy_(x, non_blocking=True)
        self.lr.set(s.schedule.lr_at(step))
        if self.replay is None and self.warm >= WARMUP_STEPS:
            self._capture(s)
            if not self.active:  # capture failed: this step runs eagerly, from the same batches
                return self._eager(s, step, xs)
        if self.replay is not None:
            vec = self.replay()
        else:
            self.warm += 1
            with self._on_side_stream():
                vec = self._body(s)
        return dict(zip(self.names, vec.clone().unbind()))

    def _body(self, s: Any) -> torch.Tensor:
        """The recorded step: micro-batches from the static inputs, then the update; the
        step's scalars stacked into one vector (names in ``self.names``)."""
        from sslkit.engine.loop import accumulate, apply_gradients

        sums = accumulate(s, iter(self.inputs))
        grad_norm = apply_gradients(s)
        if grad_norm is not None:
            sums["grad_norm"] = grad_norm
        self.names = sorted(sums)
        self.numbers = [n for n in self.names if not torch.is_tensor(sums[n])]  # Python numbers of the task
        return torch.stack([torch.as_tensor(sums[n], device=s.device).float().reshape(()) for n in self.names])

    def _capture(self, s: Any) -> None:
        if self.numbers:
            self.fall_back(f"the task returns Python numbers ({', '.join(self.numbers)}), which a graph would freeze")
            return
        rng = _rng_state(s.device)
        try:
            s.optimizer.zero_grad(set_to_none=True)  # the graph allocates its own gradients
            self.replay = self.recorder(lambda: self._body(s), self.stream)
        except Exception as exc:  # anything a capture refuses: the step stays eager
            s.optimizer.zero_grad(set_to_none=True)
            self.fall_back(f"capturing the step failed ({type(exc).__name__}: {first_line(exc)[:160]})")
        finally:
            _set_rng_state(s.device, rng)  # recording draws nothing; make sure of it

    def _on_side_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        return _SideStream(self.stream)

    def _eager(self, s: Any, step: int, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        from sslkit.engine.loop import accumulate, optimizer_step

        scalars = accumulate(s, iter(xs))
        grad_norm = optimizer_step(s, step)
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        return scalars


class _SideStream:
    """Run a block on ``stream``, ordered after and before the current stream's work."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __enter__(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self.ctx = torch.cuda.stream(self.stream)
        self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def make_capture(s: Any) -> StepCapture | None:
    """The run's :class:`StepCapture` for ``s.cfg.capture`` (None when ``off``)."""
    mode = getattr(s.cfg, "capture", "off")
    return None if mode == "off" else StepCapture(s, mode)
