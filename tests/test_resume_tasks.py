"""Registry-wide: every task resumes exactly (EMA teachers, queues, centres, RNG included).

In-process: a run is interrupted with SIGINT (sent to this process from a watcher thread
once it has logged a few steps), resumed, and its per-step losses compared with an
uninterrupted run. moco (EMA teacher + queue) runs by default; the rest are marked slow.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from sslkit.registry import get_task, list_tasks
from tests.conftest import make_images

DEFAULT = {"moco"}  # teacher EMA + negative queue: state beyond the weights; the rest are slow
TASKS = list_tasks()
IMAGE_SIZE = {"jigsaw": 64}  # tasks that need larger images than the default 16 px


def rows(run: Path) -> list[tuple[str, str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


def config(task: str, images: Path, out: Path, **kw):
    from sslkit.run import RunConfig

    vit = "vit" in get_task(task).default_backbone
    backbone = {"backbone": "timm:vit_tiny_patch16_224", "backbone_options": {"depth": 2, "patch_size": 4}} if vit \
        else {"backbone": "timm:resnet10t"}
    return RunConfig(task=task, data=f"folder:{images}", out=str(out), image_size=IMAGE_SIZE.get(task, 16), batch_size=8, epochs=2,
                     checkpoint_every=1, seed=1, deterministic=True, progress=False, warmup_epochs=0.5,
                     cache_dir="", **backbone, **kw)


def interrupt_after(metrics: Path, n_rows: int) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) - 1 >= n_rows:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("task", [t if t in DEFAULT else pytest.param(t, marks=pytest.mark.slow) for t in TASKS])
def test_every_task_resumes_exactly(task, tmp_path):
    from sslkit.engine import pretrain

    images = make_images(tmp_path / "img", n_per_class=12, size=IMAGE_SIZE.get(task, 16) + 4)  # 24 images: 3 steps per epoch, 6 in all
    ref = pretrain(config(task, images, tmp_path / "ref"))
    assert ref["steps"] == 6

    out = tmp_path / "run"
    watcher = interrupt_after(out / "metrics.csv", 2)
    first = pretrain(config(task, images, out))
    watcher.join()
    assert first["interrupted"] and 2 <= first["steps"] < 6, first
    second = pretrain(config(task, images, out, resume=True))
    assert second["steps"] == 6 and not second["interrupted"]
    assert rows(out) == rows(tmp_path / "ref")
