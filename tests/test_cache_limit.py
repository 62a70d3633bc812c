"""The decode limit (--max-pixels) is part of the cache key: files skipped under one limit
are decoded under another, never served stale from the first entry."""

from __future__ import annotations

from PIL import Image

from sslkit.data.pipeline import load_data


def test_a_new_pixel_limit_decodes_what_the_old_one_skipped(tmp_path):
    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (40, 40), 10 * i).save(root / f"big{i}.png")  # 1,600 pixels
        Image.new("L", (20, 20), 10 * i).save(root / f"small{i}.png")  # 400 pixels
    cache = tmp_path / "cache"
    data = f"folder:{tmp_path / 'imgs'}"
    small = load_data(data, 16, cache_dir=cache, progress=False, max_pixels=1000, workers=1)
    assert len(small.prepared) == 3
    assert sorted(p for p, _ in small.prepared.skipped) == [f"a/big{i}.png" for i in range(3)]
    unlimited = load_data(data, 16, cache_dir=cache, progress=False, max_pixels=0, workers=1)
    assert len(unlimited.prepared) == 6 and unlimited.prepared.skipped == []
    assert unlimited.prepared.cache_path != small.prepared.cache_path
    again = load_data(data, 16, cache_dir=cache, progress=False, max_pixels=1000, workers=1)
    assert again.prepared.cache_path == small.prepared.cache_path  # each limit's entry is reused
