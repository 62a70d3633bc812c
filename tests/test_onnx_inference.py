"""DICOM to deployment: a windowed CT run exported --with-preprocessing, embedded by the
torch-free example client, by `sslkit embed` on the ONNX file, and by the run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from sslkit.cli import main
from sslkit.run import load_run
from tests.conftest import REPO, make_images, tiny_run
from tests.dicom_factory import write_dicom
from tests.test_export import _assert_one_line_error

EXAMPLE = REPO / "examples" / "onnx_inference.py"
LUNG = (-1350.0, 150.0)  # lung preset W 1500, L -600 as (lower, upper) HU
PATIENT = "Doe^Jane"


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> dict[str, Path]:
    """10 synthetic 32x32 CT slices (one MONOCHROME1), a 1-step run with the lung window, its export."""
    root = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(10):
        hu = -1000 + 900 * np.exp(-((yy - 16) ** 2 + (xx - 10 - i) ** 2) / 60.0) + rng.normal(0, 60, (32, 32))
        stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
        write_dicom(root / "ct" / f"{i}.dcm", stored, modality="CT", slope=1.0, intercept=-1024.0,
                    patient_id=f"PID-{i}", patient_name=PATIENT, birth_date="19700101", bits_stored=12,
                    photometric="MONOCHROME1" if i == 3 else "MONOCHROME2")
    run_dir, onnx_path = tiny_run(f"dicom:{root / 'ct'}", root / "run", 32, "--data-opt", "window=lung"), root / "ct.onnx"
    proc = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(onnx_path), "--with-preprocessing",
                                     "--json"], catch_exceptions=False)  # in-process: ~5 s of imports less
    assert proc.exit_code == 0, proc.stderr
    return {"root": root, "data": root / "ct", "run": run_dir, "onnx": onnx_path, "report": json.loads(proc.stdout)}


def _without_torch(*args: str) -> subprocess.CompletedProcess:
    """Run the example with ``import torch`` made impossible; report whether torch got imported."""
    code = (
        "import runpy, sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"sys.argv = {[str(EXAMPLE), *args]!r}\n"
        "try:\n"
        f"    runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_window_graph_contract(ct):
    report = ct["report"]
    assert report["input_kind"] == "window" and report["max_abs_diff"] <= 1e-4
    assert {c["inputs"] for c in report["checks"]} == {"random", "real"}  # the run's own slices
    model = onnx.load(str(ct["onnx"]))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    text = {p.key: p.value for p in model.metadata_props}["sslkit"]
    meta = json.loads(text)
    window = meta["input"]["raw"]["window"]
    assert [(w["lower"], w["upper"]) for w in window] == [LUNG] and meta["input"]["preprocessing_in_graph"]
    assert meta["source_options"] == {"window": "lung"}
    for secret in (PATIENT, "Doe", "PID-", "19700101", str(ct["data"])):
        assert secret not in text

    # the graph on HU values == the PyTorch encoder on the lung-windowed, normalised slices
    hu = np.random.default_rng(3).uniform(-1600, 400, (4, 1, 32, 32)).astype(np.float32)
    hu[0, 0, :3, :3] = np.nan  # a masked voxel (float NIfTI): 0 after the window, as training makes it
    hu[1, 0, 0, :2] = [np.inf, -np.inf]
    got = ort.InferenceSession(str(ct["onnx"])).run(["embedding"], {"pixels": hu})[0]
    run = load_run(ct["run"])
    unit = np.clip(np.nan_to_num((hu - LUNG[0]) / (LUNG[1] - LUNG[0])), 0, 1)
    x = (unit - np.float32(run.spec.mean[0])) / np.float32(run.spec.std[0])
    with torch.no_grad():
        ref = run.build_encoder()(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_embed_onnx_equals_run_dir_and_window_is_fixed(ct, tmp_path, cli):
    a, b = tmp_path / "run.npz", tmp_path / "onnx.npz"
    for model, out in ((ct["run"], a), (ct["onnx"], b)):
        result = cli("embed", model, "--data", f"dicom:{ct['data']}", "--out", out, "--quiet")
        assert result.exit_code == 0, result.output
    ra, rb = np.load(a), np.load(b)
    assert ra["embeddings"].shape == (10, 512) and list(ra["ids"]) == list(rb["ids"])
    np.testing.assert_allclose(ra["embeddings"], rb["embeddings"], atol=1e-4)
    # the run dir can be re-windowed; the ONNX graph has the lung window baked in
    result = cli("embed", ct["run"], "--data", f"dicom:{ct['data']}", "--out", tmp_path / "bone.npz",
                 "--window", "bone", "--quiet")
    assert result.exit_code == 0, result.output
    assert np.abs(np.load(tmp_path / "bone.npz")["embeddings"] - ra["embeddings"]).max() > 1e-4
    _assert_one_line_error(cli("embed", ct["onnx"], "--data", f"dicom:{ct['data']}", "--out", tmp_path / "x.npz",
                               "--window", "bone"), "window=lung inside its graph")
    # the graph's own window however written (numbers compared, not text): the same embeddings
    for i, same in enumerate(("1500,-600", "1500.0,-600", "1500:-600.0", "W 1500, L -600", "LUNG")):
        result = cli("embed", ct["onnx"], "--data", f"dicom:{ct['data']}", "--out", tmp_path / f"{i}.npz",
                     "--window", same, "--quiet")
        assert result.exit_code == 0, (same, result.output)
        np.testing.assert_allclose(np.load(tmp_path / f"{i}.npz")["embeddings"], rb["embeddings"], atol=1e-6)
    _assert_one_line_error(cli("embed", ct["onnx"], "--data", f"dicom:{ct['data']}", "--out", tmp_path / "x.npz",
                               "--window", "W 1500, L -500"), "window=lung inside its graph")


def test_example_client_without_torch_dicom(ct, tmp_path, cli):
    out = tmp_path / "client.npz"
    proc = _without_torch(str(ct["onnx"]), str(ct["data"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stdout and "embedded 10 images" in proc.stdout
    ref = tmp_path / "ref.npz"
    # the client names files by path: so does embed, asked to
    r = cli("embed", ct["run"], "--data", f"dicom:{ct['data']}", "--out", ref, "--quiet", "--ids", "path")
    assert r.exit_code == 0
    client, expected = np.load(out), np.load(ref)
    assert list(client["ids"]) == list(expected["ids"])  # MONOCHROME1 slice 3 included
    # the run stored windowed pixels as 16-bit; the client's HU path is exact float32
    np.testing.assert_allclose(client["embeddings"], expected["embeddings"], atol=1e-4)


def test_example_client_without_torch_png(tmp_path):
    """A plain (normalised-input) export of an RGB encoder, on PNGs that need resizing, a JPEG on
    its side, float32 and int32 TIFFs (scaled by their own min-max) and a TIFF with NaN (skipped)."""
    from sslkit.embed import embed
    from sslkit.registry import create_backbone, get_exporter
    from sslkit.spec import InputSpec

    images = make_images(tmp_path / "png", n_per_class=3, size=40, channels=3)
    from PIL import Image

    yy, xx = np.mgrid[0:40, 0:80]  # a photo stored on its side (EXIF orientation 6): both read it upright
    rgb = np.stack([xx * 3, yy * 6, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(images / "a" / "rotated.jpg", exif=exif, quality=95)
    # float32 and 32-bit integer TIFFs: both scale them by their own min-max (not clipped to 0-255, not / 65535)
    ramp = (xx * 7.0 - yy * 3.0)[:, :48]
    Image.fromarray((ramp * 0.01 - 2.5).astype(np.float32), mode="F").save(images / "b" / "float.tif")
    Image.fromarray((ramp * 90_000 + 5_000_000).astype(np.int32)).save(images / "b" / "int32.tif")
    masked = (ramp * 0.01).astype(np.float32)
    masked[:2, :2] = np.nan
    Image.fromarray(masked, mode="F").save(images / "b" / "nan.tif")  # skipped by both, with the reason
    import tifffile  # MINISWHITE 16-bit and float TIFFs, which pillow reads un-inverted: both read them as displayed

    tifffile.imwrite(images / "b" / "white16.tif", (ramp * 300 + 1000).astype(np.uint16), photometric="miniswhite")
    tifffile.imwrite(images / "b" / "whitef.tif", (ramp * 0.01).astype(np.float32), photometric="miniswhite")
    encoder = create_backbone("timm:resnet10t", in_chans=3, image_size=32).eval()
    spec = InputSpec(3, 32, (0.5, 0.45, 0.4), (0.25, 0.25, 0.3), "folder", {"scale": "8-bit / 255"})
    get_exporter("onnx")(encoder, spec, {"task": "t", "backbone": "timm:resnet10t", "embedding_dim": 512},
                         tmp_path / "rgb.onnx")
    out = tmp_path / "client.npz"
    proc = _without_torch(str(tmp_path / "rgb.onnx"), str(images), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stdout
    assert "nan.tif: ValueError: holds NaN or inf values" in proc.stderr
    client = np.load(out)
    ours = embed(tmp_path / "rgb.onnx", f"folder:{images}", progress=False)
    assert list(client["ids"]) == ours.ids and len(ours.ids) == 11 and ours.skipped == 1
    # 40 -> 32 px: pillow's antialiased bilinear vs PyTorch's, so close rather than identical
    cos = (client["embeddings"] * ours.embeddings).sum(1) / (
        np.linalg.norm(client["embeddings"], axis=1) * np.linalg.norm(ours.embeddings, axis=1))
    assert cos.min() > 0.999


def test_example_client_names_the_runs_source_for_a_volume_encoder(tmp_path):
    """A volume (or slab) encoder is refused in one line that names `sslkit embed` with the run's
    source scheme (a NIfTI run: nifti:FOLDER, not dicom:FOLDER), before any work."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["embedding"])], "g",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 1, 4, 4, 4])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 1, 4, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"input": {"name": "pixels", "sample": "volume", "raw": {"kind": "window", "channels": 1}},
            "output": {"name": "embedding"}, "spec": {"source": "nifti"}}
    helper.set_model_props(model, {"sslkit": json.dumps(meta)})
    onnx.save(model, tmp_path / "vol.onnx")
    (tmp_path / "scans").mkdir()
    proc = subprocess.run([sys.executable, str(EXAMPLE), tmp_path / "vol.onnx", tmp_path / "scans", "--out",
                           tmp_path / "client.npz"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"--data nifti:{tmp_path / 'scans'}" in proc.stderr and "dicom:" not in proc.stderr
