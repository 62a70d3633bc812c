"""The model of a run, built in :func:`sslkit.engine.setup.build`: the backbone named
(:func:`with_backbone`), the task/backbone pairing and the memory layout checked before any
image is decoded (:func:`check_pairing`, :func:`check_channels_last`), a new run's ``--init``
as recorded (:func:`with_init_flags`), the backbone and the task around it with ``--init``
weights (:func:`create_model`), the encoder's LR settings of an ``--init`` run
(:func:`continued_scales`) and the task's views with ``--augment-opt`` overrides."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import torch

from sslkit import distributed
from sslkit.config_backbone import run_backbone
from sslkit.errors import UsageError, first_line
from sslkit.registry import create_task, get_task, plugin_of
from sslkit.run import RunConfig
from sslkit.sample_modes import build_backbone
from sslkit.spec import InputSpec
from sslkit.task import unimplemented

if TYPE_CHECKING:
    from sslkit.init.resume import ResumedInit


def with_backbone(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its backbone named: a config made in code without one gets what ``sslkit
    pretrain`` resolves (the task's default fitted to the image size, or an ``--init`` run's)."""
    if cfg.backbone:
        return cfg
    values = {"backbone_options": cfg.backbone_options, "init": cfg.init, "image_size": cfg.image_size}
    name, options = run_backbone(get_task(cfg.task), values)
    return dataclasses.replace(cfg, backbone=name, backbone_options=options)


def check_pairing(backbone_name: str, cfg: RunConfig) -> torch.nn.Module:
    """Build the task once on a stand-in input spec, so that a task/backbone/options
    mismatch (``Task.check``, option values, what the constructor refuses) is reported
    before any image is decoded. With the channel count still unknown (it comes from the
    data), only what fails for both 1 and 3 channels is refused here. ``--init`` weights are
    resolved once and fitted to each probe (not on ``--resume``: a checkpoint holds the
    weights, and a run without one checks them when it loads them). Returns the probe backbone."""
    check_task_methods(cfg.task)
    failed: list[tuple[int, UsageError]] = []
    volume = planned_volume(cfg)  # --sample volume: the size and mode, from the source's options
    init = cfg.init if cfg.init and not cfg.resume else None
    if init:  # a missing file, or a Hub that cannot be reached: one line, whatever the channels
        from sslkit.init import resolve_init

        resolve_init(init, cfg.allow_download)
    with torch.random.fork_rng(devices=[]):  # the real model's initialisation must not depend on this
        for c in (cfg.channels,) if cfg.channels else (1, 3):
            try:
                return _probe(backbone_name, cfg, c, volume, init)
            except UsageError as exc:
                failed.append((c, exc))
    raise _probe_error(failed, bool(init))


def _probe(backbone_name: str, cfg: RunConfig, channels: int, volume: dict[str, Any], init: str | None) -> Any:
    """The probe of :func:`check_pairing` for ``channels``: built on torch's meta device (no weights drawn,
    no memory: a ViT-L's probe took seconds and gigabytes), or normally where ``--init`` weights are fitted
    to it or the task or backbone cannot be built there (that build says the same, or nothing)."""
    if not init:
        try:
            with torch.device("meta"):
                return _probe_on(backbone_name, cfg, channels, volume, None)
        except UsageError:
            raise
        except Exception:  # e.g. a constructor that reads a value of a tensor
            pass
    return _probe_on(backbone_name, cfg, channels, volume, init)


def _probe_on(backbone_name: str, cfg: RunConfig, c: int, volume: dict[str, Any], init: str | None) -> Any:
    probe = task_default_said(cfg, backbone_name, lambda **options: build_backbone(
        backbone_name, c, cfg.image_size, volume.get("volume_size"), **options))
    if init:  # weights that cannot be fitted to this backbone fail here, before decoding
        from sslkit.init import load_init

        load_init(init, probe, cfg.allow_download)
    spec = InputSpec(c, cfg.image_size, (0.5,) * c, (0.25,) * c, **volume)
    task = create_task(cfg.task, probe, spec, **cfg.task_options)
    check_batch(cfg, task, cfg.batch_size // distributed.world_size())
    if cfg.augment_options:  # a bad --augment-opt too, before decoding
        with_augment_options(cfg, task.views(spec))
    if cfg.init and not cfg.resume:  # --layer-decay on a CNN, a freeze past --max-steps: before decoding
        from sslkit.init.continued import check_flags

        check_flags(cfg, task)
    return probe


def _probe_error(failed: list[tuple[int, UsageError]], init: bool) -> UsageError:
    """The first probe's refusal; where the ``--init`` weights fit neither probe and the channel count is not
    known yet (it comes from the data), saying whose shapes the line shows: the run's may have the other count."""
    channels, first = failed[0]
    others = {str(exc) for _, exc in failed[1:]}
    if not (init and len(failed) > 1 and str(first).startswith("--init ") and others - {str(first)}):
        return first
    return UsageError(f"{first} (shapes of a {channels}-channel model: the data's channel count is not known "
                      f"before decoding; --channels N checks the N-channel one)")


def task_default_said(cfg: RunConfig, backbone_name: str, build: Any) -> Any:
    """``build(**cfg.backbone_options)``; a backbone that cannot be built (a one-line error) and is the
    task's default (no ``--backbone``, no ``--init``), which fails without any option too, says so: the
    name came from the task, not from the user (an option the user gave that it refuses is the user's)."""
    try:
        return build(**cfg.backbone_options)
    except UsageError as exc:
        if cfg.init or backbone_name != run_backbone(get_task(cfg.task), {"image_size": cfg.image_size})[0]:
            raise
        try:
            build()
        except UsageError:
            pass
        else:
            raise exc from None
        raise UsageError(f"task {cfg.task!r} (plugin {plugin_of('tasks', cfg.task)!r}) has the default backbone "
                         f"{backbone_name!r}, which cannot be built: {exc}; give --backbone prefix:model") from None


def check_channels_last(cfg: RunConfig, probe: torch.nn.Module) -> None:
    """Refuse, in one line before decoding, ``--channels-last`` for a 3D backbone: it is the layout of
    2D images' 4D tensors, and a volume batch is 5D (the run's views and model stay contiguous)."""
    if cfg.channels_last and getattr(probe, "spatial_dims", 2) != 2:
        raise UsageError(f"--channels-last is a layout of 2D images and {cfg.backbone} is a 3D backbone "
                         f"(--sample volume); drop --channels-last")


def check_task_methods(name: str) -> None:
    """Refuse, in one line naming its plugin, task ``name`` whose class leaves ``views`` or ``forward``
    to :class:`~sslkit.task.Task`, whose own raise a bare ``NotImplementedError`` mid-setup."""
    missing = unimplemented(get_task(name))
    if missing:
        raise UsageError(f"task {name!r} (plugin {plugin_of('tasks', name)!r}) does not implement "
                         f"{' and '.join(missing)}; the plugin's Task subclass must define both")


def check_batch(cfg: RunConfig, task: torch.nn.Module, per_process: int, images: int | None = None) -> None:
    """Refuse, in one line, fewer images per process than the task's loss needs (``Task.min_batch``):
    from ``--batch-size`` before decoding, and with ``images`` once the data (fewer images than the
    batch: a smaller one) is known."""
    need = int(getattr(task, "min_batch", 1))
    if per_process >= need:
        return
    world = distributed.world_size()
    over = f" over {world} processes" if world > 1 else ""
    if images is None:
        given, fix = f"--batch-size {cfg.batch_size}{over} gives {per_process}", f"use --batch-size {need * world}"
    else:
        given, fix = f"the data's {images} image(s){over} give {per_process}", f"use {need * world} images"
    raise UsageError(f"task {cfg.task!r} needs at least {need} images per process (its loss compares the images "
                     f"of a batch: in-batch negatives or batch statistics); {given}; {fix} or more")


def with_init_flags(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a new run's local ``--init`` path made absolute (run.json's ``config.init`` then
    names the weights from any directory, for ``eval``'s ``init`` row); ``--allow-download`` without
    ``--init`` is refused."""
    if cfg.allow_download and not cfg.init:
        raise UsageError("--allow-download lets --init fetch Hub weights; give --init too")
    if not cfg.init or cfg.resume:  # a resume keeps what its run.json recorded
        return cfg
    from sslkit.init.resolve import recorded_init

    init = recorded_init(cfg.init)
    if cfg.overwrite and _inside(init, cfg.out):  # it would be deleted (or replaced) before the run records it
        raise UsageError(f"--init {cfg.init!r} is in the run directory --overwrite replaces ({cfg.out!r}); "
                         f"copy the weights elsewhere, or give another --out")
    return cfg if init == cfg.init else dataclasses.replace(cfg, init=init)


def _inside(path: str, folder: str) -> bool:
    """Whether the local file or folder ``path`` is ``folder`` or lies in it (False for a Hub id or tag)."""
    from pathlib import Path

    p, root = Path(path).expanduser(), Path(folder).expanduser()
    if not p.exists():
        return False
    p, root = p.resolve(), root.resolve()
    return p == root or root in p.parents


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

    if not cfg.data:  # --print-config without --data: no source to plan for
        return {}
    mode = sample_mode(create_source(cfg.data, **cfg.source_options))  # a bad --volume-size, --sample...: now
    if mode.mode == "slice":
        return {}
    return {"sample": mode.describe()["sample"], "volume_size": mode.size, "spacing": mode.spacing}


def check_sample_memory(cfg: RunConfig) -> None:
    """Refuse, before any model is built, a sample that one resize cannot hold in memory: the
    planned ``--volume-size``, else the stored 2D side (``--cache-size`` or ``--image-size``), with
    the data's channels still unknown taken as 1. A backbone sized from the sample (a ViT's position
    embeddings) would otherwise take that memory first (the run's model, or a probe of :func:`check_pairing`
    that the meta device cannot hold)."""
    from sslkit.data.room import check_sample_room

    check_cache_size(cfg)
    size = planned_volume(cfg).get("volume_size") or cfg.cache_size or cfg.image_size
    check_sample_room(cfg.channels or 1, size)


def check_cache_size(cfg: RunConfig) -> None:
    """Refuse a ``--cache-size`` below ``--image-size``: the stored images would be upscaled for every view
    (the run's check, before decoding; ``sslkit pretrain --print-config`` refuses it in the same line)."""
    if (cfg.cache_size or cfg.image_size) < cfg.image_size:
        raise UsageError(f"--cache-size {cfg.cache_size} is below --image-size {cfg.image_size}; "
                         f"use at least {cfg.image_size}")


def check_precision(precision: str, device_type: str) -> None:
    """Refuse ``--precision fp16`` on a device without CUDA (torch's fp16 autocast there is unscaled and slow)."""
    if precision == "fp16" and device_type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")


def create_model(cfg: RunConfig, backbone_name: str, spec: InputSpec,
                 resumed: ResumedInit | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The backbone (the encoder that gets exported), then the task built around it. ``resumed`` (a
    ``--resume`` of an ``--init`` run) with a checkpoint: the init is not read, run.json's record is kept."""
    backbone = build_backbone(backbone_name, spec.channels, cfg.image_size, spec.volume_size, **cfg.backbone_options)
    lines = []
    if cfg.init:  # before the task copies the backbone into EMA teachers (sslkit.init)
        from sslkit.init.resume import backbone_init

        backbone.init_record, line = backbone_init(cfg, backbone, resumed)
        lines.append(line)
    task = create_task(cfg.task, backbone, spec, **cfg.task_options)
    if cfg.init and not (resumed is not None and resumed.checkpointed):
        # the decoder / heads / teachers of an earlier run of this task, where they fit
        from sslkit.init.continued import parts_line, restore_task_parts, without_restored

        parts = restore_task_parts(cfg.init, task, cfg.task, cfg.allow_download)
        backbone.init_record["task_parts"] = parts
        lines = [without_restored(backbone.init_record), parts_line(parts)]  # 'unused' spares what was restored
    if distributed.is_main():
        for line in lines:
            print(line, file=sys.stderr)
    return backbone, task


def with_planned_task_options(cfg: RunConfig, total_steps: int) -> RunConfig:
    """``cfg`` with the values the task gives options left at ``None`` for a run of ``total_steps``
    optimizer steps (``Task.planned_options``); building the task checks them as it checks ``--task-opt``."""
    planned = get_task(cfg.task).planned_options(total_steps)
    fill = {k: v for k, v in planned.items() if cfg.task_options.get(k) is None}
    return dataclasses.replace(cfg, task_options={**cfg.task_options, **fill}) if fill else cfg


def with_resolved_task_options(cfg: RunConfig, task: torch.nn.Module) -> RunConfig:
    """``cfg`` with the values the task chose for options left at ``None`` (``Task.resolved_options``),
    so ``run.json`` records what the run trained with and ``--resume`` rebuilds the same task."""
    fill = {k: v for k, v in task.resolved_options().items() if cfg.task_options.get(k) is None}
    return dataclasses.replace(cfg, task_options={**cfg.task_options, **fill}) if fill else cfg


def continued_scales(cfg: RunConfig, task: torch.nn.Module, backbone: torch.nn.Module,
                     total: int, resumed: ResumedInit | None = None) -> dict[str, Any]:
    """With ``--init``: the encoder's LR multiplier and warm-up freeze (sslkit.init.continued),
    recorded in the init record (a resume from a checkpoint keeps the recorded ones); ``{}`` otherwise."""
    if not cfg.init:
        return {}
    from sslkit.init import continued
    from sslkit.init.resume import continue_settings

    record = backbone.init_record
    settings = continue_settings(record, resumed)
    if settings is None:
        settings = continued.plan(cfg, task, total, record.get("task_parts", {}))
        record["continue"] = settings
    return {"lr_scale": continued.lr_scale_fn(settings), "freeze_steps": continued.freeze_fn(settings)}


class InRange(torch.nn.Module):
    """A task's views of data rescaled from the run's :attr:`~sslkit.spec.InputSpec.value_range` to
    [0, 1] (clipped), built with the ``mean``/``std`` of the rescaled values: the views' outputs are
    normalised exactly as embedding normalises the data as it is."""

    def __init__(self, views: Any, low: float, high: float) -> None:
        super().__init__()
        self.views, self.low, self.span = views, low, high - low

    def forward(self, x: torch.Tensor) -> Any:
        return self.views(((x - self.low) / self.span).clamp(0, 1))


def views_spec(spec: InputSpec) -> InputSpec:
    """``spec`` as the views of :class:`InRange` see the data: rescaled from ``value_range`` to [0, 1]."""
    low, high = spec.value_range
    span = high - low
    return dataclasses.replace(spec, mean=tuple((m - low) / span for m in spec.mean),
                               std=tuple(s / span for s in spec.std), value_range=(0.0, 1.0))


def views_on_device(cfg: RunConfig, task: torch.nn.Module, spec: InputSpec, device: torch.device):
    """The task's batched views, with ``--augment-opt`` overrides, on the device. Three channels that
    are not colour planes (``InputSpec.colour``: a slab's slices, stacked windows) get no colour ops.
    Data of a narrow ``value_range`` is rescaled to [0, 1] for them (:class:`InRange`)."""
    narrow = tuple(spec.value_range) != (0.0, 1.0)
    augment = task.views(views_spec(spec) if narrow else spec)
    if spec.channels == 3 and not spec.colour and spec.sample != "volume" and hasattr(augment, "override"):
        try:
            augment = augment.override(colour=False)
        except (UsageError, TypeError, ValueError):  # a plugin's views without a colour field: as they are
            pass
    augment = with_augment_options(cfg, augment)
    if narrow:
        augment = InRange(augment, *spec.value_range)
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
