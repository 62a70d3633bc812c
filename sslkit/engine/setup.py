"""Set-up of a run: everything the step loop needs, built once, as one plain object.

:func:`build` does, in this order (the order fixes the RNG draws, so it is part of the
exactness contract): determinism flags and the seed, the memory one sample needs and the
task/backbone pairing check (before building or decoding anything), DDP-aware data
loading, the input spec, the batch loader and the LR schedule (which draw no random numbers;
the task's options planned for the schedule's horizon), backbone and task (SyncBN,
augmentation, channels-last), optimizer, AMP scaler, DDP wrapper, ``torch.compile``,
and the ``run.json`` record. Nothing here writes the run directory. The model's parts
are built in :mod:`.model_setup`, the data's (loading, the batch loader, the LR schedule)
in :mod:`.data_setup`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sslkit import distributed
from sslkit.backbone import is_token_backbone
from sslkit.data.pipeline import LoadedData, resume_input_spec
from sslkit.data.digest import FINGERPRINT_SCHEME, fingerprint
from sslkit.data.prepare import channel_stats, value_range
from sslkit.host_malloc import release_freed
from sslkit.data.source import described
from sslkit.engine.capture import make_capture
from sslkit.engine.compiled import compile_model, compile_views
from sslkit.engine.data_setup import batches_and_schedule, check_same_data, load_run_data
from sslkit.engine.log import note
from sslkit.engine.model_setup import (check_batch, check_channels_last, check_pairing, check_sample_memory,
                                       continued_scales, create_model, views_on_device, with_backbone, with_init_flags,
                                       with_planned_task_options, with_resolved_task_options,
                                       with_task_embedding)
from sslkit.engine.schedules import Schedule
from sslkit.errors import UsageError
from sslkit.init.resume import resumed_init
from sslkit.optim import build_optimizer, uses_group_lr
from sslkit.run import CHECKPOINTS, RunConfig, check_run_dir
from sslkit.run_environment import environment
from sslkit.spec import InputSpec
from sslkit.views_resume import check_resumed_views


@dataclass
class Setup:
    """A built run. ``task`` is the bare module (its ``state_dict`` is checkpointed),
    ``model`` what a step calls (``task``, DDP-wrapped and/or compiled); ``augment`` maps a
    batch ``x: (b, C, S', S')`` in [0, 1] to the task's views; ``loader.epoch(e, start)``
    yields this rank's micro-batches (on CUDA the cache's uint16, scaled on the device by
    :func:`sslkit.data.loader.to_unit`). ``info`` is the ``run.json`` record."""

    cfg: RunConfig
    device: torch.device
    rank: int
    world: int
    data: LoadedData
    spec: InputSpec
    task: torch.nn.Module
    augment: Callable[[torch.Tensor], Any]
    channels_last: bool
    loader: Any
    micro_batch: int
    steps_per_epoch: int
    step_images: int  # images per optimizer step over all processes (the effective batch)
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    ddp: torch.nn.parallel.DistributedDataParallel | None
    model: Callable[..., dict[str, Any]]
    info: dict[str, Any]
    capture: Any = None  # --capture: a sslkit.engine.capture.StepCapture, None when off

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINTS

    @property
    def total(self) -> int:
        """Optimizer steps of the whole run (the schedule's horizon)."""
        return self.schedule.total


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; under torchrun ``cuda`` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UsageError(f"unknown --device {name!r}; choose from: auto, cpu, cuda, cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
        if name == "cuda" and distributed.launched():
            name = f"cuda:{distributed.local_rank()}"
        count = torch.cuda.device_count()
        if name != "cuda" and int(name.split(":")[1]) >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; a UsageError there is raised on every rank, and any other failure
    there stops the other ranks too (rank 0 raises its own), instead of leaving them waiting."""
    result, error = None, None
    if distributed.is_main():
        try:
            result = fn()
        except UsageError as exc:
            error = str(exc)
        except BaseException as exc:
            distributed.broadcast_object(f"process 0 failed ({type(exc).__name__}); see its error")
            raise
    error = distributed.broadcast_object(error)
    if error is not None:
        raise UsageError(error)
    return result


def from_rank0(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on rank 0 alone, its result given to every rank: work that reads every file (the
    dataset fingerprint) may outlast the group's collective timeout, so the others wait for it
    through :func:`~sslkit.distributed.rank0_first` (the store, not a collective), and stop with
    rank 0 where it fails (a user error: its line; a crash: said). Not interruptible: a pre-emption
    here (while run.json is built) is acted on at the first step, which records it. ``what``: the
    work, for those messages."""
    return distributed.broadcast_object(distributed.rank0_first(lambda: fn() if distributed.is_main() else None, what,
                                                                interruptible=False))


def build(cfg: RunConfig, device: torch.device) -> Setup:
    """Everything a run needs, checked and built (see the module docstring for the order)."""
    rank, world = distributed.rank(), distributed.world_size()
    cfg, backbone_name = _checked_config(cfg, device, world)
    resumed = distributed.broadcast_object(on_main(lambda: resumed_init(cfg)))  # --init on --resume
    data = load_run_data(cfg, rank, world)
    check_same_data(data)  # under DDP: one file skipped on one process alone is one line, not a hung collective
    release_freed()  # the decoding pass's freed buffers, which the tuned allocator keeps (sslkit.host_malloc)
    spec = _input_spec(cfg, data)
    loader, steps_per_epoch, step_images, schedule = batches_and_schedule(cfg, data, rank, world)
    cfg = with_planned_task_options(cfg, schedule.total)  # draws no random numbers: the model's init is unchanged
    cfg, backbone, task, augment, channels_last = _model_on_device(cfg, backbone_name, spec, resumed, device, rank,
                                                                   world)
    check_batch(cfg, task, loader.batch_size, len(data.prepared))  # fewer images than the batch: a smaller one
    if rank == 0 and (line := task.data_note(len(data.prepared))):  # every task is a Task (plugins check it)
        print(f"sslkit: note: task {cfg.task!r}: {line}", file=sys.stderr)
    scales = continued_scales(cfg, task, backbone, schedule.total, resumed)
    optimizer = build_optimizer(task, cfg.optimizer, schedule.peak_lr, cfg.weight_decay, cfg.momentum, cfg.betas,
                                **scales)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    model = ddp if ddp is not None else task
    s = Setup(cfg, device, rank, world, data, spec, task, augment, channels_last, loader, loader.batch_size,
              steps_per_epoch, step_images, schedule, optimizer, scaler,
              {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision), ddp,
              compile_model(model) if cfg.compile else model, {})
    _record_and_capture(s, backbone_name, backbone)
    return s


def _checked_config(cfg: RunConfig, device: torch.device, world: int) -> tuple[RunConfig, str]:
    """The run's settings, completed (backbone, ``--init`` flags, task embedding) and checked before
    anything is built or decoded: the run directory, the batch split, one sample's memory, the
    task/backbone pairing; determinism flags and the seed set. Also the backbone's name."""
    cfg = with_backbone(with_init_flags(cfg))
    backbone_name = cfg.backbone
    on_main(lambda: check_run_dir(cfg))
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} is the batch over all {world} processes and "
                         f"must be divisible by their number")
    _determinism(cfg, device)
    seed_everything(cfg.seed)
    check_sample_memory(cfg)  # an oversized sample, before check_pairing builds a model sized from it
    probe = check_pairing(backbone_name, cfg)  # fail fast, before decoding anything
    check_channels_last(cfg, probe)
    return with_task_embedding(cfg, probe), backbone_name


def _model_on_device(cfg: RunConfig, backbone_name: str, spec: InputSpec, resumed: Any, device: torch.device,
                     rank: int, world: int) -> tuple[RunConfig, torch.nn.Module, torch.nn.Module, Any, bool]:
    """``(cfg, backbone, task, augment, channels_last)``: the backbone and task built (``cfg`` with the
    task's resolved options), SyncBN, the views on the device (checked against the run's on
    ``--resume``, compiled with ``--compile`` on CUDA), the task moved to the device and its layout."""
    backbone, task = create_model(cfg, backbone_name, spec, resumed)
    cfg = with_resolved_task_options(cfg, task)
    if cfg.sync_bn and world > 1:
        task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)
    elif cfg.sync_bn and rank == 0:  # kept as given: an elastic restart with more processes syncs
        note("note: --sync-bn shares BatchNorm statistics between the processes of a torchrun run; this one has "
             "one process: no effect")
    augment = views_on_device(cfg, task, spec, device)
    if cfg.resume:  # the views the run recorded, before a step trains on others (sslkit.views_resume)
        on_main(lambda: check_resumed_views(cfg, augment))
    if cfg.compile and device.type == "cuda":  # the views fused too (on CPU inductor's compile costs more)
        augment = compile_views(augment)
    task.to(device)
    channels_last = _channels_last(cfg, backbone)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    return cfg, backbone, task, augment, channels_last


def _record_and_capture(s: Setup, backbone_name: str, backbone: torch.nn.Module) -> None:
    """``s.info`` (the ``run.json`` record, with ``--init``'s), the loader's device-side scaling and
    ``--capture``'s step capture (which falls back when ``--init`` sets LRs apart)."""
    s.info = run_record(s, backbone_name, int(backbone.num_features))
    s.loader.raw = s.device.type == "cuda"  # copy the cached uint16, scale on the device (half the bytes)
    s.capture = make_capture(s)
    if s.cfg.init:
        if backbone.init_record:  # ({}: resumed from a checkpoint of a run.json without it)
            s.info["init"] = backbone.init_record
        if s.capture is not None and s.capture.active and uses_group_lr(s.optimizer):
            s.capture.fall_back("--init sets the encoder's LR apart from the heads' (--init-lr-scale, "
                                "--init-freeze-steps)", tell=s.cfg.capture == "graphs")


def _input_spec(cfg: RunConfig, data: LoadedData) -> InputSpec:
    """The run's InputSpec from the decoded data; on ``--resume`` the run's own (changed data is
    refused unless ``--allow-data-change``)."""
    mean, std = channel_stats(data.prepared.pixels)
    spec = InputSpec(data.channels, cfg.image_size, mean, std, data.source.scheme, described(data.source),
                     graph_preprocessing=data.source.graph_preprocessing().to_json(),
                     value_range=value_range(data.prepared.pixels))
    if not cfg.resume:
        return spec

    def check() -> dict[str, Any] | None:  # on rank 0 alone: one process reads the files
        # every file's digests of every fingerprint scheme, read once, with a progress line on a large
        # data set: the check (the run's own scheme) and run.json's record then read no file again
        fingerprint(data.prepared.refs, progress=cfg.progress)
        return resume_input_spec(cfg.out, data.prepared, spec.preprocessing, cfg.allow_data_change, (mean, std))

    return InputSpec.from_dict(from_rank0(check, "checking the data against the run's") or spec.to_dict())


def _channels_last(cfg: RunConfig, backbone: torch.nn.Module) -> bool:
    """``--channels-last``, by default on for 2D CNNs on every device: cuDNN and oneDNN both prefer it
    (on this project's CPU a resnet18 step is 7-31 % faster, a resnet50 24 %; BENCHMARKS.md). It is a
    4D (2D image) layout: a 3D backbone's run never uses it (:func:`check_channels_last` refuses it)."""
    if cfg.channels_last is not None:
        return cfg.channels_last
    return getattr(backbone, "spatial_dims", 2) == 2 and not is_token_backbone(backbone)


def _determinism(cfg: RunConfig, device: torch.device) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def run_record(s: Setup, backbone_name: str, embedding_dim: int) -> dict[str, Any]:
    """What ``run.json`` says about the run (no patient identifiers: counts and hashes). ``run_id``
    is new here; a resume keeps its run's (:func:`sslkit.engine.session.continued_record`)."""
    import uuid

    from sslkit.run_record import config_sha256, recorded_config
    from sslkit.views import views_record

    cfg, prepared = s.cfg, s.data.prepared
    options = getattr(s.data.source, "options", None)
    config = recorded_config(cfg.to_dict())
    fingerprints = _fingerprints(s)
    return {
        "run_id": uuid.uuid4().hex,
        "task": cfg.task,
        "backbone": backbone_name,
        "backbone_options": dict(cfg.backbone_options),
        "config": config,
        "config_sha256": config_sha256(config),
        "input_spec": s.spec.to_dict(),
        "views": views_record(s.augment),
        "embedding_dim": embedding_dim,
        "dataset": {"fingerprint": fingerprints.pop("fingerprint"),
                    "fingerprint_scheme": FINGERPRINT_SCHEME,
                    "samples": len(prepared), "skipped": len(prepared.skipped), **s.data.split, **fingerprints},
        "source_options_resolved": dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {},
        "steps_per_epoch": s.steps_per_epoch,
        "total_steps": s.total,
        "horizon": {"epochs": cfg.epochs, "max_steps": cfg.max_steps, "total_steps": s.total,
                    "bound": s.schedule.bound, "schedule": cfg.schedule},
        "optimization": {"lr": s.schedule.peak_lr, "effective_batch": s.step_images,
                         "warmup_steps": s.schedule.warmup, "processes": s.world, "batch_per_process": s.micro_batch,
                         "channels_last": s.channels_last},
        "environment": {**environment(), "world_size": s.world, "device": str(s.device)},
        "status": "running",
    }


def _fingerprints(s: Setup) -> dict[str, str]:
    """run.json's dataset ``fingerprint`` and, with ``--val-fraction``, the held-out part's
    ``val_fingerprint`` (its samples: ``data.val_refs``): one pass over every file (a progress line on a
    large data set; a resume's check read them already), on rank 0 alone, shared with the other ranks in
    one turn (:func:`from_rank0`)."""
    refs, progress = s.data.prepared.refs, s.cfg.progress and not s.cfg.resume
    held = s.data.val_refs

    def read() -> dict[str, str]:
        out = {"fingerprint": fingerprint(refs, s.spec.preprocessing, progress=progress)}
        if held:
            out["val_fingerprint"] = fingerprint(held)
        return out

    return from_rank0(read, "reading the dataset fingerprint")
