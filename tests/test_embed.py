"""`sslkit embed`: a run directory (PyTorch) and its ONNX export (onnxruntime) agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sslkit.embed import embed, embed_run
from sslkit.export import export_run
from sslkit.pseudonym import file_key
from tests.conftest import make_images, run_sslkit, tiny_run
from tests.test_export import _assert_one_line_error


@pytest.fixture(scope="module")
def run_and_onnx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    data = make_images(root / "gray", n_per_class=5, size=40, channels=1)
    run_dir = tiny_run(f"folder:{data}", root / "run")
    export_run(run_dir, root / "encoder.onnx", check_data="none")
    return {"root": root, "data": data, "run": run_dir, "onnx": root / "encoder.onnx"}


def test_onnx_and_run_dir_agree(run_and_onnx, tmp_path, cli):
    a, b = tmp_path / "run.npz", tmp_path / "onnx.npz"
    proc = cli("embed", run_and_onnx["run"], "--data", run_and_onnx["data"], "--out", a, "--device", "cpu")
    assert proc.exit_code == 0, proc.stderr
    assert "embedded 10 images (512-d, torch)" in proc.stdout
    assert "embedding" in proc.stderr  # the progress bar
    result = cli("embed", run_and_onnx["onnx"], "--data", f"folder:{run_and_onnx['data']}", "--out", b, "--quiet")
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.stdout

    ra, rb = np.load(a), np.load(b)
    assert ra["embeddings"].dtype == np.float32 and ra["embeddings"].shape == (10, 512)
    assert ra["ids"].dtype.kind == "U" and list(ra["ids"]) == list(rb["ids"])
    assert ra["ids"][0] == file_key("a/0.png") and set(ra["labels"]) == {"a", "b"}  # keyed, not gray/a/0.png
    np.testing.assert_allclose(ra["embeddings"], rb["embeddings"], atol=1e-4)
    assert np.abs(ra["embeddings"]).max() > 1e-3  # not trivially zero


def test_embed_run_is_embed_of_the_run_dir(run_and_onnx):
    """``embed_run`` (used by eval) delegates to ``embed``; the random baseline differs."""
    data = f"folder:{run_and_onnx['data']}"
    direct = embed(run_and_onnx["run"], data, batch_size=4, progress=False)
    legacy = embed_run(str(run_and_onnx["run"]), data, batch_size=3, progress=False)
    np.testing.assert_allclose(direct.embeddings, legacy.embeddings, atol=1e-5)
    assert direct.ids == legacy.ids and direct.labels == legacy.labels
    baseline = embed_run(str(run_and_onnx["run"]), data, progress=False, weights=False)
    assert np.abs(baseline.embeddings - direct.embeddings).max() > 1e-3


def test_bad_models_and_outputs(run_and_onnx, tmp_path, cli):
    data = str(run_and_onnx["data"])
    out = tmp_path / "e.npz"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(run_and_onnx["onnx"].read_bytes()[:2000])
    # the real executable: a corrupt model is one line, exit 2, as a user sees it
    _assert_one_line_error(run_sslkit("embed", corrupt, "--data", data, "--out", out), "cannot read ONNX model")
    _assert_one_line_error(cli("embed", tmp_path / "missing.onnx", "--data", data, "--out", out), "does not exist")
    _assert_one_line_error(cli("embed", tmp_path / "nothing", "--data", data, "--out", out), "does not exist")

    # an ONNX file that sslkit did not export
    import onnx

    foreign = onnx.load(str(run_and_onnx["onnx"]))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    _assert_one_line_error(cli("embed", tmp_path / "foreign.onnx", "--data", data, "--out", out), "not exported by sslkit")

    # outputs: never overwritten silently, unwritable folders refused before any work
    keep = tmp_path / "keep.npz"
    keep.write_text("precious")
    _assert_one_line_error(cli("embed", run_and_onnx["onnx"], "--data", data, "--out", keep), "already exists")
    assert keep.read_text() == "precious"
    _assert_one_line_error(cli("embed", run_and_onnx["onnx"], "--data", data, "--out", "/proc/e.npz"), "not writable")
    _assert_one_line_error(cli("embed", run_and_onnx["onnx"], "--data", tmp_path / "nodata", "--out", out), "does not exist")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    result = cli("embed", run_and_onnx["onnx"], "--data", data, "--out", keep, "--overwrite", "--quiet")
    assert result.exit_code == 0 and np.load(keep)["embeddings"].shape == (10, 512)


def test_embed_and_eval_read_data_with_the_runs_max_pixels(run_and_onnx, tmp_path, cli):
    """A run's --max-pixels (run.json) is the decode limit of embed and eval on its encoder:
    images over it are skipped unread (all of them: one line, exit 2); --max-pixels overrides it."""
    import json

    run = tmp_path / "run"
    result = cli("pretrain", "--task", "simclr", "--data", f"folder:{run_and_onnx['data']}", "--out", run,
                 "--backbone", "timm:resnet10t", "--image-size", 32, "--batch-size", 8, "--max-steps", 1,
                 "--epochs", 1, "--no-cache", "--quiet", "--max-pixels", 2000)  # its images: 40 x 40 = 1600
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["config"]["max_pixels"] == 2000
    big = make_images(tmp_path / "big", n_per_class=2, size=64, channels=1)  # 64 x 64 = 4096 pixels
    other = make_images(tmp_path / "other", n_per_class=2, size=64, channels=1, seed=1)
    out = tmp_path / "e.npz"
    limit = "exceeds the limit of 2,000 (--max-pixels raises it)"
    _assert_one_line_error(cli("embed", run, "--data", big, "--out", out, "--quiet"), limit)
    _assert_one_line_error(cli("eval", "knn", run, "--train", big, "--test", other, "--no-baseline", "--quiet"), limit)
    assert not out.exists()
    # (`other`: the decoded-pixel cache keeps `big`'s skips under a key without the limit)
    result = cli("embed", run, "--data", other, "--out", out, "--max-pixels", 0, "--quiet")  # 0: no limit
    assert result.exit_code == 0, result.output
    assert np.load(out)["embeddings"].shape == (4, 512)


def test_eval_takes_the_source_plugins_flags_like_pretrain(run_and_onnx, tmp_path, cli):
    """`sslkit eval` offers the sslkit.source_flags flags (dicom's --window ...) and hands them
    to the source exactly as --data-opt does."""
    assert "--window" in cli("eval", "knn", "--help").output and "--window" in cli("eval", "tsne", "--help").output
    data = str(run_and_onnx["data"])
    args = ("eval", "knn", run_and_onnx["run"], "--train", data, "--test", data, "--allow-overlap", "--quiet")
    flag, opt = cli(*args, "--window", "lung"), cli(*args, "--data-opt", "window=lung")
    assert flag.exit_code == opt.exit_code == 2 and flag.stderr == opt.stderr and "window" in flag.stderr
    assert len(flag.stderr.strip().splitlines()) == 1


def test_a_safetensors_export_is_refused_in_one_line(run_and_onnx, tmp_path, cli):
    """A safetensors export holds weights only: say so (not onnx's "Wire format was corrupt"),
    by its suffix or, renamed, by its header."""
    from safetensors.numpy import save_file

    save_file({"conv.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "encoder.safetensors"))
    (tmp_path / "weights.bin").write_bytes((tmp_path / "encoder.safetensors").read_bytes())
    for model in ("encoder.safetensors", "weights.bin"):
        result = cli("embed", tmp_path / model, "--data", run_and_onnx["data"], "--out", tmp_path / "e.npz")
        _assert_one_line_error(result, "safetensors export", "weights only",
                               "embed the run directory or an ONNX export")
    assert not (tmp_path / "e.npz").exists()


def test_embed_names_the_commonest_skip_reasons(run_and_onnx, tmp_path, cli):
    """Skipped files: `pretrain`'s one-line summary of the reasons on stderr, no file names."""
    from PIL import Image

    data = tmp_path / "data"
    make_images(data, n_per_class=2, size=40, channels=1)
    (data / "a" / "secret-name.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    nan = np.full((40, 40), 1.0, np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan, mode="F").save(data / "b" / "masked.tif")
    result = cli("embed", run_and_onnx["onnx"], "--data", f"folder:{data}", "--out", tmp_path / "e.npz", "--quiet")
    assert result.exit_code == 0, result.output
    assert "embedded 4 images" in result.stdout and "2 skipped" in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("data: ")]
    assert len(lines) == 1 and lines[0].startswith("data: 4 images; 2 files skipped: "), result.stderr
    assert "1 x holds NaN or inf values" in lines[0] and "data_report.json" not in lines[0]
    assert "secret-name" not in result.stderr and "masked" not in result.stderr


def test_another_spacing_than_the_models_is_noted(capsys):
    """Allowed (the shape still fits), but said: the audit's embeddings moved by up to 1.6 unnoticed."""
    from sslkit.embed import note_other_spacing
    from sslkit.spec import InputSpec

    spec = InputSpec(1, 224, (0.5,), (0.25,), "nifti", {"sample": "volume", "spacing_mm": [2.0, 1.5, 1.0],
                                                          "volume_size": [8, 8, 8]})
    note_other_spacing(spec, "1,1.5,2")  # x,y,z: the model's own
    note_other_spacing(spec, "not a number")  # the source refuses it later, in its own words
    assert capsys.readouterr().err == ""
    from types import SimpleNamespace

    from sslkit.embed import source_options_for

    model = SimpleNamespace(spec=spec, source_options={}, fixed_options={})
    assert source_options_for(model, "nifti:/scans", {"spacing": "1"}) == {"spacing": "1"}  # embed and eval pass here
    assert capsys.readouterr().err.strip() == ("sslkit: note: --spacing 1,1,1 resamples to another voxel size than "
                                               "the model's (1,1.5,2 mm, x,y,z): it sees the anatomy at another scale")
