"""The training engine: accumulation, schedule as logged, optimizers, AMP, provenance,
divergence. ``probe`` is a test task with deterministic views, installed as a plugin."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from sslkit import plugins
from sslkit.errors import UsageError
from tests.conftest import install_plugin, make_images

PROBE = '''
"""Test task: deterministic views (x, flipped x), a linear projection, and either the
per-sample cosine loss (decomposable: accumulation is exact) or SimCLR's NT-Xent."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import sslkit
from sslkit.task import Task
from sslkit_plugins.tasks.simclr import nt_xent_loss


@dataclass
class ProbeOptions:
    loss: str = "cosine"  # or "ntxent"
    nan_at_step: int = 0  # 1-based step whose loss is NaN (0: never)


class Probe(Task):
    Options = ProbeOptions
    default_backbone = "timm:vit_tiny_patch16_224"

    def __init__(self, backbone, options, spec):
        super().__init__(backbone, options, spec)
        self.proj = torch.nn.Linear(backbone.num_features, 16)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def views(self, spec):
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)

        def augment(x):
            x = (x - mean.to(x.device)) / std.to(x.device)
            return x, x.flip(-1)
        return augment

    def forward(self, views):
        a, b = views
        z1, z2 = self.proj(self.encoder(a)), self.proj(self.encoder(b))
        if self.options.loss == "ntxent":
            loss = nt_xent_loss(z1, z2, 0.5)
        else:
            loss = (1 - F.cosine_similarity(z1, z2.roll(1, dims=1))).mean()
        if self.options.nan_at_step and int(self.steps_seen) + 1 == self.options.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "z_norm": z1.norm(dim=1).mean()}

    def on_step_end(self, step, total):
        self.steps_seen.fill_(step)


@sslkit.hookimpl
def register_tasks(register):
    register("probe", Probe)
'''

TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def install_probe(root: Path) -> Path:
    """Write the probe plugin as an installed distribution on ``root``; returns ``root``."""
    return install_plugin(root, "sslkit_probe", "probe", PROBE)


@pytest.fixture
def probe(tmp_path, monkeypatch) -> Path:
    root = install_probe(tmp_path / "probe_plugin")
    monkeypatch.syspath_prepend(str(root))
    plugins.reset()
    return root


@pytest.fixture
def images(tmp_path) -> Path:
    return make_images(tmp_path / "img", n_per_class=8, size=20)


def config(images: Path, out: Path, **kw):
    from sslkit.run import RunConfig

    base = dict(task="probe", data=f"folder:{images}", out=str(out), image_size=16, epochs=1, batch_size=8,
                backbone_options={**TINY_VIT, "patch_size": 8}, progress=False, deterministic=True,
                warmup_epochs=0.5)
    base.update(kw)
    return RunConfig(**base)


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def encoder(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "encoder.safetensors"))


def test_accumulation_equals_a_larger_batch(probe, images, tmp_path):
    from sslkit.engine import pretrain

    # SGD: unlike Adam its update scales with the gradient, so a wrong 1/K would show
    sgd = dict(optimizer="sgd", base_lr=1.6, epochs=2)  # lr = 1.6 * 8 / 256 = 0.05 for both
    big = pretrain(config(images, tmp_path / "big", batch_size=8, accumulate=1, **sgd))
    acc = pretrain(config(images, tmp_path / "acc", batch_size=2, accumulate=4, **sgd))
    assert big["steps"] == acc["steps"] == 4  # 16 images / 8 per step x 2 epochs
    a, b = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    for ra, rb in zip(a, b):
        assert float(ra["lr"]) == float(rb["lr"])  # the LR rule sees the same effective batch
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5, abs=1e-6)
    ea, eb = encoder(tmp_path / "big"), encoder(tmp_path / "acc")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-5)
    # and accumulation is not a no-op: a plain batch of 2 trains differently
    small = pretrain(config(images, tmp_path / "small", batch_size=2, accumulate=1, max_steps=4, optimizer="sgd",
                            lr=0.05))
    assert small["steps"] == 4
    assert any(not torch.allclose(ea[k], v) for k, v in encoder(tmp_path / "small").items())


def test_metrics_schedule_and_provenance(probe, images, tmp_path):
    from sslkit.engine import pretrain
    from sslkit.optim import warmup_cosine

    out = tmp_path / "run"
    summary = pretrain(config(images, out, batch_size=4, epochs=2, base_lr=2e-3, grad_clip=1.0))
    rows = read_metrics(out)
    assert list(rows[0])[:5] == ["step", "epoch", "loss", "lr", "img_per_s"]
    assert {"z_norm", "grad_norm"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == list(range(1, 9)) and [int(r["epoch"]) for r in rows] == [0] * 4 + [1] * 4
    lr = 2e-3 * 4 / 256  # linear rule
    total, warmup = 8, 2  # 4 steps per epoch, warm-up half an epoch
    for r in rows:
        assert float(r["lr"]) == pytest.approx(lr * warmup_cosine(int(r["step"]) - 1, total, warmup), rel=1e-8)
        assert float(r["img_per_s"]) > 0 and float(r["grad_norm"]) >= 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["summary"]["steps"] == 8 == summary["steps"]
    assert info["config"]["grad_clip"] == 1.0 and info["optimization"]["lr"] == pytest.approx(lr)
    env = info["environment"]
    assert {"sslkit", "torch", "timm", "git_commit", "command", "cpu_count", "gpus", "world_size"} <= set(env)
    assert info["dataset"]["fingerprint"] and info["dataset"]["samples"] == 16
    assert isinstance(info["source_options_resolved"], dict)
    assert summary["final_loss"] == pytest.approx(float(rows[-1]["loss"]))


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_other_optimizers_train(probe, images, tmp_path, optimizer):
    from sslkit.engine import pretrain

    out = tmp_path / optimizer
    summary = pretrain(config(images, out, optimizer=optimizer, epochs=2, batch_size=4, base_lr=5.0))
    assert summary["steps"] == 8 and torch.isfinite(torch.tensor(summary["final_loss"]))
    state = torch.load(sorted((out / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())


def test_bf16_autocast_on_cpu(probe, images, tmp_path):
    from sslkit.engine import pretrain

    summary = pretrain(config(images, tmp_path / "bf16", precision="bf16", max_steps=2))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        pretrain(config(images, tmp_path / "fp16", precision="fp16", device="cpu"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(probe, images, tmp_path):
    from sslkit import checkpoint
    from sslkit.engine import pretrain

    out = tmp_path / "run"
    with pytest.raises(UsageError, match="loss became nan at step 5"):
        pretrain(config(images, out, batch_size=2, checkpoint_every=2, task_options={"nan_at_step": 5}))
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004"]
    path, tensors, state, skipped = checkpoint.load_latest(out / "checkpoints")
    assert state["step"] == 4 and not skipped
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert json.loads((out / "run.json").read_text())["status"] == "diverged"
    assert len(read_metrics(out)) == 4 and not (out / "encoder.safetensors").exists()


def test_nan_loss_names_a_checkpoint_only_where_one_was_written(probe, images, tmp_path):
    from sslkit.engine import pretrain

    with pytest.raises(UsageError) as first:
        pretrain(config(images, tmp_path / "a", batch_size=2, checkpoint_every=2, task_options={"nan_at_step": 1}))
    assert "loss became nan at step 1" in str(first.value) and "checkpoint is" not in str(first.value)
    assert not (tmp_path / "a" / "checkpoints").exists() or not any((tmp_path / "a" / "checkpoints").iterdir())
    with pytest.raises(UsageError) as later:
        pretrain(config(images, tmp_path / "b", batch_size=2, checkpoint_every=2, task_options={"nan_at_step": 5}))
    assert f"the last good checkpoint is {tmp_path / 'b' / 'checkpoints' / 'step-00000004'}" in str(later.value)


def test_batch_must_split_over_processes_and_fit_the_data(probe, images, tmp_path):
    from sslkit.engine import pretrain

    with pytest.raises(UsageError, match="fewer than one optimizer step"):
        pretrain(config(images, tmp_path / "r", batch_size=8, accumulate=4))
    assert not (tmp_path / "r").exists()  # nothing written for a run that cannot start


@pytest.mark.slow
def test_compile_gives_the_eager_losses(probe, images, tmp_path):
    from sslkit.engine import pretrain

    pretrain(config(images, tmp_path / "eager", max_steps=3))
    pretrain(config(images, tmp_path / "compiled", max_steps=3, compile=True))
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [float(r["loss"]) for r in compiled] == pytest.approx([float(r["loss"]) for r in eager], rel=1e-4)


def test_cnns_train_channels_last_by_default_with_the_same_losses(images, tmp_path):
    """Channels-last is a layout, not a different computation: the default (on for CNNs,
    on CPU too) and ``channels_last=False`` give the same losses and encoder."""
    from sslkit.engine import pretrain

    runs = {}
    for name, cl in (("default", None), ("nchw", False)):
        out = tmp_path / name
        pretrain(config(images, out, task="simclr", backbone="timm:resnet10t", backbone_options={},
                        task_options={"proj_hidden_dim": 32, "proj_dim": 16}, channels_last=cl))
        runs[name] = out
    info = json.loads((runs["default"] / "run.json").read_text())
    assert info["optimization"]["channels_last"] is True
    assert json.loads((runs["nchw"] / "run.json").read_text())["optimization"]["channels_last"] is False
    a, b = read_metrics(runs["default"]), read_metrics(runs["nchw"])
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-4)
    ea, eb = encoder(runs["default"]), encoder(runs["nchw"])
    assert all(ea[k].is_contiguous() for k in ea)  # saved in the standard layout
    # float sums in another order; with every residual block live, LARS's per-layer step carries them to ~6e-5
    bad = {k: float((ea[k] - eb[k]).abs().max()) for k in ea if not torch.allclose(ea[k], eb[k], rtol=1e-3, atol=1e-4)}
    assert not bad, bad


def test_the_pairing_check_before_decoding_leaves_the_rng_alone(images, tmp_path):
    """The task built to check options must not shift the real model's initialisation."""
    from sslkit.engine import _check_pairing

    cfg = config(images, tmp_path / "r", task="simclr", backbone="timm:resnet10t", backbone_options={},
                 task_options={"proj_hidden_dim": 32, "proj_dim": 16})
    torch.manual_seed(0)
    _check_pairing("timm:resnet10t", cfg)
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))


def test_the_pairing_check_refuses_only_what_fails_for_any_channel_count(images, tmp_path, monkeypatch):
    """Before decoding the channel count may be unknown: a task that needs colour is not
    refused then, only when 1 channel is asked for."""
    from sslkit.engine import _check_pairing
    from sslkit.errors import UsageError
    from sslkit.registry import get_task

    cls = get_task("simclr")
    monkeypatch.setattr(cls, "check", classmethod(lambda c, backbone, spec: "needs colour" if spec.channels == 1 else None))
    opts = dict(task="simclr", backbone="timm:resnet10t", backbone_options={}, task_options={"proj_dim": 16})
    _check_pairing("timm:resnet10t", config(images, tmp_path / "a", **opts))  # channels from the data: fine
    with pytest.raises(UsageError, match="needs colour"):
        _check_pairing("timm:resnet10t", config(images, tmp_path / "b", channels=1, **opts))


def test_the_pairing_probe_draws_no_weights_unless_it_must(images, tmp_path, monkeypatch):
    """The probe is built on torch's meta device (a ViT-L's took 6-7 s and gigabytes on the CPU). A task whose
    constructor reads a tensor's value cannot be built there: it is probed normally, and its refusal is the same."""
    from sslkit.engine import _check_pairing
    from sslkit.registry import get_task

    opts = dict(task="simclr", backbone="timm:resnet10t", backbone_options={}, task_options={"proj_dim": 16})
    probe = _check_pairing("timm:resnet10t", config(images, tmp_path / "a", **opts))
    assert {p.device.type for p in probe.parameters()} == {"meta"}

    cls, built_on = get_task("simclr"), []
    init = cls.__init__

    def reads_a_value(self, backbone, options, spec):
        init(self, backbone, options, spec)
        built_on.append(next(backbone.parameters()).device.type)
        if float(next(backbone.parameters()).detach().abs().sum()) == 0:  # a value: no meta tensor has one
            raise UsageError("all-zero weights")
        if options.proj_dim == 8:
            raise UsageError("proj_dim 8 refused by the task")

    monkeypatch.setattr(cls, "__init__", reads_a_value)
    probe = _check_pairing("timm:resnet10t", config(images, tmp_path / "b", **opts))
    assert {p.device.type for p in probe.parameters()} == {"cpu"} and built_on == ["meta", "cpu"]
    with pytest.raises(UsageError, match="proj_dim 8 refused by the task"):
        _check_pairing("timm:resnet10t", config(images, tmp_path / "c", **{**opts, "task_options": {"proj_dim": 8}}))


def test_img_per_s_is_measured_over_each_steps_own_time():
    """Issue 13 item 19: a step's images/s comes from its own wall time, however late its
    scalars are read (at a checkpoint two steps are read back to back)."""
    from types import SimpleNamespace

    from sslkit.engine.events import Events
    from sslkit.engine.log import Progress
    from sslkit.engine.step_log import StepLog
    from sslkit.engine.state import RunState

    got = []

    class Record:
        def on_step_end(self, step, metrics):
            got.append((step, metrics["img_per_s"], metrics["loss"]))

    s = SimpleNamespace(step_images=64, schedule=SimpleNamespace(peak_lr=0.1), checkpoint_dir="ckpt", main=True)
    log = StepLog(s, Events([("record", Record())]), Progress("t", 3, 0, enabled=False))

    def scalars(loss: float) -> dict:
        return {"loss": torch.tensor(loss), "stop": torch.tensor(0.0), "requeue": torch.tensor(0.0)}

    for step, seconds, checkpoint in ((1, 0.5, False), (2, 0.25, True), (3, 2.0, True)):
        log.launched(RunState(step, 0, step), 0.1, scalars(float(step)))
        assert not log.read(keep=1)
        log.timed(seconds)
        if checkpoint:
            log.read(keep=0)
    assert got == [(1, 128.0, 1.0), (2, 256.0, 2.0), (3, 32.0, 3.0)]


def test_counted_progress_is_plain_lines_off_a_terminal(capsys):
    from sslkit.progress import counted

    assert list(counted(range(5), 5, "decoding", "img", every_s=0)) == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [f"decoding: {i}/5 img" for i in range(5)]
    assert list(counted(range(3), 3, "decoding", "img", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


SHAPES = '''
import torch
import torch.nn.functional as F

import sslkit
from sslkit_probe import Probe


class VectorLoss(Probe):
    def forward(self, views):
        a, b = views
        return {"loss": 1 - F.cosine_similarity(self.proj(self.encoder(a)), self.proj(self.encoder(b)))}


class VectorMetric(Probe):
    def forward(self, views):
        return {**super().forward(views), "norms": torch.ones(len(views[0]))}


class NumberMetrics(Probe):
    def forward(self, views):
        return {**super().forward(views), "tau": 0.5, "k": 3, "one": torch.ones(1)}


@sslkit.hookimpl
def register_tasks(register):
    register("vecloss", VectorLoss)
    register("vecmetric", VectorMetric)
    register("numbers", NumberMetrics)
'''


def test_forward_outputs_are_checked_at_the_first_step_and_numbers_are_logged(probe, images, tmp_path, cli,
                                                                              monkeypatch):
    """A (B,) loss or metric is one line naming the task; Python numbers and 1-element tensors are logged."""
    install_plugin(tmp_path / "shapes_plugin", "sslkit_shapes", "shapes", SHAPES)
    monkeypatch.syspath_prepend(str(tmp_path / "shapes_plugin"))
    plugins.reset()
    common = ["--data", f"folder:{images}", "--image-size", "16", "--batch-size", "8", "--max-steps", "2",
              "--quiet", "--no-cache", *[a for k, v in {**TINY_VIT, "patch_size": 8}.items()
                                          for a in ("--backbone-opt", f"{k}={v}")]]
    for task, problem in (("vecloss", "returned a loss of shape (8,); it must be a scalar tensor"),
                          ("vecmetric", "returned the metric 'norms' of shape (8,); every value besides 'loss' "
                                        "is one number for metrics.csv: a Python int/float or a 1-element tensor")):
        bad = cli("pretrain", "--task", task, "--out", tmp_path / task, *common)
        assert bad.exit_code == 2, bad.output
        assert bad.stderr.strip().splitlines() == [f"error: task {task!r} (plugin 'shapes') {problem}"]
    ok = cli("pretrain", "--task", "numbers", "--out", tmp_path / "numbers", *common)
    assert ok.exit_code == 0, ok.output
    rows = read_metrics(tmp_path / "numbers")
    assert [(float(r["tau"]), float(r["k"]), float(r["one"])) for r in rows] == [(0.5, 3.0, 1.0)] * 2
