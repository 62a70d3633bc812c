"""Fault audit 41: a run folder a failed first write leaves stays usable; nibabel's and Pillow's silent
or raw reports become sslkit's own one-line reasons; names printed escaped; the right cause named."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslkit import output_file
from sslkit.data.walk import walk_files
from sslkit.errors import UsageError
from sslkit.output_file import check_output
from tests.conftest import make_images, tiny_run


TRAIN = ("--task", "simclr", "--backbone", "timm:resnet10t", "--image-size", "32", "--batch-size", "8",
         "--max-steps", "1", "--epochs", "1", "--device", "cpu", "--no-cache", "--quiet")


def _limited(limit: int):
    """A child's ``preexec_fn``: files it writes stop at ``limit`` bytes (EFBIG, not a SIGXFSZ kill)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_size_limit_before_run_json_leaves_a_folder_the_same_command_reruns_in(tmp_path, cli):
    data, out = make_images(tmp_path / "data", n_per_class=4), tmp_path / "run"
    exe = Path(sys.executable).parent / "sslkit"
    # 3 KiB: the lock fits, run.json (about 5 KiB, written first) does not, so only the lock stays (before, the
    # data_report.json written first stayed too, and the folder was refused as not an sslkit run for good)
    failed = subprocess.run([str(exe), "pretrain", "--data", str(data), "--out", str(out), *TRAIN],
                            capture_output=True, text=True, timeout=600, preexec_fn=_limited(3072),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: cannot write '{out}/")
    assert "File too large" in failed.stderr and "Traceback" not in failed.stderr
    again = cli("pretrain", "--data", data, "--out", out, *TRAIN)  # the requeued job, the same command
    assert again.exit_code == 0, again.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_full_disk_after_run_json_leaves_a_failed_run_that_resume_auto_takes(tmp_path, cli, monkeypatch):
    data, out = make_images(tmp_path / "data", n_per_class=4), tmp_path / "run"
    real = output_file.write_atomic

    def full_at_config(target, write, *args, **kwargs):
        def no_space(tmp):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, no_space if Path(target).name == "config.toml" else write, *args, **kwargs)

    monkeypatch.setattr(output_file, "write_atomic", full_at_config)
    failed = cli("pretrain", "--data", data, "--out", out, *TRAIN)
    assert failed.exit_code == 2
    assert failed.stderr.strip() == f"error: cannot write {str(out / 'config.toml')!r}: No space left on device"
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(output_file, "write_atomic", real)  # space freed
    again = cli("pretrain", "--data", data, "--out", out, "--resume", "auto", *TRAIN)
    assert again.exit_code == 0, again.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert (out / "config.toml").is_file() and (out / "encoder.safetensors").is_file()


def _nifti(folder: Path) -> Path:
    """ok.nii, and copies whose header has a 0 and a negative pixdim, or a NaN sform."""
    nib = pytest.importorskip("nibabel")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((16, 16, 4)).astype(np.float32), np.eye(4)), folder / "ok.nii")
    raw = (folder / "ok.nii").read_bytes()

    def patched(name: str, at: int, fmt: str, *values: float) -> None:
        b = bytearray(raw)
        b[at:at + struct.calcsize(fmt)] = struct.pack(fmt, *values)
        (folder / name).write_bytes(bytes(b))

    patched("zeropix.nii", 76, "<8f", 1, 1.0, 0.0, 1, 1, 1, 1, 1)  # pixdim
    patched("negpix.nii", 76, "<8f", 1, -1.0, 1, 1, 1, 1, 1, 1)
    patched("nansform.nii", 280, "<4f", float("nan"), 0, 0, 0)  # srow_x (sform_code is 1: the sform is used)
    return folder


NAN_REASON = "unreadable NIfTI header: its affine (sform, else qform) holds NaN or infinite values: no geometry"


def test_nifti_header_fixes_and_a_nan_sform_print_nothing_raw(tmp_path):
    from sslkit_plugins.sources.nifti import NiftiSource

    folder = _nifti(tmp_path / "vols")
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())
    logging.getLogger("nibabel.global").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            src = NiftiSource(str(folder))
            refs = src.index()
            slices = [src.load(ref) for ref in refs]
    finally:
        logging.getLogger("nibabel.global").removeHandler(handler)
    assert heard == [] and [str(w.message) for w in caught] == []
    assert src.skipped == [(str(folder / "nansform.nii"), NAN_REASON)]
    assert len(refs) == 12 and all(s.shape == (1, 16, 16) for s in slices)  # the others are fine: 4 slices each


def test_nifti_data_inspect_stderr_is_sslkits_own(tmp_path):
    from tests.conftest import run_sslkit

    folder = _nifti(tmp_path / "vols")
    result = run_sslkit("data", "inspect", folder, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "pixdim" not in result.stderr and "Warning" not in result.stderr
    assert f"  nansform.nii [file:" in result.stdout and result.stdout.count(NAN_REASON) == 1


def _lying_jpeg(path: Path, side: int = 13000, sof: int = 0xC0) -> Path:
    """A 16x16 JPEG whose frame header says ``side`` x ``side`` (and start-of-frame marker ``sof``)."""
    b = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(b, "JPEG")
    j = bytearray(b.getvalue())
    k = j.find(b"\xff\xc0")
    j[k + 1] = sof
    j[k + 5:k + 9] = struct.pack(">HH", side, side)
    path.write_bytes(bytes(j))
    return path


def test_a_jpeg_whose_header_lies_about_its_size_is_skipped_as_truncated(tmp_path, cli):
    from sslkit.api import Undecodable
    from sslkit_plugins.sources.folder import FolderSource

    data = make_images(tmp_path / "data", n_per_class=2)
    _lying_jpeg(data / "a" / "lie.jpg")
    src = FolderSource(str(data))
    lie = next(r for r in src.index() if r.path.endswith("lie.jpg"))
    with pytest.raises(Undecodable) as why:
        src.load(lie)
    assert str(why.value) == ("image file is truncated: a 13000x13000 JPEG needs at least 330,078 bytes of data; "
                              f"the file has {(data / 'a' / 'lie.jpg').stat().st_size:,}")
    report = cli("data", "inspect", data)
    assert report.exit_code == 0 and "lie.jpg [file:" in report.stdout
    assert "image file is truncated: a 13000x13000 JPEG" in report.stdout


def test_small_and_flat_progressive_jpegs_still_decode(tmp_path):
    """The bound is one bit an 8x8 block: the flattest legal Huffman JPEGs stay above it."""
    from sslkit_plugins.sources.folder_decode import _sof_marker, check_jpeg_holds, open_image, pil_pixels

    for name, side, options in (("flat.jpg", 2048, {"progressive": True, "optimize": True, "quality": 1}),
                                ("tiny.jpg", 8, {}), ("base.jpg", 1024, {"optimize": True, "quality": 1})):
        Image.new("L", (side, side), 0).save(tmp_path / name, "JPEG", **options)
        with open_image(str(tmp_path / name)) as img:
            x = pil_pixels(img, side=None)
        assert x.shape == (1, side, side) and float(x.max()) < 0.01  # black, within JPEG's rounding
    arithmetic = _lying_jpeg(tmp_path / "arith.jpg", sof=0xC9)  # arithmetic coding: no bound, not refused
    with open_image(str(arithmetic)) as img:
        where = img.fp.tell()
        assert _sof_marker(img.fp) == 0xC9 and img.fp.tell() == where
        check_jpeg_holds(img)  # no Undecodable
    with open_image(str(_lying_jpeg(tmp_path / "huff.jpg"))) as img:
        assert _sof_marker(img.fp) == 0xC0
        with pytest.raises(ValueError, match="^image file is truncated"):
            check_jpeg_holds(img)
    # fill bytes (0xFF) before a marker, which the standard allows: the marker behind them is read
    for sof in (0xC9, 0xC0):
        j = bytearray(_lying_jpeg(tmp_path / "fill.jpg", side=4096, sof=sof).read_bytes())
        k = j.find(bytes([0xFF, sof]))
        (tmp_path / "fill.jpg").write_bytes(bytes(j[:k] + b"\xff\xff" + j[k:]))
        with open_image(str(tmp_path / "fill.jpg")) as img:
            assert img.size == (4096, 4096) and _sof_marker(img.fp) == sof


@pytest.fixture(scope="module")
def named_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("named")
    for split in ("train", "test"):
        make_images(root / split, n_per_class=4, classes=("ok", "two\nlines"), seed=len(split))
    tiny_run(str(root / "train"), root / "run")
    return root


def test_eval_prints_a_class_name_with_a_newline_escaped(named_run, cli):
    r = named_run
    result = cli("eval", "knn", r / "run", "--train", r / "train", "--test", r / "test", "--k", "3", "--quiet")
    assert result.exit_code == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("  classes:"))
    assert line == "  classes: ok, two\\nlines; positive class 'two\\nlines' (AUROC)"
    assert "two\nlines" not in result.stdout


def test_an_output_below_a_file_names_the_file_as_pretrain_does(named_run, cli, tmp_path):
    r = named_run
    user = tmp_path / "user.onnx"
    user.write_bytes(b"mine")
    export = cli("export", r / "run", "--out", user / "x.onnx")
    assert export.exit_code == 2
    assert export.stderr.strip() == f"error: --out {str(user / 'x.onnx')!r}: {str(user)!r} is a file, not a folder"
    curve = cli("eval", "curve", r / "run", "--train", r / "train", "--test", r / "test",
                "--out", r / "run" / "run.json" / "x.png", "--quiet")
    assert curve.exit_code == 2
    assert curve.stderr.strip() == (f"error: --out {str(r / 'run' / 'run.json' / 'x.png')!r}: "
                                    f"{str(r / 'run' / 'run.json')!r} is a file, not a folder")
    pretrain = cli("pretrain", "--data", r / "train", "--out", user / "run", *TRAIN)
    assert pretrain.stderr.strip() == f"error: --out {str(user / 'run')!r}: {str(user)!r} is a file, not a folder"
    assert user.read_bytes() == b"mine"
    with pytest.raises(UsageError, match="^output folder '.*missing' does not exist$"):
        check_output(tmp_path / "missing" / "x.png", False)  # a folder that is only missing: said so


def test_a_symbolic_link_loop_is_reported_as_a_loop_not_as_dangling(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x")
    os.symlink("y.png", tmp_path / "x.png")
    os.symlink("x.png", tmp_path / "y.png")
    os.symlink("gone.png", tmp_path / "z.png")
    skipped: list[tuple[str, str]] = []
    files = walk_files(tmp_path, lambda p: p.suffix == ".png", skipped)
    assert files == [tmp_path / "ok.png"]
    assert sorted(skipped) == [(str(tmp_path / "x.png"), "symbolic link loop"),
                               (str(tmp_path / "y.png"), "symbolic link loop"),
                               (str(tmp_path / "z.png"), "dangling symbolic link")]


def test_a_nifti_slope_past_float32_warns_nothing_raw(tmp_path):
    """``scl_slope`` 1e37 on int16 voxels: numpy's cast to float32 overflows to inf, which sslkit handles as
    any inf; its RuntimeWarning ("overflow encountered in cast") stays off stderr."""
    import nibabel as nib

    from sslkit_plugins.sources.nifti import NiftiSource

    (tmp_path / "v").mkdir()
    img = nib.Nifti1Image(np.arange(16 * 16 * 4, dtype=np.int16).reshape(16, 16, 4), np.eye(4))
    img.header.set_slope_inter(1e37, 0)
    nib.save(img, tmp_path / "v" / "slope.nii")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = NiftiSource(str(tmp_path / "v"))
        for ref in src.index():
            try:
                src.load(ref)
            except ValueError:  # Undecodable too: a skip with its reason is fine, a raw warning is not
                pass
    assert [str(w.message) for w in caught] == []
