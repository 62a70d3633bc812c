"""A run directory: its resolved config (run.json), and reading a finished run back."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslkit.errors import UsageError
from sslkit.spec import InputSpec

RUN_JSON = "run.json"
ENCODER_FILE = "encoder.safetensors"


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a pretraining run, resolved once from the CLI / a config.

    Saved in ``run.json``; nothing downstream re-parses argv.
    """

    task: str
    data: str
    out: str
    backbone: str | None = None  # None: the task's default_backbone
    epochs: int = 10
    batch_size: int = 64
    image_size: int = 224
    lr: float | None = None  # None: base_lr * batch_size / 256
    base_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    channels: int | None = None  # None: what most samples have
    backbone_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    source_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None  # None: in memory
    device: str = "auto"
    progress: bool = True
    overwrite: bool = False
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


def check_run_dir(cfg: RunConfig) -> Path:
    """Refuse a run directory that cannot be used, without touching anything."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {cfg.out!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise UsageError(
            f"run directory {cfg.out!r} is not empty; pass --resume to continue it or "
            f"--overwrite to replace it"
        )
    if cfg.resume and not (out / RUN_JSON).exists():
        raise UsageError(f"--resume: {cfg.out!r} holds no sslkit run to continue")
    return out


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create ``cfg.out``, clearing sslkit's own files from it when overwriting."""
    out = check_run_dir(cfg)
    if cfg.overwrite and out.is_dir() and not cfg.resume:
        for name in (RUN_JSON, ENCODER_FILE, "metrics.csv", "data_report.json"):
            (out / name).unlink(missing_ok=True)
        ckpts = out / "checkpoints"
        if ckpts.is_dir():
            for f in ckpts.iterdir():
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def environment() -> dict[str, Any]:
    """Versions and hardware for provenance (no user or host identifiers)."""
    import timm
    import torch

    from sslkit import __version__

    return {
        "sslkit": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": sys.version.split()[0],
        "platform": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }


@dataclass
class Run:
    """A finished (or checkpointed) run read back from its directory."""

    path: Path
    info: dict[str, Any]

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.info["input_spec"])

    @property
    def config(self) -> dict[str, Any]:
        return self.info["config"]

    @property
    def backbone_name(self) -> str:
        return self.info["backbone"]

    def build_encoder(self, weights: bool = True):
        """The backbone with the run's trained weights, in eval mode."""
        from safetensors.torch import load_file

        from sslkit.registry import create_backbone

        spec = self.spec
        encoder = create_backbone(
            self.backbone_name, in_chans=spec.channels, image_size=spec.image_size,
            **self.info.get("backbone_options", {}),
        )
        if weights:
            file = self.path / ENCODER_FILE
            if not file.exists():
                raise UsageError(f"run {str(self.path)!r} has no {ENCODER_FILE}: pretraining did not finish")
            try:
                encoder.load_state_dict(load_file(str(file)))
            except Exception as exc:
                raise UsageError(f"cannot load {file}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        return encoder.eval()


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"run directory {str(path)!r} does not exist")
    file = path / RUN_JSON
    if not file.exists():
        raise UsageError(f"{str(path)!r} is not an sslkit run directory (no {RUN_JSON})")
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file} is not valid JSON: {exc}") from None
    return Run(path, info)
