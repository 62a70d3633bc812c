"""The training loop: data -> views -> task loss -> optimizer, with checkpoints and logs.

The engine knows no task by name: tasks plug in through ``views``, ``forward`` and
``on_step_end`` (see :mod:`sslkit.task`). One optimizer step is::

    for each of `accumulate` micro-batches x: (b, C, S, S), b = batch_size / world:
        views = augment(x)                      # task.views(spec), batched, on device
        with autocast(precision): out = model(views)
        scaler.scale(out["loss"] / accumulate).backward()   # DDP syncs on the last one
    loss (mean over ranks) finite? else stop, the last checkpoint untouched
    clip the global gradient norm; set LR = lr * warmup_cosine(step); optimizer step
    task.on_step_end(step, total)               # EMA teachers, queues, centres

Everything a step depends on is in a checkpoint (model and task tensors, optimizer,
schedule position, AMP scaler, every RNG state of every rank, data position), so a
resumed run repeats the uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sslkit import checkpoint, distributed
from sslkit.backbone import is_token_backbone
from sslkit.data.loader import BatchLoader
from sslkit.data.pipeline import load_data
from sslkit.data.prepare import channel_stats, fingerprint
from sslkit.errors import UsageError
from sslkit.optim import build_optimizer, set_lr, warmup_cosine
from sslkit.registry import create_backbone, create_task, get_task, resolve_data
from sslkit.run import ENCODER_FILE, RUN_JSON, RunConfig, check_run_dir, environment, prepare_run_dir, write_json_atomic
from sslkit.spec import InputSpec

METRICS_FILE = "metrics.csv"
CHECKPOINTS = "checkpoints"


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; under torchrun ``cuda`` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
        if name == "cuda" and distributed.launched():
            name = f"cuda:{distributed.local_rank()}"
    elif name != "cpu":
        raise UsageError(f"unknown --device {name!r}; choose from: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_pairing(backbone_name: str, cfg: RunConfig) -> None:
    """Build the task once on a stand-in input spec, so that a task/backbone/options
    mismatch (``Task.check``, option values, what the constructor refuses) is reported
    before any image is decoded. With the channel count still unknown (it comes from the
    data), only what fails for both 1 and 3 channels is refused here."""
    first: UsageError | None = None
    with torch.random.fork_rng(devices=[]):  # the real model's initialisation must not depend on this
        for c in (cfg.channels,) if cfg.channels else (1, 3):
            try:
                probe = create_backbone(backbone_name, in_chans=c, image_size=cfg.image_size, **cfg.backbone_options)
                create_task(cfg.task, probe, InputSpec(c, cfg.image_size, (0.5,) * c, (0.25,) * c),
                            **cfg.task_options)
                return
            except UsageError as exc:
                first = first or exc
    raise first


def _on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; a UsageError there is raised on every rank."""
    result, error = None, None
    if distributed.is_main():
        try:
            result = fn()
        except UsageError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise UsageError(error)
    return result


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) pretraining as ``cfg`` says; returns the final summary.

    Under torchrun every process calls this; rank 0 alone writes the run directory.
    """
    if cfg.resume:
        old = _read_json(Path(cfg.out) / RUN_JSON)
        if old.get("status") == "finished":  # nothing left to do; the config cannot have grown
            return {**old.get("summary", {}), "already_finished": True,
                    "main": int(os.environ.get("RANK", "0")) == 0}
    get_task(cfg.task)
    resolve_data(cfg.data)  # fail on a bad --data before touching anything
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if cfg.sync_bn and distributed.launched() and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU implementation)")
    created = distributed.init(device.type)
    flags = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        return _Trainer(cfg, device).run()
    finally:
        torch.use_deterministic_algorithms(flags[0])  # leave the process as it was (library use)
        torch.backends.cudnn.benchmark = flags[1]
        if created:
            distributed.teardown()


class _Trainer:
    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / CHECKPOINTS

    # --- set-up --------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        task_cls = get_task(cfg.task)
        self.backbone_name = cfg.backbone or task_cls.default_backbone
        _on_main(lambda: check_run_dir(cfg))
        if cfg.batch_size % self.world:
            raise UsageError(f"--batch-size {cfg.batch_size} is the batch over all {self.world} processes and "
                             f"must be divisible by their number")
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.seed)

        _check_pairing(self.backbone_name, cfg)  # fail fast, before decoding anything
        show = cfg.progress and self.main
        self.stored_size = cfg.cache_size or cfg.image_size
        if self.stored_size < cfg.image_size:
            raise UsageError(f"--cache-size {cfg.cache_size} is below --image-size {cfg.image_size}; "
                             f"use at least {cfg.image_size}")
        def load():
            return load_data(cfg.data, self.stored_size, cfg.channels, cfg.source_options, cfg.cache_dir, show,
                             val_fraction=cfg.val_fraction, seed=cfg.seed)

        if cfg.cache_dir != "" and self.world > 1:  # rank 0 fills the cache, the others then read it
            data = load() if self.main else None
            distributed.barrier()
            if not self.main:
                data = load()
        else:
            data = load()
        self.source, self.prepared, channels = data.source, data.prepared, data.channels
        mean, std = channel_stats(self.prepared.pixels)
        self.spec = spec = InputSpec(channels, cfg.image_size, mean, std, self.source.scheme, self.source.describe())
        backbone = create_backbone(self.backbone_name, in_chans=channels, image_size=cfg.image_size,
                                   **cfg.backbone_options)
        self.task = task = create_task(cfg.task, backbone, spec, **cfg.task_options)
        if cfg.sync_bn and self.world > 1:
            task = self.task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)
        self.augment = task.views(spec)
        if cfg.augment_options:  # --augment-opt: override fields of the task's view recipes
            if not hasattr(self.augment, "override"):
                raise UsageError(f"task {cfg.task!r} builds its own augmentation; --augment-opt does not apply")
            self.augment = self.augment.override(**cfg.augment_options)
        task.to(self.device)
        if isinstance(self.augment, torch.nn.Module):
            self.augment.to(self.device)
        cl = cfg.channels_last
        # CNNs run channels-last on every device: cuDNN and oneDNN both prefer it (on this
        # project's CPU a resnet18 step is 7-31 % faster, a resnet50 24 %; BENCHMARKS.md)
        self.channels_last = (not is_token_backbone(backbone)) if cl is None else cl
        if self.channels_last:
            task.to(memory_format=torch.channels_last)

        micro = cfg.batch_size // self.world
        self.loader = BatchLoader(self.prepared.pixels, micro, cfg.seed, self.rank, self.world)
        self.micro_batch = self.loader.batch_size
        self.steps_per_epoch = len(self.loader) // cfg.accumulate
        if self.steps_per_epoch < 1:
            raise UsageError(
                f"{len(self.prepared)} images are fewer than one optimizer step needs "
                f"(--batch-size {cfg.batch_size} x --accumulate {cfg.accumulate}); lower them"
            )
        self.step_images = self.micro_batch * self.world * cfg.accumulate
        total = cfg.epochs * self.steps_per_epoch
        self.total = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        self.warmup = min(int(cfg.warmup_epochs * self.steps_per_epoch), self.total // 2)
        self.lr = cfg.effective_lr
        self.optimizer = build_optimizer(task, cfg.optimizer, self.lr, cfg.weight_decay, cfg.momentum, cfg.betas)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

        model = task
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(task, device_ids=ids)
        self.ddp = model if self.world > 1 else None
        self.model = torch.compile(model) if cfg.compile else model

        self.info = {
            "task": cfg.task,
            "backbone": self.backbone_name,
            "backbone_options": dict(cfg.backbone_options),
            "config": cfg.to_dict(),
            "input_spec": spec.to_dict(),
            "embedding_dim": int(backbone.num_features),
            "dataset": {"fingerprint": fingerprint(self.prepared.refs, spec.preprocessing),
                        "samples": len(self.prepared), "skipped": len(self.prepared.skipped), **data.split},
            "source_options_resolved": _plain_options(getattr(self.source, "options", None)),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total,
            "optimization": {"lr": self.lr, "effective_batch": self.step_images, "warmup_steps": self.warmup,
                             "processes": self.world, "batch_per_process": self.micro_batch,
                             "channels_last": self.channels_last},
            "environment": {**environment(), "world_size": self.world, "device": str(self.device)},
            "status": "running",
        }

    def _restore(self) -> None:
        """Continue from the newest valid checkpoint (``--resume``); rank 0 chooses it."""
        self.step, self.epoch, self.pos = 0, 0, 0
        if not self.cfg.resume:
            return
        found = _on_main(lambda: _latest(self.ckpt_dir))
        path = distributed.broadcast_object(str(found) if found else None)
        self.resumed_from = None
        if path is None:
            return
        tensors, state = checkpoint.load(Path(path))
        missing, unexpected = self.task.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise UsageError(f"checkpoint {path} does not fit this task/backbone "
                             f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch, self.pos = int(state["data"]["epoch"]), int(state["data"]["step_in_epoch"])
        rngs = state["rng"]
        if len(rngs) == self.world:
            _set_rng(rngs[self.rank], self.device)
        else:
            seed_everything(self.cfg.seed + 7919 * self.rank + self.step)
            if self.main:
                tqdm.write(f"note: checkpoint written by {len(rngs)} processes, resumed with {self.world}: "
                           f"augmentations are re-seeded (data order is unchanged)")
        self.resumed_from = self.step

    # --- the loop ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.build()
        if self.world > 1:  # different augmentations per rank; the model is already identical
            seed_everything(cfg.seed + 7919 * self.rank)

        def prepare() -> None:
            prepare_run_dir(cfg)
            write_json_atomic(self.out / "data_report.json", {
                "samples": len(self.prepared), "skipped": len(self.prepared.skipped),
                "skipped_files": [{"path": p, "reason": r} for p, r in self.prepared.skipped],
            })

        _on_main(prepare)  # everything the user asked for is valid: only now is the run directory written
        self._restore()
        if cfg.resume and self.main:
            old = _read_json(self.out / RUN_JSON)
            self.info["resumes"] = old.get("resumes", []) + [{"from_step": self.step}]
        self._write_info()

        self.metrics = _MetricsWriter(self.out / METRICS_FILE, keep_until=self.step if cfg.resume else None) \
            if self.main else None
        self.tb = _tensorboard(self.out / "tensorboard") if (self.main and cfg.tensorboard) else None
        status, interrupted = "failed", False
        with _StopSignal() as stop:
            try:
                summary = self._loop(stop)
                interrupted = summary["interrupted"]
                status = "interrupted" if interrupted else "finished"
            except _Diverged as exc:
                status = "diverged"
                raise UsageError(str(exc)) from None
            finally:
                if self.metrics:
                    self.metrics.close()
                if self.tb:
                    self.tb.close()
                if self.main and status != "finished":
                    self.info["status"] = status
                    self._write_info()
        if not interrupted and self.main:
            _save_atomic(self.out / ENCODER_FILE,
                         {k: v.detach().contiguous().cpu() for k, v in self.task.encoder.state_dict().items()})
        if self.main:
            self.info.update(status=status, summary={k: v for k, v in summary.items() if k != "main"})
            self._write_info()
        return summary

    def _loop(self, stop: "_StopSignal") -> dict[str, Any]:
        """Train to ``self.total`` steps. Each step's scalars are read one step late.

        Reading a loss waits for the device; reading step N's while step N+1 is already
        queued keeps a GPU busy while Python launches work. A NaN loss is still caught
        before any checkpoint could hold it: every checkpoint first reads all steps up to it.
        """
        cfg = self.cfg
        bar = tqdm(total=self.total, initial=self.step, desc=cfg.task, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.main))
        t_start = time.perf_counter()
        clock = {"last": t_start}
        images, start_step, saved_at = 0, self.step, self.step
        last: dict[str, float] = {}
        pending: list[dict[str, Any]] = []  # launched steps whose scalars are still on the device

        def read(keep: int) -> bool:
            """Read, check and log all but the newest ``keep`` pending steps; True if asked to stop."""
            nonlocal images, last
            asked = False
            while len(pending) > keep:
                p = pending.pop(0)
                names = list(p["scalars"])
                values = dict(zip(names, torch.stack([p["scalars"][n].float().reshape(()) for n in names]).tolist()))
                if not np.isfinite(values["loss"]):
                    raise _Diverged(
                        f"loss became {values['loss']} at step {p['step']}; training stopped and no checkpoint "
                        f"holds that step. Lower --lr (now {self.lr:g}) or set --grad-clip; the last good "
                        f"checkpoint is in {self.ckpt_dir}")
                now = time.perf_counter()
                images += self.step_images
                ips, clock["last"] = self.step_images / max(now - clock["last"], 1e-9), now
                asked = values.pop("stop") > 0 or asked
                grad_norm = values.pop("grad_norm", None)
                last = values
                row = {"step": p["step"], "epoch": p["epoch"], **values, "lr": p["lr"], "img_per_s": ips}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                self._log(row, bar)
            return asked

        interrupted = False
        self.task.train()
        try:
            while self.step < self.total and not interrupted:
                if self.pos >= self.steps_per_epoch:
                    self.epoch, self.pos = self.epoch + 1, 0
                batches = self.loader.epoch(self.epoch, self.pos * cfg.accumulate)
                try:
                    while self.pos < self.steps_per_epoch and self.step < self.total:
                        scalars = self.train_step(batches, stop.requested)
                        pending.append({"step": self.step, "epoch": self.epoch, "lr": self._lr_at(self.step - 1),
                                        "scalars": scalars})
                        interrupted = read(keep=1)
                        end_of_epoch = self.pos >= self.steps_per_epoch
                        every = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                        if every or end_of_epoch or self.step >= self.total or interrupted:
                            interrupted = read(keep=0) or interrupted
                            self._checkpoint()
                            saved_at = self.step
                        if interrupted:
                            break
                finally:
                    batches.close()
            interrupted = read(keep=0) or interrupted
            if saved_at != self.step:
                self._checkpoint()
        finally:
            bar.close()
        elapsed = time.perf_counter() - t_start
        return {
            "steps": self.step, "steps_this_session": self.step - start_step, "seconds": round(elapsed, 2),
            "img_per_s": round(images / elapsed, 2) if elapsed > 0 and images else None,
            "final_loss": last.get("loss"), "interrupted": interrupted, "main": self.main,
        }

    def train_step(self, batches, stop_requested: bool = False) -> dict[str, torch.Tensor]:
        """Launch one optimizer step from the next ``accumulate`` batches of ``batches``.

        Returns the step's scalars as 0-d device tensors, not yet read (means over
        micro-batches and ranks; ``stop`` > 0 when any rank was asked to stop;
        ``grad_norm`` when clipping).
        """
        scalars = self._accumulate(batches)
        scalars["stop"] = float(stop_requested)
        scalars = self._reduce(scalars)
        grad_norm = self._optimizer_step()
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        self.step, self.pos = self.step + 1, self.pos + 1
        self.task.on_step_end(self.step, self.total)
        return scalars

    def _accumulate(self, batches) -> dict[str, torch.Tensor]:
        """Forward and backward ``accumulate`` micro-batches; the mean of each logged scalar."""
        K = self.cfg.accumulate
        sums: dict[str, torch.Tensor] = {}
        for k in range(K):
            x = next(batches).to(self.device, non_blocking=True)
            if x.shape[-1] != self.spec.image_size:  # stored at --cache-size: resize on the device
                x = torch.nn.functional.interpolate(x, size=(self.spec.image_size,) * 2, mode="bilinear",
                                                    antialias=True, align_corners=False)
            views = self.augment(x)
            if self.channels_last:
                views = tuple(v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in views)
            sync = self.ddp.no_sync() if (self.ddp is not None and k < K - 1) else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    result = self.model(views)
                loss = result["loss"]
                self.scaler.scale(loss.float() / K).backward()
            for name, v in result.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[name] = sums.get(name, 0) + v.detach().float().reshape(()) / K
        return sums

    def _reduce(self, scalars: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mean of every scalar over ranks (``stop`` > 0 if any rank's is), in one collective."""
        names = sorted(scalars)
        vec = torch.stack([torch.as_tensor(scalars[n], dtype=torch.float32, device=self.device).reshape(())
                           for n in names])
        if self.world > 1:
            distributed.all_reduce_sum(vec)
            vec = vec / self.world
        return dict(zip(names, vec.unbind()))

    def _lr_at(self, step: int) -> float:
        return self.lr * warmup_cosine(step, self.total, self.warmup)

    def _optimizer_step(self) -> torch.Tensor | None:
        grad_norm = None
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        set_lr(self.optimizer, self._lr_at(self.step))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _log(self, row: dict[str, Any], bar) -> None:
        if not self.main:
            return
        self.metrics.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.0f}",
                        refresh=False)

    def _checkpoint(self) -> None:
        rngs = distributed.gather_objects(_get_rng(self.device))
        if not self.main:
            return
        state = {
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"name": "warmup_cosine", "step": self.step, "total": self.total, "warmup": self.warmup,
                         "lr": self.lr},
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "data": {"epoch": self.epoch, "step_in_epoch": self.pos, "seed": self.cfg.seed,
                     "world_size": self.world},
            "rng": rngs,
        }
        checkpoint.save(self.ckpt_dir, self.step, self.task.state_dict(), state, keep=self.cfg.keep_checkpoints)

    def _write_info(self) -> None:
        if self.main:
            write_json_atomic(self.out / RUN_JSON, self.info)


def _plain_options(options: Any) -> dict[str, Any]:
    """Every field of a source's Options dataclass (defaults included), for run.json."""
    import dataclasses

    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}


class _Diverged(Exception):
    pass


def _latest(folder: Path) -> Path | None:
    found = checkpoint.load_latest(folder)
    if found is None:
        return None
    path, _, _, skipped = found
    for bad, why in skipped:
        tqdm.write(f"note: skipping damaged checkpoint {bad.name}: {why}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- RNG state --------------------------------------------------------------------------
def _get_rng(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as plain data (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return tuple(_tuples(v) for v in obj)
    return obj


# --- signals ----------------------------------------------------------------------------
class _StopSignal:
    """SIGINT / SIGTERM ask the loop to finish its step, checkpoint and return.

    A second SIGINT aborts at once (KeyboardInterrupt). Only the main thread can install
    handlers; elsewhere the signals keep their default behaviour.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if distributed.is_main():
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                       f"(Ctrl-C again to abort now)")

    def __enter__(self) -> "_StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- logs -------------------------------------------------------------------------------
def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


class _MetricsWriter:
    """metrics.csv: one row per optimizer step; columns fixed by the first row.

    Resuming (``keep_until``: the checkpoint's step) first drops the rows logged after
    that step, so the file holds every step exactly once.
    """

    FIRST = ["step", "epoch", "loss", "lr", "img_per_s"]

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        self.file = None
        self.writer = None
        self.fields: list[str] | None = None
        if keep_until is not None and path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                self.fields = rows[0]
                kept = [r for r in rows[1:] if r and int(r[0]) <= keep_until]
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
                with os.fdopen(fd, "w", newline="") as f:
                    csv.writer(f).writerows([self.fields, *kept])
                os.replace(tmp, path)

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            append = self.fields is not None
            if not append:
                self.fields = self.FIRST + sorted(k for k in row if k not in self.FIRST)
            self.file = open(self.path, "a" if append else "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore")
            if not append:
                self.writer.writeheader()
        self.writer.writerow({k: _fmt(k, v) for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _fmt(key: str, v: Any) -> Any:
    if not isinstance(v, float):
        return v
    return f"{v:.1f}" if key == "img_per_s" else f"{v:.9g}"
