"""--cache-size: pixels stored once at one size serve runs at several image sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sslkit.engine import pretrain
from sslkit.errors import UsageError
from sslkit.run import RunConfig
from tests.conftest import make_images


def _entries(cache):
    return sorted(p for p in cache.iterdir() if (p / "pixels.npy").exists())


def test_one_cache_serves_two_image_sizes(tmp_path):
    data = make_images(tmp_path / "imgs", n_per_class=8, size=40)
    cache = tmp_path / "cache"
    base = dict(task="simclr", data=f"folder:{data}", epochs=1, batch_size=8, max_steps=2, progress=False,
                cache_dir=str(cache), cache_size=32, backbone="timm:resnet10t")
    pretrain(RunConfig(out=str(tmp_path / "a"), image_size=32, **base))
    entries = _entries(cache)
    assert len(entries) == 1
    assert np.load(entries[0] / "pixels.npy", mmap_mode="r").shape[1:] == (3, 32, 32)
    before = (entries[0] / "pixels.npy").stat().st_mtime_ns
    pretrain(RunConfig(out=str(tmp_path / "b"), image_size=16, **base))
    assert _entries(cache) == entries and (entries[0] / "pixels.npy").stat().st_mtime_ns == before
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["input_spec"]["image_size"] == 16 and info["summary"]["steps"] == 2


def test_cache_size_below_image_size_is_refused(tmp_path):
    data = make_images(tmp_path / "imgs", n_per_class=2, size=40)
    with pytest.raises(UsageError, match="--cache-size 16 is below --image-size 32"):
        pretrain(RunConfig(task="simclr", data=f"folder:{data}", out=str(tmp_path / "r"), image_size=32,
                           cache_size=16, progress=False))
    assert not (tmp_path / "r").exists()
