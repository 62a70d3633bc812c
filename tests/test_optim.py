"""Schedule values, the LR scaling rule, weight-decay groups, LARS against its equations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslkit.errors import UsageError
from sslkit.optim import LARS, build_optimizer, param_groups, scaled_lr, warmup_cosine


def test_warmup_cosine_values():
    total, warmup = 100, 10
    assert warmup_cosine(0, total, warmup) == pytest.approx(0.1)
    assert warmup_cosine(4, total, warmup) == pytest.approx(0.5)
    assert warmup_cosine(9, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warmup) == pytest.approx(1.0)  # cosine starts at its peak
    assert warmup_cosine(55, total, warmup) == pytest.approx(0.5)  # half-way through the decay
    assert warmup_cosine(40, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert warmup_cosine(100, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, 10, 0) == 1.0
    values = [warmup_cosine(s, total, warmup) for s in range(total)]
    assert values[:10] == sorted(values[:10]) and values[10:] == sorted(values[10:], reverse=True)


def test_lr_scaling_rule():
    assert scaled_lr(1e-3, 256, "linear") == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 1024, "linear") == pytest.approx(4e-3)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(0.3)  # SimCLR's LARS rule
    assert scaled_lr(0.5, 4096, "none") == 0.5
    with pytest.raises(UsageError, match="scaling rule"):
        scaled_lr(1e-3, 256, "cubic")


def test_effective_lr_uses_the_accumulated_batch():
    from sslkit.run import RunConfig

    cfg = RunConfig(task="t", data="d", out="o", batch_size=64, accumulate=4, base_lr=1e-3)
    assert cfg.effective_batch == 256 and cfg.effective_lr == pytest.approx(1e-3)
    assert RunConfig(task="t", data="d", out="o", lr=0.2, batch_size=64).effective_lr == 0.2
    with pytest.raises(UsageError, match="accumulate"):
        RunConfig(task="t", data="d", out="o", accumulate=0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.ln = nn.LayerNorm(2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 2))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 2))


def test_no_weight_decay_on_norms_biases_and_tokens():
    net = Net()
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"conv.weight", "fc.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "conv.bias", "bn.weight", "bn.bias", "fc.bias", "ln.weight", "ln.bias", "cls_token", "pos_embed"}
    for name in ("adamw", "sgd", "lars"):
        opt = build_optimizer(net, name, 0.1, 0.05)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    with pytest.raises(UsageError, match="unknown optimizer"):
        build_optimizer(net, "adam9", 0.1, 0.0)


def test_lars_matches_its_equations():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(torch.randn(5))
    lr, wd, m, eta = 0.5, 1e-2, 0.9, 1e-3
    opt = LARS([{"params": [w], "weight_decay": wd, "lars_exclude": False},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=lr, momentum=m, eta=eta)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    vw, vb = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for step in range(3):
        gw, gb = torch.randn(5, 3), torch.randn(5)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        assert torch.equal(w.grad, gw) and torch.equal(b.grad, gb)  # the gradients are left as they were
        u = gw + wd * w_ref
        u = u * (eta * w_ref.norm() / u.norm())
        vw = u if step == 0 else m * vw + u
        vb = gb if step == 0 else m * vb + gb  # excluded: no decay, no trust ratio
        w_ref, b_ref = w_ref - lr * vw, b_ref - lr * vb
        torch.testing.assert_close(w.detach(), w_ref)
        torch.testing.assert_close(b.detach(), b_ref)


def test_schedule_choices():
    """--schedule: warm-up then cosine (the optimizer's warmup_cosine), constant, or x0.1 at 60 % and 80 %."""
    from sslkit.engine.schedules import Schedule, horizon, make_schedule

    cosine = make_schedule("cosine", 0.5, 110, warmup_epochs=1, steps_per_epoch=10)
    assert cosine.warmup == 10 and [cosine.lr_at(k) for k in (0, 40, 109)] == pytest.approx(
        [0.5 * warmup_cosine(k, 110, 10) for k in (0, 40, 109)])
    constant = Schedule("constant", 0.5, 110, 10)
    assert constant.lr_at(4) == pytest.approx(0.25) and constant.lr_at(10) == constant.lr_at(109) == 0.5
    step = Schedule("step", 1.0, 110, 10)  # milestones at 10 + 60 and 10 + 80
    assert [step.lr_at(k) for k in (9, 69, 70, 89, 90, 109)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(UsageError, match="unknown --schedule 'linear'"):
        Schedule("linear", 1.0, 10, 0)
    assert horizon(None, 200, 12) == (200, "max_steps")  # --max-steps alone sets the length
    assert horizon(10, None, 12) == (120, "epochs")
    assert horizon(10, 200, 12) == (120, "epochs") and horizon(10, 100, 12) == (100, "max_steps")
