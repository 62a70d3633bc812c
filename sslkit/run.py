"""A run directory: its resolved config (run.json), and reading a finished run back."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sslkit.errors import UsageError, first_line
from sslkit.output_file import check_regular, check_writable, nearest_folder
from sslkit.spec import InputSpec

RUN_JSON = "run.json"
ENCODER_FILE = "encoder.safetensors"
CHECKPOINTS = "checkpoints"  # the folder of a run's step-N checkpoints
DATA_REPORT = "data_report.json"
LOCK_FILE = ".sslkit.lock"  # sslkit.engine.lock: one process per run directory
#: the files and folders a run writes in its directory (an --overwrite run clears them; no output replaces them)
RUN_FILES = (RUN_JSON, ENCODER_FILE, "metrics.csv", DATA_REPORT, "config.toml")  # sslkit.run_record.CONFIG_TOML
RUN_FOLDERS = (CHECKPOINTS, "tensorboard")


PRECISIONS = ("fp32", "bf16", "fp16")

# Fields that may differ between a run and its --resume (they change how, not what, it computes).
RESUMABLE_OVERRIDES = frozenset({
    "out", "device", "progress", "compile", "capture", "checkpoint_every", "keep_checkpoints", "cache_dir",
    "callbacks", "resume", "overwrite", "allow_download", "allow_data_change",
    "epochs", "max_steps",  # a larger bound extends a run (the schedule is re-planned to the new horizon)
})


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a pretraining run, resolved once from defaults, the task's
    engine defaults, a config file and the CLI (:mod:`sslkit.config`).

    Saved in ``run.json``; nothing downstream re-parses argv. ``batch_size`` is the number
    of images in one forward pass summed over all processes; one optimizer step sees
    ``batch_size * accumulate`` images (the effective batch that scales the LR).
    """

    task: str
    data: str
    out: str
    backbone: str | None = None  # None: the task's default_backbone, fitted as `sslkit pretrain` fits it (engine.setup.with_backbone)
    init: str | None = None  # initial backbone weights: a file, a run directory, ORG/NAME or timm:MODEL.TAG
    allow_download: bool = False  # --init may fetch Hub weights missing from the local cache
    init_freeze_steps: int | None = None  # --init: encoder at LR 0 for these first steps; None: sslkit.init.continued
    init_lr_scale: float | None = None  # --init: the encoder's LR multiplier; None: sslkit.init.continued's default
    layer_decay: float | None = None  # --init: layer-wise LR decay over a ViT encoder's blocks; None: off
    epochs: int | None = 10  # None: --max-steps alone sets the length
    batch_size: int = 64
    image_size: int = 224
    max_steps: int | None = None
    seed: int = 0
    channels: int | None = None  # None: what most samples have
    # optimisation
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float | None = None  # None: base_lr scaled by lr_scaling
    base_lr: float = 1e-3  # LR for an effective batch of 256 images
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd, lars
    betas: tuple[float, float] = (0.9, 0.95)  # adamw
    warmup_epochs: float = 1.0
    schedule: Literal["cosine", "constant", "step"] = "cosine"  # after the warm-up (sslkit.engine.schedules)
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    accumulate: int = 1
    # speed
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    capture: Literal["off", "auto", "graphs"] = "off"  # the whole step as one CUDA graph (sslkit.engine.capture)
    channels_last: bool | None = None  # None: on for CNNs, off for token backbones (ViTs)
    device: str = "auto"
    sync_bn: bool = False
    deterministic: bool = False
    # checkpoints and logs
    checkpoint_every: int | None = None  # optimizer steps; unset: a checkpoint ends every epoch
    keep_checkpoints: int = 3  # 0: keep all
    callbacks: str = "csv"  # comma-separated names of registered callbacks (metrics.csv, tensorboard, ...)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    source_options: dict[str, Any] = field(default_factory=dict)
    augment_options: dict[str, Any] = field(default_factory=dict)  # ViewRecipe fields for every view
    cache_dir: str | None = None  # None: the default cache (~/.cache/sslkit); "": in memory (--no-cache)
    cache_size: int | None = None  # side length the decoded pixels are stored at; None: image_size
    val_fraction: float = 0.0  # held out by patient/group (sslkit.data.splits), never trained on
    max_pixels: int | None = None  # largest image (W x H) a decoder may open; None: sslkit.data.source default
    allow_data_change: bool = False  # --resume continues on data whose content changed
    progress: bool = True
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UsageError(f"config: {what}")

        need(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.epochs is not None or self.max_steps is not None, "set epochs or max_steps (or both)")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.image_size >= 8, f"image_size must be >= 8, got {self.image_size}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.accumulate >= 1, f"accumulate must be >= 1, got {self.accumulate}")
        need(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.base_lr > 0, f"base_lr must be > 0, got {self.base_lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        need(self.channels in (None, 1, 3), f"channels must be 1 or 3, got {self.channels}")
        need(self.init_freeze_steps is None or self.init_freeze_steps >= 0,
             f"init_freeze_steps must be >= 0, got {self.init_freeze_steps}")
        need(self.init_lr_scale is None or 0 < self.init_lr_scale <= 1,
             f"init_lr_scale must be in (0, 1] (a multiplier of the LR for the --init encoder), got {self.init_lr_scale}")
        need(self.layer_decay is None or 0 < self.layer_decay <= 1,
             f"layer_decay must be in (0, 1], got {self.layer_decay}")
        unused = [n for n in ("init_freeze_steps", "init_lr_scale", "layer_decay") if getattr(self, n) is not None]
        need(self.init is not None or not unused, f"{unused[0] if unused else ''} (--"
             f"{unused[0].replace('_', '-') if unused else ''}) applies to continued pretraining only; give --init too")
        need(self.resume or not self.allow_data_change, "allow_data_change (--allow-data-change) lets --resume "
             "continue on changed data; a new run has no earlier data: leave it out")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step, over all processes."""
        return self.batch_size * self.accumulate

    @property
    def effective_lr(self) -> float:
        """``lr`` if given, else ``base_lr`` scaled to the effective batch by ``lr_scaling``."""
        from sslkit.optim import scaled_lr

        return self.lr if self.lr is not None else scaled_lr(self.base_lr, self.effective_batch, self.lr_scaling)


def check_run_dir(cfg: RunConfig) -> Path:
    """Refuse a run directory that cannot be used, without touching anything."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {cfg.out!r} exists and is not a directory")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (cfg.overwrite or cfg.resume):
        if not (out / RUN_JSON).is_file():  # a user's folder: neither --resume nor --overwrite takes it
            raise UsageError(f"run directory {cfg.out!r} is not empty and is not an sslkit run (no {RUN_JSON}); "
                             f"give a new or empty --out")
        raise UsageError(
            f"run directory {cfg.out!r} is not empty; pass --resume to continue it or "
            f"--overwrite to replace it"
        )
    if cfg.resume and not (out / RUN_JSON).exists():
        raise UsageError(f"--resume: {cfg.out!r} holds no sslkit run to continue")
    if cfg.overwrite and out.is_dir() and not (out / RUN_JSON).is_file() and \
            any(p.name != LOCK_FILE for p in out.iterdir()):
        raise UsageError(f"--overwrite: {cfg.out!r} is not an sslkit run (no {RUN_JSON}) and is not empty; "
                         f"--overwrite replaces runs only: give a new or empty --out")
    check_writable(out if out.is_dir() else nearest_folder(out))  # before any image is decoded
    return out


def remove_unused_run_dir(out: Path) -> None:
    """Remove ``out`` if it holds nothing but the run lock: the folder a run started without ``--out``
    made for itself, when the run failed before writing anything (a failed run's record stays)."""
    try:
        if all(p.name == LOCK_FILE for p in out.iterdir()):
            (out / LOCK_FILE).unlink(missing_ok=True)
            out.rmdir()
    except OSError:  # gone already, or something appeared in it: leave it
        pass


def auto_resume(out: str | None) -> dict[str, Any]:
    """``--resume auto``: the settings that continue ``out`` when it holds a checkpoint
    (``resume``), replace an sslkit run that never reached one (``overwrite``), or start
    fresh; one command line serves every requeue of a job."""
    if not out:
        raise UsageError("--resume auto needs the run directory: --out RUN_DIR")
    run_dir = Path(out)
    if not (run_dir / RUN_JSON).is_file():
        return {}
    from sslkit.checkpoint import list_checkpoints  # the folders a resume can take, as it takes them

    if list_checkpoints(run_dir / CHECKPOINTS):
        return {"resume": True, "out": out}
    return {"overwrite": True}


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create ``cfg.out``, clearing sslkit's own files from it when overwriting
    (:func:`sslkit.run_clear.clear_own_files`: the user's files stay)."""
    out = check_run_dir(cfg)
    if cfg.overwrite and out.is_dir() and not cfg.resume:
        from sslkit.run_clear import clear_own_files

        clear_own_files(out, RUN_FILES, RUN_FOLDERS)
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Run:
    """A finished (or checkpointed) run read back from its directory."""

    path: Path
    info: dict[str, Any]
    #: ``RUN/checkpoints/step-N`` when that checkpoint's encoder was asked for (a run still
    #: training, interrupted, or an earlier step), else None: the final ``encoder.safetensors``
    checkpoint: Path | None = None

    @property
    def spec(self) -> InputSpec:
        try:
            return InputSpec.from_dict(self.info["input_spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{self.path / RUN_JSON}: its input_spec cannot be read "
                             f"({type(exc).__name__}: {first_line(exc)})") from None

    @property
    def config(self) -> dict[str, Any]:
        return self.info["config"]

    @property
    def backbone_name(self) -> str:
        return self.info["backbone"]

    def build_encoder(self, weights: bool = True):
        """The backbone with the run's trained weights, in eval mode.

        ``weights=False``: the random-init baseline of the same architecture, drawn from
        :data:`BASELINE_SEED` so every caller (eval, embed, benchmarks) gets the same one.
        """
        from sslkit import checkpoint

        if not weights:
            return build_baseline_encoder(self.backbone_name, self.spec, self.info.get("backbone_options") or {})
        encoder = _create_encoder(self.backbone_name, self.spec, self.info.get("backbone_options") or {})
        file = self.checkpoint or self.path / ENCODER_FILE
        tensors = checkpoint.encoder_tensors(file) if self.checkpoint is not None else self._final_tensors(file)
        try:
            encoder.load_state_dict(tensors)
        except Exception as exc:
            raise UsageError(f"cannot load {file}: {type(exc).__name__}: {first_line(exc)}") from None
        return encoder.eval()

    def _final_tensors(self, file: Path) -> dict[str, Any]:
        """``encoder.safetensors``'s tensors, where it is the run's newest encoder, unchanged since written."""
        from safetensors.torch import load_file

        from sslkit.checkpoint import newest_hint
        from sslkit.output_file import file_sha256

        status = self.info.get("status", "finished")
        if not file.exists() or status != "finished":  # not finished, or resumed since: an earlier session's
            why = (f"has no {ENCODER_FILE}: pretraining has not finished (still training, or stopped: its "
                   f"{RUN_JSON} says {status!r})" if not file.exists() else
                   f"is {status!r} in its {RUN_JSON}, so its {ENCODER_FILE} is from an earlier session, not its "
                   "newest weights")
            raise UsageError(f"run {str(self.path)!r} {why}{newest_hint(self.path / CHECKPOINTS)}, or let the run "
                             "finish (--resume a stopped one)")
        check_regular(file)  # a FIFO or /dev/zero: nothing read (file_sha256 checks too; load_file reads it)
        if self.info.get("encoder_sha256") and file_sha256([file]) != self.info["encoder_sha256"]:
            raise UsageError(f"{file}: changed since the run wrote it (its sha256 is not the one run.json "
                             f"records); restore it, or use a checkpoint{newest_hint(self.path / CHECKPOINTS)}")
        try:
            return load_file(str(file))
        except Exception as exc:
            raise UsageError(f"cannot load {file}: {type(exc).__name__}: {first_line(exc)}") from None


def check_not_run_file(out: Path, run_dir: Path) -> None:
    """Refuse, in one line, an output path that is one of ``run_dir``'s own files (``run.json``, its
    encoder, a checkpoint...): even ``--overwrite`` must not replace what the run is read from."""
    target, root = Path(os.path.abspath(out)), Path(os.path.realpath(run_dir))
    target = Path(os.path.realpath(target.parent)) / target.name
    if target.parent == root and target.name in (*RUN_FILES, LOCK_FILE, *RUN_FOLDERS) or \
            any(root / name in target.parents for name in RUN_FOLDERS):
        raise UsageError(f"--out {str(out)!r} is the run's own {target.relative_to(root)}; write the output "
                         "elsewhere (the run is read from it)")


BASELINE_SEED = 0


def _create_encoder(backbone: str, spec: InputSpec, options: dict[str, Any]):
    from sslkit.registry import create_backbone

    size = tuple(spec.volume_size) if spec.sample == "volume" and spec.volume_size else spec.image_size
    return create_backbone(backbone, in_chans=spec.channels, image_size=size, **options)


def build_baseline_encoder(backbone: str, spec: InputSpec, options: dict[str, Any]):
    """A randomly initialised encoder (fixed seed, global RNG untouched), in eval mode."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASELINE_SEED)
        return _create_encoder(backbone, spec, options).eval()


def checkpoint_path(path: Path) -> Path:
    """``path``, a missing ``RUN/checkpoints/step-N`` (N plain: ``step-10``) as its folder (``step-00000010``);
    a usage error naming the run's checkpoints when that one is missing too."""
    step = re.fullmatch(r"step-([0-9]+)", path.name)
    if not step or path.absolute().parent.name != CHECKPOINTS or path.is_dir():
        return path
    path = path if path.exists() else path.parent / f"step-{int(step[1]):08d}"
    if not path.is_dir() and path.parent.is_dir():
        have = sorted(p.name for p in path.parent.iterdir() if p.name.startswith("step-"))
        raise UsageError(f"checkpoint {str(path)!r} does not exist; the run has {', '.join(have[-5:]) or 'none'}")
    return path


def split_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """``(RUN, path)`` when ``path`` is a checkpoint folder of a run (``RUN/checkpoints/step-N``; N as
    the folder names it, ``step-00000010``, or plain, ``step-10``), else ``(path, None)``."""
    path = checkpoint_path(path)
    if path.is_dir() and path.parent.name == CHECKPOINTS and (path.parent.parent / RUN_JSON).is_file():
        return path.parent.parent, path
    return path, None


def load_run(path: str | Path) -> Run:
    """The run at ``path``: a run directory, or one of its checkpoints (``RUN/checkpoints/step-N``,
    whose encoder :meth:`Run.build_encoder` then loads instead of the final one)."""
    path, ckpt = split_checkpoint(Path(path))
    if not path.is_dir():
        raise UsageError(f"run directory {str(path)!r} does not exist")
    file = path / RUN_JSON
    if not file.exists():
        raise UsageError(f"{str(path)!r} is not an sslkit run directory (no {RUN_JSON})")
    check_regular(file)  # a FIFO, a folder, /dev/zero: refused, never read (a checkpoint's: checkpoint.verify)
    try:
        info = json.loads(file.read_text())
    except ValueError as exc:  # bad JSON, or bytes that are not UTF-8
        raise UsageError(f"{file} is not valid JSON: {first_line(exc)}") from None
    except (RecursionError, MemoryError):  # [[[[...]]]] 100,000 deep: the parser recurses
        raise UsageError(f"{file} is not valid JSON: nested too deeply") from None
    if not isinstance(info, dict):
        raise UsageError(f"{file} is not an sslkit run record (a JSON object)")
    for key, kind in (("task", str), ("backbone", str), ("config", dict), ("input_spec", dict)):
        if not isinstance(info.get(key), kind):
            raise UsageError(f"{file} is not a complete sslkit run record: {key!r} is "
                             + ("missing" if key not in info else f"not a {'string' if kind is str else 'table'}"))
    return Run(path, info, ckpt)
