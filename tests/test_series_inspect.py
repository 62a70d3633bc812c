"""``sslkit data inspect`` in slab and volume mode: the cache estimate is per slab / per volume."""

from __future__ import annotations

from sslkit.data.inspect import format_report, inspect_data
from tests.test_series import WINDOW, write_series


def test_inspect_estimates_the_cache_of_volumes_and_slabs(tmp_path):
    write_series(tmp_path / "a", n=5)  # 5 slices of 6 x 5
    write_series(tmp_path / "b", n=3, seed=1)
    opts = {"window": WINDOW, "workers": 1}
    rep = inspect_data(f"dicom:{tmp_path}", {**opts, "sample": "volume", "volume_size": "4,6,5"}, decode=False)
    est = rep["estimated_bytes"]
    assert rep["images"] == 2 and est["stored_shape"] == [1, 4, 6, 5] and est["sample"] == "volume"
    assert est["cache_at_image_size"] == 2 * (1 * 4 * 6 * 5 * 2)  # D*H*W*C*2 bytes per series
    assert est["decoded_full_resolution_float32"] == (5 + 3) * 6 * 5 * 4  # every slice of each series
    assert rep["counts"]["depth"] == {"5": 1, "3": 1}
    assert "cached at 4x6x5 voxels x 1 channel(s) per volume" in format_report(rep)

    rep = inspect_data(f"dicom:{tmp_path}", {**opts, "sample": "slab:3"}, decode=False, image_size=32)
    est = rep["estimated_bytes"]
    assert rep["images"] == 8 and rep["channels"] == 3 and est["stored_shape"] == [3, 32, 32]
    assert est["cache_at_image_size"] == 8 * (3 * 32 * 32 * 2)  # K slices as channels, per slice
    assert "32 px x 3 channel(s) (slab:3: slices as channels)" in format_report(rep)

    rep = inspect_data(f"dicom:{tmp_path}", opts, decode=False, image_size=32)  # 2D: as before
    assert rep["estimated_bytes"]["cache_at_image_size"] == 8 * 32 * 32 * 2
