"""The npz source on hostile and unusual files (an audit's cases): each is one error line
(exit 2), an image skipped with its reason in data_report.json, or labels ignored with a
note; nothing is unpickled, no header is trusted for an allocation, and good arrays load
with exactly the values they had before these checks."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import sslkit_plugins.sources.npz as npz_mod
from sslkit.api import Undecodable, UsageError
from sslkit.data.pipeline import load_data
from sslkit.registry import create_source
from sslkit.pseudonym import file_key
from tests.conftest import one_line_error


def _inspect(cli, path, *extra):
    return cli("data", "inspect", f"npz:{path}", "--image-size", "16", *extra)


def _header(shape, descr="|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _images(n=6, size=12, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, 200, (n, size, size)).astype(dtype)


# --- 1: one line instead of a traceback ---------------------------------------------------------
def test_object_arrays_are_refused_unread(tmp_path, cli):
    """Images or a .npy holding Python objects: one line, and the pickle is never run."""
    marker = tmp_path / "unpickled"

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))

    np.savez(tmp_path / "obj.npz", train_images=np.array([Touch()] * 2, dtype=object))
    np.save(tmp_path / "obj.npy", np.array([Touch()], dtype=object), allow_pickle=True)
    for f in ("obj.npz", "obj.npy"):
        one_line_error(_inspect(cli, tmp_path / f), "holds Python objects (dtype object)", "never unpickled")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["stored", "deflated", "npy"])
def test_a_header_declaring_more_than_the_file_holds_is_one_line(tmp_path, cli, kind):
    """3.7 TB declared, 100 bytes present: refused from the header, nothing allocated."""
    data = _header((10**9, 64, 64)) + bytes(100)
    f = tmp_path / ("short.npy" if kind == "npy" else "short.npz")
    if kind == "npy":
        f.write_bytes(data)
    else:
        compression = zipfile.ZIP_STORED if kind == "stored" else zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(f, "w", compression) as z:
            z.writestr("train_images.npy", data)
    one_line_error(_inspect(cli, f), "declares (1000000000, 64, 64) uint8 (3.7 TiB)", "holds 100 B of it",
                    "truncated or damaged")


def test_empty_unreadable_and_folder_paths_are_one_line(tmp_path, cli):
    (tmp_path / "empty.npz").write_bytes(b"")
    one_line_error(_inspect(cli, tmp_path / "empty.npz"), "is empty (0 bytes)")  # was 'aborted', exit 130
    (tmp_path / "text.npz").write_text("not a zip")
    one_line_error(_inspect(cli, tmp_path / "text.npz"), "not a readable .npz or .npy file")
    (tmp_path / "dir.npz").mkdir()
    one_line_error(_inspect(cli, tmp_path / "dir.npz"), "is a folder; give one .npz or .npy file")
    with zipfile.ZipFile(tmp_path / "junk.npz", "w") as z:
        z.writestr("train_images.npy", b"\x93NUMPY\x01\x00garbage")
    one_line_error(_inspect(cli, tmp_path / "junk.npz"), "train_images in", "is not a readable .npy array")
    np.savez(tmp_path / "cplx.npz", train_images=_images().astype(np.complex64))
    one_line_error(_inspect(cli, tmp_path / "cplx.npz"), "dtype complex64; images must be integers, floats")
    np.savez(tmp_path / "thin.npz", train_images=np.zeros((4, 1, 40), np.uint8))
    one_line_error(_inspect(cli, tmp_path / "thin.npz"), "images of 40x1 pixels; at least 2x2 needed")


def test_a_plain_npy_is_read_memory_mapped(tmp_path, cli):
    a = _images(5, 10)
    np.save(tmp_path / "plain.npy", a)
    src = create_source(f"npz:{tmp_path / 'plain.npy'}")
    refs = src.index()
    assert len(refs) == 5 and all(r.label is None for r in refs)
    assert isinstance(src._array(), np.memmap)  # only the images used are read
    for r in refs:
        np.testing.assert_array_equal(src.load(r)[0], a[r.frame] / np.float32(255))
    r = cli("data", "inspect", tmp_path / "plain.npy", "--image-size", "16")  # a bare .npy path is recognised
    assert r.exit_code == 0 and "5 images" in r.output, r.stderr


# --- labels ---------------------------------------------------------------------------------
def test_string_and_other_usable_labels_are_class_names(tmp_path):
    imgs = _images(4)
    cases = {
        "str": (np.array(["pneumonia", "normal"] * 2), ["pneumonia", "normal"] * 2),
        "bytes": (np.array([b"a", b"b", b"a", b"b"]), ["a", "b", "a", "b"]),
        "float": (np.array([[1.0], [0.0], [2.0], [1.0]]), ["1", "0", "2", "1"]),
        "multi": (np.array([[0, 1], [1, 1], [0, 0], [1, 0]]), ["0,1", "1,1", "0,0", "1,0"]),
        "bool": (np.array([True, False, True, False]), ["1", "0", "1", "0"]),
    }
    for name, (labels, expected) in cases.items():
        np.savez(tmp_path / f"{name}.npz", train_images=imgs, train_labels=labels)
        assert [r.label for r in create_source(f"npz:{tmp_path / f'{name}.npz'}").index()] == expected, name


@pytest.mark.parametrize("labels, why", [
    (np.full(6, np.nan), "they hold NaN or inf values"),
    (np.arange(3), "3 labels for 6 images"),
    (np.array([0.5, 1, 2, 3, 4, 5]), "not whole numbers"),
    (np.array([{"a": 1}] * 6, dtype=object), "Python objects (dtype object), never unpickled"),
    (np.zeros(6, np.complex64), "dtype complex64 cannot name classes"),
])
def test_unusable_labels_are_ignored_with_a_note(tmp_path, cli, labels, why):
    """Pretraining needs no labels: the images are read, one note says why the labels are not."""
    np.savez(tmp_path / "d.npz", train_images=_images(), train_labels=labels)
    r = _inspect(cli, tmp_path / "d.npz", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["images"] == 6, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sslkit: npz: train_labels ignored (") and why in lines[0]
    assert lines[0].endswith("); the images are read unlabelled"), lines[0]
    assert all(ref.label is None for ref in create_source(f"npz:{tmp_path / 'd.npz'}").index())


# --- 2: NaN / inf pixels --------------------------------------------------------------------
def test_nan_and_inf_images_are_skipped_and_reported(tmp_path, cli):
    a = _images(6, dtype=np.float32)
    a[1, 0, 0], a[3, 2, 2], a[4] = np.nan, np.inf, np.nan
    np.savez(tmp_path / "nan.npz", train_images=a)
    src = create_source(f"npz:{tmp_path / 'nan.npz'}")
    refs = src.index()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning leaks
        for i in (1, 3, 4):
            with pytest.raises(Undecodable, match=f"holds NaN or inf values: image {i}"):
                src.load(refs[i])
        np.testing.assert_array_equal(src.load(refs[0])[0], (a[0] - a[0].min()) / (a[0].max() - a[0].min()))
    run = tmp_path / "run"
    r = cli("pretrain", "--task", "simclr", "--backbone", "timm:test_resnet", "--data", f"npz:{tmp_path / 'nan.npz'}",
            "--out", run, "--max-steps", "1", "--batch-size", "2", "--image-size", "16", "--no-cache", "--quiet")
    assert r.exit_code == 0, r.stderr[-3000:]
    assert "RuntimeWarning" not in r.stderr
    report = json.loads((run / "data_report.json").read_text())
    assert report["samples"] == 3 and report["skipped_files"] == [
        {"file": file_key("nan.npz"), "reason": "holds NaN or inf values: image 1 (3 frames)"}]


def test_float64_beyond_the_float32_range_is_scaled_without_warnings(tmp_path):
    a = np.array([[[-1e300, 0.0], [1e300, 5e299]]] * 2)
    np.savez(tmp_path / "big.npz", train_images=a)
    src = create_source(f"npz:{tmp_path / 'big.npz'}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = src.load(src.index()[0])
    np.testing.assert_allclose(x[0], [[0, 0.5], [1, 0.75]])


# --- 3: axis layouts ------------------------------------------------------------------------
def test_channels_last_with_two_channels_is_grey_and_alpha(tmp_path):
    """(N, H, W, 2) was read as 32 channels of 2 x 32; now grey + alpha, read as grey."""
    a = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 2), dtype=np.uint8)
    np.savez(tmp_path / "hwc2.npz", train_images=a)
    src = create_source(f"npz:{tmp_path / 'hwc2.npz'}")
    ref = src.index()[0]
    assert src.channels_of(ref) == 2 and src.properties(ref)["size"] == "16x16"
    np.testing.assert_array_equal(src.load(ref), a[0].transpose(2, 0, 1) / np.float32(255))
    data = load_data(f"npz:{tmp_path / 'hwc2.npz'}", 16, cache_dir=False, progress=False)
    assert data.channels == 1
    np.testing.assert_array_equal(np.asarray(data.prepared.pixels[:, 0]), a[..., 0].astype(np.uint16) * 257)


def test_ambiguous_or_unknown_layouts_are_one_line(tmp_path, cli):
    np.savez(tmp_path / "hwc5.npz", train_images=np.zeros((4, 16, 16, 5), np.uint8))
    one_line_error(_inspect(cli, tmp_path / "hwc5.npz"), "has shape (4, 16, 16, 5); accepted layouts: (N, H, W), "
                    "(N, C, H, W) or (N, H, W, C) with C = 1 to 4 channels")
    np.savez(tmp_path / "vol.npz", train_images=np.zeros((2, 1, 8, 8, 8), np.uint8))
    one_line_error(_inspect(cli, tmp_path / "vol.npz"), "accepted layouts")
    a = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "amb.npz", train_images=a)
    one_line_error(_inspect(cli, tmp_path / "amb.npz"), "fits both (N, C, H, W) and (N, H, W, C)",
                    "--data-opt layout=nchw or --data-opt layout=nhwc")
    nhwc = create_source(f"npz:{tmp_path / 'amb.npz'}", layout="nhwc")
    np.testing.assert_array_equal(nhwc.load(nhwc.index()[1]), a[1].transpose(2, 0, 1) / np.float32(255))
    nchw = create_source(f"npz:{tmp_path / 'amb.npz'}", layout="nchw")
    np.testing.assert_array_equal(nchw.load(nchw.index()[1]), a[1] / np.float32(255))
    one_line_error(_inspect(cli, tmp_path / "hwc5.npz", "--data-opt", "layout=nhwc"), "does not fit layout=nhwc")
    one_line_error(_inspect(cli, tmp_path / "amb.npz", "--data-opt", "layout=hwc"), "choose one of auto, nhw")
    np.save(tmp_path / "one.npy", np.zeros((64, 48, 3), np.uint8))  # one RGB image, read as 64 images 3 px wide
    one_line_error(_inspect(cli, tmp_path / "one.npy"), "has shape (64, 48, 3): one (H, W, C) image, or 64 images "
                    "3 pixels wide?", "--data-opt layout=nhw")
    assert len(create_source(f"npz:{tmp_path / 'one.npy'}", layout="nhw").index()) == 64


# --- 4: memory ------------------------------------------------------------------------------
def test_a_compressed_array_over_the_memory_bound_is_refused_from_its_header(tmp_path, cli, monkeypatch):
    """A small deflated file of zeros declaring a large array is refused before decompression."""
    n, side = 2000, 64  # 8 MB decoded, a few KB stored
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("train_images.npy", "w") as f:
            f.write(_header((n, side, side)))
            for _ in range(n // 100):
                f.write(bytes(100 * side * side))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    one_line_error(_inspect(cli, tmp_path / "bomb.npz", "--data-opt", "max_gb=0.001"),
                    "(2000, 64, 64) uint8 is compressed and decompresses to 7.8 MiB", "--data-opt max_gb (1.0 MiB)",
                    "save it uncompressed")
    monkeypatch.setattr(npz_mod, "available_memory", lambda: 4 * 2**20)
    one_line_error(_inspect(cli, tmp_path / "bomb.npz"), "more than half the available memory (2.0 MiB)")
    monkeypatch.undo()
    src = create_source(f"npz:{tmp_path / 'bomb.npz'}")  # within the bound: decompressed once, read
    assert len(src.index()) == n and not src.load(src.index()[5]).any()


def test_uncompressed_members_are_memory_mapped(tmp_path):
    a = _images(5, 10, dtype=np.uint16)
    np.savez(tmp_path / "s.npz", train_images=a, train_labels=np.arange(5))
    # 10 KiB: the 5 images' index fits (npz_mod.INDEX_BYTES_PER_IMAGE each); the array itself is mapped, not held
    src = create_source(f"npz:{tmp_path / 's.npz'}", max_gb=1e-5)
    refs = src.index()
    assert isinstance(src._array(), np.memmap)
    np.testing.assert_array_equal(src.load(refs[4])[0], a[4] / np.float32(65535))


# --- good arrays: exactly the values they had --------------------------------------------------
def _expected(img: np.ndarray) -> np.ndarray:
    """The scaling the source has always applied to one (C, H, W) image."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    x = img.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.float16, np.int16, np.bool_])
@pytest.mark.parametrize("save", ["savez", "savez_compressed", "npy"])
@pytest.mark.parametrize("layout", ["nhw", "nchw", "nhwc"])
def test_good_arrays_load_exactly_as_before(tmp_path, dtype, save, layout):
    rng = np.random.default_rng(3)
    shape = {"nhw": (4, 9, 7), "nchw": (4, 3, 9, 7), "nhwc": (4, 9, 7, 3)}[layout]
    a = (rng.random(shape) * 300).astype(dtype) if dtype is not np.bool_ else rng.random(shape) > 0.5
    f = tmp_path / ("a.npy" if save == "npy" else "a.npz")
    if save == "npy":
        np.save(f, a)
    else:
        getattr(np, save)(f, train_images=a)
    chw = a[:, None] if layout == "nhw" else a.transpose(0, 3, 1, 2) if layout == "nhwc" else a
    src = create_source(f"npz:{f}")
    refs = src.index()
    assert len(refs) == 4 and src.channels_of(refs[0]) == chw.shape[1]
    for r in refs:
        got, want = src.load(r), _expected(chw[r.frame])
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_the_error_types_stay_usage_errors(tmp_path):
    """For callers of create_source: refusals are UsageError, as before."""
    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(UsageError, match="is empty"):
        create_source(f"npz:{tmp_path / 'e.npz'}")


@pytest.mark.parametrize("dtype", [">u2", ">u1", ">f4", ">i2"])
def test_big_endian_arrays_load_as_their_native_twins(tmp_path, dtype):
    """A big-endian uint16 ``.npy`` was min-max scaled per image (its dtype is not ``np.uint16``)
    while the same pixels little-endian were divided by 65535."""
    a = (np.random.default_rng(4).random((3, 9, 7)) * 3000).astype(dtype.replace(">", "<"))
    np.save(tmp_path / "le.npy", a)
    np.save(tmp_path / "be.npy", a.astype(dtype))
    le, be = create_source(f"npz:{tmp_path / 'le.npy'}"), create_source(f"npz:{tmp_path / 'be.npy'}")
    for r in le.index():
        np.testing.assert_array_equal(be.load(r), le.load(r))
    assert be.graph_preprocessing() == le.graph_preprocessing()


@pytest.mark.parametrize("dtype, kind, words", [(np.uint8, "pixels", ""), (np.uint16, "pixels", ""),
                                                 (np.int16, "unit", "own min-max (int16 arrays)"),
                                                 (np.float32, "unit", "own min-max (float32 arrays)"),
                                                 (np.bool_, "unit", "bools as 0 / 1")])
def test_an_export_of_min_max_scaled_arrays_tells_the_client(tmp_path, dtype, kind, words):
    """An ONNX export ``--with-preprocessing`` of a run on int16 or float arrays said the graph takes
    uint8 pixels, though training had scaled each image by its own min-max."""
    np.save(tmp_path / "a.npy", _images(dtype=dtype))
    gp = create_source(f"npz:{tmp_path / 'a.npy'}").graph_preprocessing()
    assert gp.kind == kind and words in gp.client


def test_eval_scores_a_medmnist_file_on_its_own_train_and_test_arrays(tmp_path, cli):
    """``--data-opt`` applied to both sides, so ``--test npz:m.npz`` read the train array too, and the
    leakage check keyed by the file's bytes and the frame called the two arrays one: the only way
    to score MedMNIST's own split was ``--allow-overlap``, which would have scored train against itself."""
    from tests.conftest import tiny_run

    r = np.random.default_rng(1)
    train, test = r.integers(0, 255, (24, 16, 16)).astype(np.uint8), r.integers(0, 255, (12, 16, 16)).astype(np.uint8)
    f = tmp_path / "m.npz"
    np.savez(f, train_images=train, train_labels=np.arange(24) % 2, test_images=test, test_labels=np.arange(12) % 2)
    run = tiny_run(f"npz:{f}", tmp_path / "run", 16)
    knn = ("eval", "knn", run, "--train", f"npz:{f}", "--test", f"npz:{f}", "--no-baseline", "--quiet", "--json")
    proc = cli(*knn, "--test-opt", "split=test")
    assert proc.exit_code == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert (report["data"]["train"]["samples"], report["data"]["test"]["samples"]) == (24, 12)
    assert report["data"]["test"]["options"] == {"split": "test"} and "options" not in report["data"]["train"]
    one_line_error(cli(*knn), "--train and --test share 24 of the 24 test images")  # one array on both sides
    np.savez(tmp_path / "copy.npz", train_images=train[:5], train_labels=np.arange(5) % 2)  # in another file: found
    one_line_error(cli("eval", "knn", run, "--train", f"npz:{f}", "--test", f"npz:{tmp_path / 'copy.npz'}",
                        "--no-baseline", "--quiet"), "--train and --test share 5 of the 5 test images")
    one_line_error(cli("eval", "knn", run, "--data", f"npz:{f}", "--test-opt", "split=test"),
                    "--train-opt and --test-opt apply to --train and --test")


def test_a_content_key_that_fails_leaves_the_sample_to_the_decoding_report():
    """A damaged compressed array raised out of the leakage check (a traceback, exit 1): the sample is
    left out there and reported as skipped when it fails to decode."""
    from sslkit.api import SampleRef
    from sslkit.eval.overlap import content_keys

    class Broken:
        def content_key(self, ref):
            raise Undecodable("Bad CRC-32")

    refs = [SampleRef(__file__, 0), SampleRef(__file__, 1)]
    assert content_keys(refs, ["a", "b"], Broken()) == {}
