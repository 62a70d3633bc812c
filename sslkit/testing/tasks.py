"""``check_task``: a task trains, exports and resumes through the real command line."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from sslkit.testing.cli import finite_losses, metric_rows, sslkit
from sslkit.testing.data import KitVolumes, image_folder, volume_folder
from sslkit.testing.registry import registered_as, resolve, uses_builtins
from sslkit.testing.runs import checkpoints, crashed_copy

#: the small stand-ins the kit trains with, by the task's default backbone family
TINY_VIT = ("timm:vit_tiny_patch16_224", {"patch_size": 8, "depth": 2})
TINY_CNN = ("timm:resnet10t", {})
TINY_VIT3D = ("monai:vit", {"patch_size": 8, "hidden_size": 48, "num_heads": 2, "num_layers": 1})
TINY_CNN3D = ("monai:resnet10", {"widen_factor": 0.25})  # 1/16 of its weights: the same code paths
_EXPORTED: dict[tuple, str] = {}  # encoder architecture -> the run whose ONNX export verified it


def kit_backbone(task_cls: type, volumes: bool = False, image_size: int = 32) -> tuple[str, dict[str, Any]]:
    """A tiny backbone of the family of the task's default at ``image_size`` (timm ViT or CNN; for
    ``volumes``, the MONAI ViT or 3D ResNet in its place)."""
    pick = getattr(task_cls, "default_backbone_for", None)
    default = pick(image_size) if callable(pick) else getattr(task_cls, "default_backbone", "timm:resnet18")
    if default.startswith("timm:vit"):
        return TINY_VIT3D if volumes else TINY_VIT
    if default.startswith("timm:") or volumes:
        return TINY_CNN3D if volumes else TINY_CNN
    return default, {}


@uses_builtins("timm", "folder", "csv", "onnx", volumes=("monai",))
def check_task(task: Any, *, tmp_path: Path, backbone: str | None = None, backbone_options: dict | None = None,
               options: dict | None = None, image_size: int = 32, batch_size: int = 4, steps: int = 2,
               channels: tuple[int, ...] = (1, 3), export: bool = True, resume: bool = True,
               volume: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Check task ``task`` (a registered name or the Task class itself) end to end.

    For each of ``channels``: ``sslkit pretrain --device cpu`` for ``steps`` optimizer steps on
    ``batch_size * steps`` generated ``image_size``² images, with ``backbone`` (default: a tiny one of
    the family of the task's default at ``image_size``) and ``options`` (``--task-opt``), after checking,
    with or without ``backbone``, that the task's own default backbone for ``image_size``
    (``default_backbone_for``, fitted by ``default_backbone_options``) builds and pairs with it; every
    loss is finite, the run finishes and its
    encoder maps ``(2, C, S, S) -> (2, D)``. Also: the class defines ``views`` and ``forward``; the loss
    of one forward depends on some ``self.encoder`` parameter (is in its autograd graph: a loss that
    ignores the encoder trains nothing; a gradient that is zero at the first step, as behind a
    zero-initialised head, is fine); ``views(spec)`` has ``override``; ``resolved_options()`` and
    ``planned_options`` (of a 1-step and a 10**6-step run) name options with values it builds with;
    with ``export``, ``sslkit export``
    writes a verified ONNX file of the encoder (once per distinct architecture in this process); with
    ``resume``, a copy of the first run cut back to its step-1 checkpoint (as a crash leaves it) resumed
    with ``sslkit pretrain --resume`` logs the same losses, bit for bit. A class that is not registered
    is made available under a temporary name for the duration. With ``volume`` ``(D, H, W)`` the same
    runs are on volumes (as ``--sample volume``): generated ones through the kit's own source
    (``kit-volumes``), 1 channel, the encoder mapping ``(2, 1, D, H, W) -> (2, D')``, with ``backbone``
    defaulting to a tiny MONAI network of the task's family (``monai:vit``, or ``monai:resnet10`` at a quarter
    of its width; the ``volumes`` extra). Returns ``{"task", "backbone", "losses": {C: [...]}, "export", "resume"}``.
    """
    name, cls = _check_class(task, volume)
    _check_default_backbone(cls, options or {}, image_size)
    if backbone is None:
        backbone, kit_options = kit_backbone(cls, volume is not None, image_size)
        backbone_options = {**kit_options, **(backbone_options or {})}
    channels = channels if volume is None else (1,)
    tmp_path = Path(tmp_path)
    temporary = registered_as("tasks", f"kit-{cls.__name__.lower()}", cls) if name is None else nullcontext(name)
    volumes = registered_as("sources", KitVolumes.scheme, KitVolumes) if volume is not None else nullcontext()
    with temporary as name, volumes:
        report: dict[str, Any] = {"task": name, "backbone": backbone, "losses": {}}
        task, views, spec = _check_views(cls, backbone, backbone_options or {}, options or {}, image_size, volume)
        _check_encoder_gradient(name, task, views, spec, batch_size)
        args = _options(volume, backbone_options or {}, options or {})
        for i, c in enumerate(channels):
            n = steps + 1 if (i == 0 and resume) else steps
            out = tmp_path / f"run-{c}"
            _pretrain(name, _data(tmp_path, batch_size * n, image_size, c, volume), out, backbone,
                      image_size if volume is None else None, batch_size, n, c, args)
            rows = metric_rows(out)
            what = f"task {name!r} ({c} channel{'s' if c > 1 else ''})"
            assert len(rows) == n, f"{what}: {len(rows)} optimizer steps logged, expected {n}"
            report["losses"][c] = finite_losses(rows, what)
            _check_encoder(out, (c, *volume) if volume else (c, image_size, image_size), what)
            if i == 0 and export:
                report["export"] = _check_export(out, tmp_path / f"encoder-{c}.onnx", c, image_size)
            if i == 0 and resume:
                report["resume"] = _check_resume(out, tmp_path / f"run-{c}-resumed", rows, what)
    return report


def _check_class(task: Any, volume: tuple | None) -> tuple[str | None, type]:
    """``task`` resolves to a :class:`sslkit.api.Task` subclass with a dataclass (or no) ``Options``
    that implements ``views`` and ``forward`` (and, with ``volume``, trains on volumes); its registered
    name (None when not registered) and class."""
    import dataclasses

    from sslkit.api import Task
    from sslkit.task import unimplemented

    name, cls = resolve("tasks", task)
    assert isinstance(cls, type) and issubclass(cls, Task), f"{task!r} is not a subclass of sslkit.api.Task"
    assert cls.Options is None or (isinstance(cls.Options, type) and dataclasses.is_dataclass(cls.Options)), \
        f"{cls.__name__}.Options must be a @dataclass (or None for no options), got {cls.Options!r}"
    missing = unimplemented(cls)
    assert not missing, f"{cls.__name__} does not implement {' and '.join(missing)}: a Task subclass returns its " \
                        f"augmentation from views (a MultiView) and its loss from forward"
    check = next(k.__dict__["check"] for k in cls.__mro__ if "check" in k.__dict__)
    assert isinstance(check, (classmethod, staticmethod)), \
        f"{cls.__name__}.check is an instance method, but the engine calls it on the class, before building the " \
        f"task: make check a @classmethod (def check(cls, backbone, spec))"
    if volume is not None:
        from sslkit.sample_modes import task_modes

        assert "volume" in task_modes(cls), f"{cls.__name__} does not train on volumes: add \"volume\" to its " \
                                            f"sample_modes (now {task_modes(cls)}) to check it on them"
    return name, cls


def _pretrain(task: str, data: str, out: Path, backbone: str, image_size: int | None, batch_size: int, steps: int,
              channels: int, options: list[str]) -> None:
    """``sslkit pretrain`` for the kit: CPU, deterministic, seeded, one checkpoint per step, kept (no
    ``--image-size`` for volumes, ``image_size`` None: a volume run refuses it)."""
    size = ("--image-size", image_size) if image_size is not None else ()
    sslkit("pretrain", "--task", task, "--data", data, "--out", out, "--backbone", backbone,
           *size, "--batch-size", batch_size, "--epochs", 1, "--max-steps", steps,
           "--channels", channels, "--seed", 0, "--deterministic", "--no-cache", "--quiet", "--device", "cpu",
           "--checkpoint-every", 1, "--keep-checkpoints", 0, *options)


def _options(volume: tuple | None, backbone_options: dict, options: dict) -> list[str]:
    """``--data-opt`` for volumes, then ``--backbone-opt`` and ``--task-opt``, as a user types them."""
    args = []
    if volume is not None:
        args += ["--data-opt", f"volume_size={','.join(map(str, volume))}"]
    for k, v in backbone_options.items():
        args += ["--backbone-opt", f"{k}={v}"]
    for k, v in options.items():
        args += ["--task-opt", f"{k}={v}"]
    return args


def _data(tmp_path: Path, n: int, size: int, channels: int, volume: tuple | None) -> str:
    """``--data`` for the kit's runs: ``n`` images (a folder), or ``n`` volumes (:class:`KitVolumes`)."""
    if volume is None:
        return f"folder:{image_folder(tmp_path / f'images-{channels}x{size}-{n}', n, size, channels)}"
    folder = volume_folder(tmp_path / f"volumes-{n}x{'x'.join(map(str, volume))}", n, volume)
    return f"{KitVolumes.scheme}:{folder}"


def _check_views(cls: type, backbone: str, backbone_options: dict, options: dict, image_size: int,
                 volume: tuple | None = None, whose: str | None = None) -> tuple[Any, Any, Any]:
    """``views(spec)`` returns a callable with ``override`` (what ``--augment-opt`` calls); the task
    (1 channel), its views and the spec, for :func:`_check_encoder_gradient`. With ``whose`` (the
    task's default backbone, in words), a backbone that cannot be built is an ``AssertionError``
    naming it (else the ``UsageError`` the user's own ``--backbone`` would get)."""
    from sslkit.api import InputSpec, UsageError
    from sslkit.options import build_options
    from sslkit.registry import create_backbone

    spec = InputSpec(1, image_size, (0.5,), (0.25,))
    if volume:
        spec = InputSpec(1, image_size, (0.5,), (0.25,), KitVolumes.scheme,
                         {"sample": "volume", "volume_size": list(volume), "spacing_mm": "native"})
    try:
        net = create_backbone(backbone, 1, tuple(volume) if volume else image_size, **backbone_options)
    except UsageError as exc:
        if whose is None:
            raise
        raise AssertionError(f"{whose} cannot be built: {exc}") from None
    reason = cls.check(net, spec)
    assert reason is None, f"{cls.__name__}.check refuses the kit's pairing ({backbone}, {image_size} px): {reason}"
    task = cls(net, build_options(cls.Options, options, cls.__name__) if cls.Options else None, spec)
    try:
        views = task.views(spec)
    except NotImplementedError:
        raise AssertionError(f"{cls.__name__}.views(spec) raises NotImplementedError: implement it (return "
                             f"an sslkit.api.MultiView)") from None
    assert callable(views), f"{cls.__name__}.views(spec) must return a callable (B, C, S, S) -> Views"
    assert callable(getattr(views, "override", None)), \
        f"{cls.__name__}.views(spec) has no override(**fields) for --augment-opt (return an sslkit.api.MultiView)"
    assert callable(views.override()), f"{cls.__name__}.views(spec).override() must return the views callable"
    _check_resolved(cls, task, net, options, spec)
    _check_planned(cls, net, options, spec)
    return task, views, spec


def _check_encoder_gradient(name: str, task: Any, views: Any, spec: Any, batch_size: int) -> None:
    """One forward of ``task`` on random images: its loss is in the autograd graph of some trainable
    parameter of ``task.encoder`` (a loss that ignores the encoder would train and export nothing,
    silently). Whether the gradient is zero at this step does not matter: behind a zero-initialised
    head it is, and the head's own first step makes it non-zero."""
    import torch

    images = max(batch_size, int(getattr(task, "min_batch", 1)))
    shape = (images, 1, *spec.volume_size) if spec.volume_size else (images, 1, spec.image_size, spec.image_size)
    params = [p for p in task.encoder.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            loss = task.train()(views(torch.rand(shape)))["loss"]
        except Exception:  # the run below reports it, with what the engine says
            return
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            return  # the run refuses it in one line naming the task
        connected = bool(params) and loss.requires_grad and any(
            g is not None for g in torch.autograd.grad(loss.sum(), params, allow_unused=True))
    assert connected, (f"task {name!r}: no parameter of self.encoder is in the loss's autograd graph; the loss must "
                       f"depend on the encoder (the backbone that trains and is exported), else the run trains "
                       f"nothing")


def _check_option_values(cls: type, values: Any, method: str, how: str) -> None:
    """What ``cls.<method>`` returned is a dict of the task's options, none of them None."""
    from sslkit.options import option_names

    assert isinstance(values, dict), f"{cls.__name__}.{method} must return a dict"
    unknown = sorted(set(values) - option_names(cls.Options))
    assert not unknown, f"{cls.__name__}.{method} names {unknown}, which are not options of the task"
    missing = sorted(k for k, v in values.items() if v is None)
    assert not missing, f"{cls.__name__}.{method} leaves {missing} at None: give the value {how}"


def _check_resolved(cls: type, task: Any, net: Any, options: dict, spec: Any) -> None:
    """``resolved_options()`` names options of the task, each with a value, and building the task
    with them resolves the same values (what ``--resume`` of the run.json they are recorded in does)."""
    from sslkit.options import build_options

    resolved = task.resolved_options()
    _check_option_values(cls, resolved, "resolved_options()", "chosen")
    if resolved:
        again = cls(net, build_options(cls.Options, {**options, **resolved}, cls.__name__), spec).resolved_options()
        assert again == resolved, (f"{cls.__name__} built with its resolved options resolves {again}, "
                                   f"not {resolved}: --resume would rebuild another task")


def _check_planned(cls: type, net: Any, options: dict, spec: Any) -> None:
    """``planned_options(total_steps)`` names options of the task, each with a value, for a short and a
    long run, and the task builds with them (what ``sslkit pretrain`` does once it knows the horizon)."""
    from sslkit.options import build_options

    for total in (1, 10**6):
        planned = cls.planned_options(total)
        _check_option_values(cls, planned, f"planned_options({total})", "planned")
        if planned:
            cls(net, build_options(cls.Options, {**planned, **options}, cls.__name__), spec)


def _check_default_backbone(cls: type, options: dict, image_size: int) -> None:
    """What ``sslkit pretrain`` builds without ``--backbone``: ``default_backbone_for(image_size)`` with
    its ``default_backbone_options`` for ``image_size`` builds and pairs with the task."""
    name = cls.default_backbone_for(image_size)
    assert isinstance(name, str), f"{cls.__name__}.default_backbone_for({image_size}) must return a backbone name"
    fitted = cls.default_backbone_options(image_size)
    assert isinstance(fitted, dict), f"{cls.__name__}.default_backbone_options({image_size}) must return a dict"
    _check_views(cls, name, fitted, options, image_size,
                 whose=f"{cls.__name__}'s default backbone {name!r} with {fitted} (what sslkit pretrain builds "
                       f"without --backbone at {image_size} px)")


def _check_encoder(run: Path, sample: tuple[int, ...], what: str) -> None:
    """The finished run's encoder maps 2 samples of shape ``sample`` (``(C, S, S)`` or
    ``(C, D, H, W)``) to finite ``(2, D')``."""
    import torch

    from sslkit.run import load_run

    loaded = load_run(run)
    assert loaded.info.get("status") == "finished", f"{what}: run status {loaded.info.get('status')!r}"
    encoder = loaded.build_encoder()
    with torch.no_grad():
        emb = encoder(torch.rand(2, *sample))
    assert emb.shape == (2, loaded.info["embedding_dim"]), f"{what}: encoder gives {tuple(emb.shape)}"
    assert torch.isfinite(emb).all(), f"{what}: the trained encoder gives non-finite embeddings"


def _check_export(run: Path, out: Path, channels: int, size: int) -> str:
    """``sslkit export RUN --format onnx`` (its own onnxruntime parity check), once per architecture."""
    from sslkit.run import load_run

    key = (repr(load_run(run).build_encoder()), channels, size)
    if key in _EXPORTED:
        return f"same architecture as {_EXPORTED[key]}, exported and verified earlier in this process"
    sslkit("export", run, "--out", out, "--format", "onnx", "--check-data", "none", "--json")
    assert out.is_file() and out.stat().st_size > 0, f"sslkit export wrote no {out}"
    _EXPORTED[key] = str(run)
    return "onnx export verified by onnxruntime"


def _check_resume(run: Path, copy: Path, rows: list[dict[str, str]], what: str) -> str:
    """Cut a copy of ``run`` back to its step-1 checkpoint, as a crash would leave it, and resume."""
    saved = checkpoints(run)
    assert len(saved) == len(rows), f"{what}: expected a checkpoint per step, found {len(saved)}"
    crashed_copy(run, copy, keep=1)
    sslkit("pretrain", "--resume", copy, "--quiet")
    expected = [(r["step"], r["loss"]) for r in rows]
    got = [(r["step"], r["loss"]) for r in metric_rows(copy)]
    assert got == expected, f"{what}: resumed from step 1, the losses differ from the uninterrupted run: " \
                            f"{got} != {expected}"
    return f"resumed from step 1, steps 2-{len(rows)} repeat the uninterrupted losses exactly"
