"""Set-up of a run: everything the step loop needs, built once, as one plain object.

:func:`build` does, in this order (the order fixes the RNG draws, so it is part of the
exactness contract): determinism flags and the seed, the task/backbone pairing check
(before decoding anything), DDP-aware data loading, the input spec, backbone and task
(SyncBN, augmentation, channels-last), the batch loader, the LR schedule, optimizer,
AMP scaler, DDP wrapper, ``torch.compile``, and the ``run.json`` record. Nothing here
writes the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from sslkit import distributed
from sslkit.backbone import is_token_backbone
from sslkit.config_backbone import run_backbone
from sslkit.data.loader import BatchLoader
from sslkit.data.pipeline import LoadedData, load_data, resume_input_spec
from sslkit.data.prepare import channel_stats, fingerprint
from sslkit.engine.log import note
from sslkit.engine.capture import make_capture
from sslkit.engine.compiled import compile_model, compile_views
from sslkit.engine.schedules import Schedule, horizon, make_schedule
from sslkit.errors import UsageError, first_line
from sslkit.optim import build_optimizer, scaled_lr, uses_group_lr
from sslkit.registry import create_task, get_task
from sslkit.run import CHECKPOINTS, RunConfig, check_run_dir, environment
from sslkit.sample_modes import build_backbone
from sslkit.spec import InputSpec

CACHE_LOCK = ".sslkit-cache.lock"


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
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
        if name == "cuda" and distributed.launched():
            name = f"cuda:{distributed.local_rank()}"
    elif name != "cpu":
        raise UsageError(f"unknown --device {name!r}; choose from: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_pairing(backbone_name: str, cfg: RunConfig) -> torch.nn.Module:
    """Build the task once on a stand-in input spec, so that a task/backbone/options
    mismatch (``Task.check``, option values, what the constructor refuses) is reported
    before any image is decoded. With the channel count still unknown (it comes from the
    data), only what fails for both 1 and 3 channels is refused here. Returns the probe
    backbone."""
    first: UsageError | None = None
    volume = planned_volume(cfg)  # --sample volume: the size and mode, from the source's options
    with torch.random.fork_rng(devices=[]):  # the real model's initialisation must not depend on this
        for c in (cfg.channels,) if cfg.channels else (1, 3):
            try:
                probe = build_backbone(backbone_name, c, cfg.image_size, volume.get("volume_size"),
                                       **cfg.backbone_options)
                if cfg.init:  # weights that cannot be fitted to this backbone fail here, before decoding
                    from sslkit.init import load_init

                    load_init(cfg.init, probe, cfg.allow_download)
                spec = InputSpec(c, cfg.image_size, (0.5,) * c, (0.25,) * c, **volume)
                task = create_task(cfg.task, probe, spec, **cfg.task_options)
                if cfg.augment_options:  # a bad --augment-opt too, before decoding
                    with_augment_options(cfg, task.views(spec))
                return probe
            except UsageError as exc:
                first = first or exc
    raise first


def with_backbone(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its backbone named: a config made in code without one gets what ``sslkit
    pretrain`` resolves (the task's default fitted to the image size, or an ``--init`` run's)."""
    if cfg.backbone:
        return cfg
    values = {"backbone_options": cfg.backbone_options, "init": cfg.init, "image_size": cfg.image_size}
    name, options = run_backbone(get_task(cfg.task), values)
    return dataclasses.replace(cfg, backbone=name, backbone_options=options)


def with_task_embedding(cfg: RunConfig, probe: torch.nn.Module) -> RunConfig:
    """``cfg`` with the backbone options that give the task's ``Task.embedding`` on this
    backbone (its ``embedding_options``), unless the user set any of them or the run is a
    resume (its run.json's options stand)."""
    wanted = getattr(get_task(cfg.task), "embedding", None)
    offer = getattr(probe, "embedding_options", None)
    options = offer(wanted) if wanted and offer is not None and not cfg.resume else None
    if not options or options.keys() & cfg.backbone_options.keys():
        return cfg
    return dataclasses.replace(cfg, backbone_options={**cfg.backbone_options, **options})


def planned_volume(cfg: RunConfig) -> dict[str, Any]:
    """InputSpec fields of the sample mode the source will use (``{}`` for 2D samples)."""
    from sslkit.data.volume import sample_mode
    from sslkit.registry import create_source

    try:
        mode = sample_mode(create_source(cfg.data, **cfg.source_options))
    except UsageError:  # missing data, a bad option...: reported as before, when the data is loaded
        return {}
    if mode.mode == "slice":
        return {}
    return {"sample": mode.describe()["sample"], "volume_size": mode.size, "spacing": mode.spacing}


def on_main(fn: Callable[[], Any]) -> Any:
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


def build(cfg: RunConfig, device: torch.device) -> Setup:
    """Everything a run needs, checked and built (see the module docstring for the order)."""
    rank, world = distributed.rank(), distributed.world_size()
    cfg = with_backbone(cfg)
    backbone_name = cfg.backbone
    on_main(lambda: check_run_dir(cfg))
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} is the batch over all {world} processes and "
                         f"must be divisible by their number")
    _determinism(cfg, device)
    seed_everything(cfg.seed)
    cfg = with_task_embedding(cfg, check_pairing(backbone_name, cfg))  # fail fast, before decoding anything
    data = _load(cfg, rank, world)
    mean, std = channel_stats(data.prepared.pixels)
    spec = InputSpec(data.channels, cfg.image_size, mean, std, data.source.scheme, data.source.describe(),
                     graph_preprocessing=data.source.graph_preprocessing().to_json())
    if cfg.resume:  # changed data is refused unless --allow-data-change; the run's InputSpec is kept
        spec = InputSpec.from_dict(resume_input_spec(cfg.out, data.prepared, spec.preprocessing,
                                                     cfg.allow_data_change) or spec.to_dict())
    backbone, task = create_model(cfg, backbone_name, spec)
    if cfg.sync_bn and world > 1:
        task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)
    augment = _augmentation(cfg, task, spec, device)
    if cfg.compile and device.type == "cuda":  # the views fused too (on CPU inductor's compile costs more)
        augment = compile_views(augment)
    task.to(device)
    # CNNs run channels-last on every device: cuDNN and oneDNN both prefer it (on this
    # project's CPU a resnet18 step is 7-31 % faster, a resnet50 24 %; BENCHMARKS.md)
    planar = getattr(backbone, "spatial_dims", 2) == 2  # channels-last is a 4D (2D image) layout
    channels_last = (planar and not is_token_backbone(backbone)) if cfg.channels_last is None else cfg.channels_last
    if channels_last:
        task.to(memory_format=torch.channels_last)

    loader, steps_per_epoch, step_images, schedule = _batches_and_schedule(cfg, data, rank, world)
    scales = _continued(cfg, task, backbone, schedule.total)
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
    s.info = run_record(s, backbone_name, int(backbone.num_features))
    s.loader.raw = device.type == "cuda"  # copy the cached uint16, scale on the device (half the bytes)
    s.capture = make_capture(s)
    if cfg.init:
        s.info["init"] = backbone.init_record
        if s.capture is not None and s.capture.active and uses_group_lr(optimizer):
            s.capture.fall_back("--init sets the encoder's LR apart from the heads' (--init-lr-scale, "
                                "--init-freeze-steps)", tell=cfg.capture == "graphs")
    return s


def _continued(cfg: RunConfig, task: torch.nn.Module, backbone: torch.nn.Module, total: int) -> dict[str, Any]:
    """With ``--init``: the encoder's LR multiplier and warm-up freeze (sslkit.init.continued),
    recorded in the init record; ``{}`` otherwise."""
    if not cfg.init:
        return {}
    from sslkit.init import continued

    settings = continued.plan(cfg, task, total, backbone.init_record.get("task_parts", {}))
    backbone.init_record["continue"] = settings
    return {"lr_scale": continued.lr_scale_fn(settings), "freeze_steps": continued.freeze_fn(settings)}


def create_model(cfg: RunConfig, backbone_name: str, spec: InputSpec) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The backbone (the encoder that gets exported), then the task built around it."""
    backbone = build_backbone(backbone_name, spec.channels, cfg.image_size, spec.volume_size, **cfg.backbone_options)
    if cfg.init:  # before the task copies the backbone into EMA teachers (sslkit.init)
        from sslkit.init import load_init

        backbone.init_record = load_init(cfg.init, backbone, cfg.allow_download)
        if distributed.is_main():
            print(backbone.init_record["summary"], file=sys.stderr)
    task = create_task(cfg.task, backbone, spec, **cfg.task_options)
    if cfg.init:  # the decoder / heads / teachers of an earlier run of this task, where they fit
        from sslkit.init.continued import parts_line, restore_task_parts

        parts = restore_task_parts(cfg.init, task, cfg.task, cfg.allow_download)
        backbone.init_record["task_parts"] = parts
        if distributed.is_main():
            print(parts_line(parts), file=sys.stderr)
    return backbone, task


def _batches_and_schedule(cfg: RunConfig, data: LoadedData, rank: int, world: int):
    """This rank's batch loader, optimizer steps per epoch, images per step (over all
    ranks) and the LR schedule. The LR is scaled from the batch actually used: a batch
    larger than the data is clamped to it, and so is the LR."""
    loader = BatchLoader(data.prepared.pixels, cfg.batch_size // world, cfg.seed, rank, world)
    steps_per_epoch = len(loader) // cfg.accumulate
    if steps_per_epoch < 1:
        raise UsageError(f"{len(data.prepared)} images are fewer than one optimizer step needs "
                         f"(--batch-size {cfg.batch_size} x --accumulate {cfg.accumulate}); lower them")
    step_images = loader.batch_size * world * cfg.accumulate
    if loader.batch_size * world < cfg.batch_size and rank == 0:
        note(f"note: --batch-size {cfg.batch_size} is more than the {len(data.prepared)} images; "
             f"using {loader.batch_size * world} (the LR is scaled from that)")
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, step_images, cfg.lr_scaling)
    total, bound = horizon(cfg.epochs, cfg.max_steps, steps_per_epoch)
    return loader, steps_per_epoch, step_images, make_schedule(cfg.schedule, lr, total, cfg.warmup_epochs,
                                                               steps_per_epoch, bound)


def _determinism(cfg: RunConfig, device: torch.device) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _load(cfg: RunConfig, rank: int, world: int) -> LoadedData:
    """Decode the data; under DDP with a disk cache rank 0 fills the cache, then the others read it."""
    stored_size = cfg.cache_size or cfg.image_size
    if stored_size < cfg.image_size:
        raise UsageError(f"--cache-size {cfg.cache_size} is below --image-size {cfg.image_size}; "
                         f"use at least {cfg.image_size}")

    def load() -> LoadedData:
        with cache_build_lock(cfg.cache_dir):
            return load_data(cfg.data, stored_size, cfg.channels, cfg.source_options, cfg.cache_dir,
                             cfg.progress and rank == 0, val_fraction=cfg.val_fraction, seed=cfg.seed,
                             max_pixels=cfg.max_pixels)

    if cfg.cache_dir != "" and world > 1:
        data = load() if rank == 0 else None
        distributed.barrier()
        return data if rank == 0 else load()
    return load()


@contextlib.contextmanager
def cache_build_lock(cache_dir: str | None) -> Iterator[None]:
    """Hold ``CACHE_ROOT/.sslkit-cache.lock`` (``flock``, exclusive) while data is decoded
    into the disk cache: processes that share the cache folder (the ranks of several
    nodes on one file system, or two runs on the same data) decode a dataset once, the
    others wait and then read the finished entry. Nothing without a disk cache."""
    from sslkit.data.cache import mark_root, resolve_cache_dir

    root = resolve_cache_dir(cache_dir)
    if root is None:
        yield
        return
    mark_root(root)
    fd = os.open(root / CACHE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            note(f"waiting for another process that is filling the cache in {root} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _augmentation(cfg: RunConfig, task: torch.nn.Module, spec: InputSpec, device: torch.device):
    """The task's batched views, with ``--augment-opt`` overrides, on the device."""
    augment = with_augment_options(cfg, task.views(spec))
    if isinstance(augment, torch.nn.Module):
        augment.to(device)
    return augment


def with_augment_options(cfg: RunConfig, augment: Any) -> Any:
    """``augment`` with ``--augment-opt`` overrides of its view recipes' fields; a bad one is one line."""
    if not cfg.augment_options:
        return augment
    if not hasattr(augment, "override"):
        raise UsageError(f"task {cfg.task!r} builds its own augmentation; --augment-opt does not apply")
    try:
        return augment.override(**cfg.augment_options)
    except (TypeError, ValueError) as exc:  # a views object of a plugin that does not raise UsageError
        raise UsageError(f"--augment-opt: {first_line(exc)}") from None


def run_record(s: Setup, backbone_name: str, embedding_dim: int) -> dict[str, Any]:
    """What ``run.json`` says about the run (no patient identifiers: counts and hashes)."""
    cfg, prepared = s.cfg, s.data.prepared
    options = getattr(s.data.source, "options", None)
    return {
        "task": cfg.task,
        "backbone": backbone_name,
        "backbone_options": dict(cfg.backbone_options),
        "config": cfg.to_dict(),
        "input_spec": s.spec.to_dict(),
        "embedding_dim": embedding_dim,
        "dataset": {"fingerprint": fingerprint(prepared.refs, s.spec.preprocessing),
                    "samples": len(prepared), "skipped": len(prepared.skipped), **s.data.split},
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
