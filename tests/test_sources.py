"""Non-DICOM sources: 16-bit PNG/TIFF stay 16-bit; npz arrays in the MedMNIST layout."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from sslkit.data.pipeline import load_data
from sslkit.errors import UsageError
from sslkit.registry import create_source, resolve_data


def _dark16(h=20, w=24):
    return (np.arange(h * w).reshape(h, w) % 200).astype(np.uint16)  # max 199: looks 8-bit, is not


def test_16bit_png_and_tiff_keep_16_bits(tmp_path):
    a = _dark16()
    Image.fromarray(a).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", a)
    rgb = np.stack([a, a * 300, 65535 - a], -1).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c.tiff", rgb, photometric="rgb")
    src = create_source(f"folder:{tmp_path}")
    out = {r.path.rsplit("/", 1)[-1]: src.load(r) for r in src.index()}
    np.testing.assert_array_equal(out["a.png"][0], a / np.float32(65535))
    np.testing.assert_array_equal(out["b.tif"][0], a / np.float32(65535))
    assert out["c.tiff"].shape == (3, 20, 24)
    np.testing.assert_allclose(out["c.tiff"], rgb.transpose(2, 0, 1) / 65535.0, atol=1e-7)
    # and through the uint16 pipeline array: values survive to within half a 16-bit step
    data = load_data(f"folder:{tmp_path}", 20, channels=1, cache_dir=False, progress=False)
    assert data.prepared.pixels.dtype == np.uint16


def _medmnist(path, n=12, size=16, rgb=False):
    rng = np.random.default_rng(0)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    np.savez(path, train_images=rng.integers(0, 256, shape, dtype=np.uint8),
             train_labels=rng.integers(0, 4, (n, 1)), val_images=rng.integers(0, 256, (4, size, size), dtype=np.uint8),
             val_labels=np.zeros((4, 1), int))
    return path


def test_npz_medmnist_layout(tmp_path):
    f = _medmnist(tmp_path / "pneumoniamnist.npz")
    with np.load(f) as z:
        images, labels = z["train_images"], z["train_labels"]
    src = create_source(f"npz:{f}")
    refs = src.index()
    assert len(refs) == 12 and [r.label for r in refs] == [str(int(v)) for v in labels[:, 0]]
    np.testing.assert_array_equal(src.load(refs[5])[0], images[5] / np.float32(255))
    assert len({r.group for r in refs}) == 12
    assert len(create_source(f"npz:{f}", split="val").index()) == 4
    assert resolve_data(str(f)) == ("npz", str(f))  # a bare .npz path is recognised
    rgb = create_source(f"npz:{_medmnist(tmp_path / 'rgb.npz', rgb=True)}")
    assert rgb.load(rgb.index()[0]).shape == (3, 16, 16) and rgb.channels_of(rgb.index()[0]) == 3
    data = load_data(f"npz:{f}", 16, cache_dir=False, progress=False)
    np.testing.assert_array_equal(np.asarray(data.prepared.pixels[3, 0]), images[3].astype(np.uint16) * 257)


def test_npz_user_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        create_source(f"npz:{tmp_path / 'missing.npz'}")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable"):
        create_source(f"npz:{tmp_path / 'bad.npz'}")
    f = _medmnist(tmp_path / "m.npz")
    with pytest.raises(UsageError, match="no 'test_images'"):
        create_source(f"npz:{f}", split="test")
