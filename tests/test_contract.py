"""Registry-wide contract: every registered task trains through the engine.

Parametrized over ``list_tasks()``, so a task added by any plugin is tested for free:
2 optimizer steps on tiny generated data, 1- and 3-channel, with the task's default
backbone; the loss is finite and the saved encoder reloads and embeds.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from sslkit import registry
from sslkit.engine import pretrain
from sslkit.run import RunConfig, load_run
from tests.conftest import make_images

SIZE = 64


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    return {c: make_images(root / f"c{c}", n_per_class=8, size=SIZE, channels=c) for c in (1, 3)}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("task", registry.list_tasks())
def test_task_trains_two_steps(task, channels, datasets, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "run"
    cfg = RunConfig(task=task, data=f"folder:{datasets[channels]}", out=str(out), epochs=1, batch_size=8,
                    image_size=SIZE, max_steps=2, progress=False, channels=channels)
    summary = pretrain(cfg)
    assert summary["steps"] == 2
    with open(out / "metrics.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    run = load_run(out)
    assert run.info["status"] == "finished" and run.spec.channels == channels
    encoder = run.build_encoder()
    with torch.no_grad():
        emb = encoder(torch.randn(2, channels, SIZE, SIZE))
    assert emb.shape == (2, run.info["embedding_dim"])
