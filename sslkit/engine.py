"""The training loop: data -> views -> task loss -> optimizer, with checkpoints and logs.

The engine knows no task by name: tasks plug in through ``views``, ``forward`` and
``on_step_end`` (see :mod:`sslkit.task`).
"""

from __future__ import annotations

import csv
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sslkit import checkpoint
from sslkit.data.loader import BatchLoader
from sslkit.data.pipeline import load_data
from sslkit.data.prepare import channel_stats, fingerprint
from sslkit.errors import UsageError
from sslkit.optim import build_optimizer, warmup_cosine
from sslkit.registry import create_backbone, create_task, get_task, resolve_data
from sslkit.run import ENCODER_FILE, RUN_JSON, RunConfig, check_run_dir, environment, prepare_run_dir, write_json_atomic
from sslkit.spec import InputSpec


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_pairing(task_cls, backbone_name: str, cfg: RunConfig) -> None:
    c = cfg.channels or 1
    probe = create_backbone(backbone_name, in_chans=c, image_size=cfg.image_size, **cfg.backbone_options)
    spec = InputSpec(c, cfg.image_size, (0.5,) * c, (0.25,) * c)
    reason = task_cls.check(probe, spec)
    if reason:
        raise UsageError(f"task {cfg.task!r} cannot run here: {reason}")


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) pretraining as ``cfg`` says; returns the final summary."""
    task_cls = get_task(cfg.task)
    resolve_data(cfg.data)  # fail on a bad --data before touching the run directory
    backbone_name = cfg.backbone or task_cls.default_backbone
    check_run_dir(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    _check_pairing(task_cls, backbone_name, cfg)  # fail fast, before decoding anything
    data = load_data(cfg.data, cfg.image_size, cfg.channels, cfg.source_options, cfg.cache_dir, cfg.progress)
    source, prepared, channels = data.source, data.prepared, data.channels
    mean, std = channel_stats(prepared.pixels)
    spec = InputSpec(channels, cfg.image_size, mean, std, source.scheme, source.describe())
    backbone = create_backbone(backbone_name, in_chans=channels, image_size=cfg.image_size,
                               **cfg.backbone_options)
    task = create_task(cfg.task, backbone, spec, **cfg.task_options)

    # Everything the user asked for is valid: only now is the run directory written.
    out = prepare_run_dir(cfg)
    write_json_atomic(out / "data_report.json", {
        "samples": len(prepared), "skipped": len(prepared.skipped),
        "skipped_files": [{"path": p, "reason": r} for p, r in prepared.skipped],
    })
    augment = task.views(spec)
    task.to(device)
    if isinstance(augment, torch.nn.Module):
        augment.to(device)

    loader = BatchLoader(prepared.pixels, cfg.batch_size, cfg.seed)
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total // 2)
    optimizer = build_optimizer(task, cfg.effective_lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))

    info = {
        "task": cfg.task,
        "backbone": backbone_name,
        "backbone_options": dict(cfg.backbone_options),
        "config": cfg.to_dict(),
        "input_spec": spec.to_dict(),
        "embedding_dim": int(backbone.num_features),
        "dataset": {"fingerprint": fingerprint(prepared.refs, spec.preprocessing),
                    "samples": len(prepared), "skipped": len(prepared.skipped)},
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "environment": environment(),
        "status": "running",
    }
    write_json_atomic(out / RUN_JSON, info)

    step, start_epoch, start_batch = 0, 0, 0
    ckpt_dir = out / "checkpoints"
    if cfg.resume:
        found = checkpoint.load_latest(ckpt_dir)
        if found is not None:
            _, tensors, state = found
            task.load_state_dict(tensors)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, start_epoch, start_batch = state["step"], state["epoch"], state["batch"]
            _set_rng(state["rng"])

    metrics_file = out / "metrics.csv"
    writer = _MetricsWriter(metrics_file, append=cfg.resume and step > 0)
    bar = tqdm(total=total, initial=step, desc=f"{cfg.task}", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    images = 0
    last = {}
    task.train()
    epoch, b = start_epoch, start_batch
    try:
        while step < total and epoch < cfg.epochs:
            for batch in loader.epoch(epoch, b):
                t0 = time.perf_counter()
                batch = batch.to(device, non_blocking=True)
                views = augment(batch)
                result = task(views)
                loss = result["loss"]
                if not torch.isfinite(loss):
                    raise UsageError(
                        f"loss became {loss.item()} at step {step + 1}; lower --lr (now "
                        f"{cfg.effective_lr:g}); the last good checkpoint is in {ckpt_dir}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step, b = step + 1, b + 1
                task.on_step_end(step, total)
                dt = time.perf_counter() - t0
                images += batch.shape[0]
                last = {k: float(v.detach()) for k, v in result.items() if torch.is_tensor(v) and v.numel() == 1}
                row = {"step": step, "epoch": epoch, **last, "lr": optimizer.param_groups[0]["lr"],
                       "img_per_s": batch.shape[0] / dt}
                writer.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                img_s=f"{row['img_per_s']:.0f}")
                if step >= total:
                    break
            if b >= steps_per_epoch:
                epoch, b = epoch + 1, 0
            _save_checkpoint(ckpt_dir, task, optimizer, scheduler, step, epoch, b)
    finally:
        bar.close()
        writer.close()

    encoder_state = {k: v.detach().contiguous().cpu() for k, v in task.encoder.state_dict().items()}
    save_file(encoder_state, str(out / ENCODER_FILE))
    elapsed = time.perf_counter() - t_start
    summary = {"steps": step, "seconds": round(elapsed, 2),
               "img_per_s": round(images / elapsed, 2) if elapsed > 0 else None,
               "final_loss": last.get("loss")}
    info.update(status="finished", summary=summary)
    write_json_atomic(out / RUN_JSON, info)
    return summary


def _save_checkpoint(folder: Path, task, optimizer, scheduler, step: int, epoch: int, batch: int) -> None:
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step, "epoch": epoch, "batch": batch,
        "rng": _get_rng(),
    }
    checkpoint.save(folder, step, task.state_dict(), state)


def _get_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _MetricsWriter:
    """metrics.csv: one row per optimizer step; columns fixed by the first row."""

    def __init__(self, path: Path, append: bool) -> None:
        self.path = path
        self.append = append and path.exists()
        self.file = None
        self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            if self.append:
                with open(self.path) as f:
                    fields = next(csv.reader(f))
            else:
                fields = ["step", "epoch", "loss", "lr", "img_per_s"]
                fields += sorted(k for k in row if k not in fields)
            self.file = open(self.path, "a" if self.append else "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
            if not self.append:
                self.writer.writeheader()
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
