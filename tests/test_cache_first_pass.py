"""The first pass (index + decode + cache write): the same pixels as before, faster, and
nothing left behind by a killed one.

What made it fast is checked for being the same arithmetic: the numpy windowing against
pydicom's ``apply_windowing`` (bit-equal), the numpy resize and resampling against torch's
``F.interpolate``; and decode workers are checked to import no torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydicom.pixels import apply_windowing

from sslkit.data.cache import STALE_TMP_S, hold_fill_lock, remove_stale
from sslkit.data.digest import content_digest
from sslkit.data.pipeline import load_data
from sslkit.data.prepare import resize_square
from sslkit.data.volume import resample
from sslkit_plugins.sources.dicom_window import _unit, _voi_module, linear_window
from tests.conftest import REPO
from tests.dicom_factory import write_dicom


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT"])
def test_linear_window_is_bit_equal_to_pydicom(function):
    rng = np.random.default_rng(0)
    for width, level in [(400, 40), (1500, -600), (1, 0), (2.5, 0.3), (4096, 2048)]:
        values = np.concatenate([rng.normal(level, width, 20000), np.linspace(level - width, level + width, 2001),
                                 [np.nan, np.inf, -np.inf, level - width / 2, level + width / 2]]).astype(np.float32)
        want = _unit(apply_windowing(values, _voi_module(width, level, function)).astype(np.float32) / 65535.0)
        got = linear_window(values, width, level, function)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape,size", [((1, 512, 512), 224), ((3, 300, 500), 224), ((1, 40, 50), 224),
                                        ((2, 3000, 200), 64), ((1, 7, 9), 3)])
def test_numpy_resize_equals_torch_antialiased_bilinear(shape, size):
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    c, h, w = shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    t = F.interpolate(torch.from_numpy(x)[None], size=(nh, nw), mode="bilinear", antialias=True,
                      align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    want = t[:, top:top + size, left:left + size].numpy()
    got = resize_square(x, size)
    assert got.shape == want.shape == (c, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape,spacing,target", [((1, 48, 128, 128), (2.5, 0.8, 0.8), (2.0, 2.0, 2.0)),
                                                  ((2, 10, 20, 30), (1.0, 1.0, 1.0), (2.0, 0.5, 4.0))])
def test_numpy_resample_equals_torch_trilinear(shape, spacing, target):
    x = np.random.default_rng(2).random(shape, dtype=np.float32)
    new = tuple(max(1, round(n * s / t)) for n, s, t in zip(shape[1:], spacing, target))
    want = F.interpolate(torch.from_numpy(x)[None], size=new, mode="trilinear", align_corners=False)[0].numpy()
    got = resample(x, spacing, target)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_decode_workers_import_no_torch():
    """What a spawned decode worker imports (the worker functions, the dicom source it
    unpickles) pulls in neither torch nor anything that imports it."""
    code = ("import sys; import sslkit.data.prepare, sslkit.data.volume; "
            "import sslkit_plugins.sources.dicom, sslkit_plugins.sources.nifti; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_content_digest_rereads_a_rewritten_file(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 10000)
    first = content_digest(str(f))
    st = f.stat()
    f.write_bytes(b"y" * 10000)  # same size; mtime put back: the ctime still changes
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_digest(str(f)) != first


def _folder(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        write_dicom(root / f"p{i}.dcm", (rng.random((24, 24)) * 3000).astype(np.uint16), patient_id=f"P{i}",
                    modality="CT", slope=1.0, intercept=-1024.0)
    return root


_KILLED = """
import sys, time
from pathlib import Path
import sslkit.data.prepare as prepare
def stuck(*args, **kwargs):
    Path(sys.argv[2]).write_text("filling")
    time.sleep(600)
prepare._decode = stuck
from sslkit_plugins.sources.dicom import DicomSource
source = DicomSource(sys.argv[1])
prepare.prepare(source, source.index(), 1, 16, cache_dir=sys.argv[3], progress=False)
"""


def test_first_pass_killed_leaves_tmp_the_next_run_removes(tmp_path):
    data, cache, flag = _folder(tmp_path / "scans"), tmp_path / "cache", tmp_path / "filling"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(data), str(flag), str(cache)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first pass never started decoding"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert len(left) == 1 and (cache / left[0] / "pixels.npy").exists()  # what SIGKILL leaves
    loaded = load_data(f"dicom:{data}", 16, cache_dir=cache, progress=False)
    assert len(loaded.prepared) == 4
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert not list((cache / "headers").glob(".tmp-*"))


def test_remove_stale_keeps_what_a_live_process_is_filling(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    live = root / ".tmp-live"
    live.mkdir()
    fd = hold_fill_lock(live)  # another open file description: as another process holding it
    try:
        (root / "headers").mkdir()
        fresh, old = root / "headers" / ".tmp-fresh.json", root / "headers" / ".tmp-old.json"
        fresh.write_text("{}")
        old.write_text("{}")
        os.utime(old, (time.time() - STALE_TMP_S - 60,) * 2)
        no_lock = root / ".tmp-new"
        no_lock.mkdir()  # just created, its lock not yet taken: young, so kept
        assert remove_stale(root) == [".tmp-old.json"]
        assert live.is_dir() and no_lock.is_dir() and fresh.exists()
    finally:
        os.close(fd)
    assert remove_stale(root) == [".tmp-live"]  # the lock is free: its owner is gone


# a user's script without the ``if __name__ == "__main__":`` guard: each spawned decode worker re-imports it
_UNGUARDED = """
import sys
import torch
import sslkit.data.prepare as prepare
prepare.pool_size = lambda count, workers, **kw: 3  # two decode workers, however small the data
prepare.PROBE_S = prepare.POOL_PAYOFF_S = 0.0
from sslkit.config import resolve
from sslkit.engine import build
cfg = resolve(dict(task="simclr", data=f"folder:{sys.argv[1]}", out=sys.argv[2], backbone="timm:resnet10t",
                   batch_size=4, image_size=16, epochs=1, progress=False, device="cpu", cache_dir=sys.argv[3]))
print("samples", len(build(cfg, torch.device("cpu")).data.prepared))
"""


def test_an_unguarded_script_is_not_rerun_by_a_decode_worker(tmp_path):
    """The spawned worker re-imported the script, which started a second run there: it waited for the
    parent's cache lock while the parent waited for it, forever. Now the workers stop, the first of them
    in one line (not one line per worker), and the parent decodes their shares."""
    from sslkit.data.parallel import RERUN_SCRIPT
    from tests.conftest import make_images

    script = tmp_path / "train.py"
    script.write_text(_UNGUARDED)
    images = make_images(tmp_path / "img", n_per_class=8, size=20)
    proc = subprocess.run([sys.executable, str(script), str(images), str(tmp_path / "run"), str(tmp_path / "cache")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["samples", "16"]
    assert proc.stderr.count(RERUN_SCRIPT) == 1, proc.stderr[-3000:]


def test_the_workers_shared_mark_lasts_as_long_as_their_pass():
    from sslkit.data.parallel import RERUN_SAID, spawned_workers

    assert RERUN_SAID not in os.environ
    with spawned_workers():
        mark = Path(os.environ[RERUN_SAID])
        assert mark.parent.is_dir() and not mark.exists()  # no worker has said it yet
    assert RERUN_SAID not in os.environ and not mark.parent.exists()


def test_without_a_temporary_folder_the_workers_still_run(monkeypatch):
    import errno
    import tempfile

    from sslkit.data.parallel import RERUN_SAID, parallel_map, spawned_workers

    def refused(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with spawned_workers():
        assert RERUN_SAID not in os.environ  # each worker would say it: no mark to share
    assert parallel_map(abs, [-3, 2, -1] * 2, workers=2, min_parallel=1) == [3, 2, 1] * 2
