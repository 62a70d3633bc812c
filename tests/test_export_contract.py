"""What an export tells its client, and what its graph takes, whatever the run's data.

The audit's journey: a run on 16-bit PNGs holding 12-bit values, exported ``--with-preprocessing``
without ``--input-dtype``, got a uint8 graph: a client feeding pixels kept about 16 grey levels and
its embeddings were off by ~0.1 of the largest value (cosine 0.992), while the export's real-image
check, fed pixels already rounded to uint8 on both sides, printed 1.6e-6. Plain exports' client
steps left out what the source does per file (a per-file window, MONOCHROME1 inversion), a uint16
graph did not say how 8-bit images go in, and the volume client line was cut at 300 characters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from sslkit.errors import UsageError
from sslkit.export import CLIENT_NOTE_MAX, real_samples, report_lines
from sslkit.raw_input import GraphPreprocessing, RawInput, default_input_dtype, pixel_grid, raw_input_for
from sslkit.run import load_run
from sslkit.spec import InputSpec
from tests.conftest import tiny_run


SIZE = 32


def _twelve_bit_pngs(root: Path, n: int = 6, size: int = 48) -> Path:
    """16-bit grey PNGs holding 12-bit values (0-4095), two class folders."""
    rng = np.random.default_rng(0)
    xx = np.mgrid[0:size, 0:size][1] / size
    for ci, cls in enumerate("ab"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = (np.sin((xx * (2 + 6 * ci) + rng.random()) * np.pi * 2) + 1) / 2
            img = np.clip(base * 0.8 + rng.random((size, size)) * 0.2, 0, 1)
            Image.fromarray((img * 4095).astype(np.uint16)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run12(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("x12")
    return tiny_run(f"folder:{_twelve_bit_pngs(root / 'data')}", root / "run", SIZE)


def _meta(path: Path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["sslkit"])


def _export(cli, run: Path, out: Path, *extra: str) -> dict:
    proc = cli("export", run, "--out", out, "--with-preprocessing", "--json", *extra)
    assert proc.exit_code == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_16_bit_run_exports_a_uint16_graph_by_default(run12, tmp_path, cli):
    out = tmp_path / "x12.onnx"
    report = _export(cli, run12, out)
    assert report["input_kind"] == "uint16"  # was uint8: ~16 grey levels of 12-bit content
    assert report["input_dtype_from"] == "uint16: the run's data holds 16-bit values (8 images of the run's data)"
    meta = _meta(out)
    assert meta["input"]["dtype"] == "uint16" and meta["data_pixels"] == {"grid": "uint16",
                                                                         "read": "8 images of the run's data"}
    assert "16-bit values as stored, never stretched to their range" in meta["input"]["client_steps"]
    # what the client feeds: the files' own 16-bit values, resized (here at the run's size already)
    raw = np.stack([np.asarray(Image.open(f), np.uint16)[8:40, 8:40][None]
                    for f in sorted((run12.parent / "data" / "a").glob("*.png"))])
    got = ort.InferenceSession(str(out)).run(["embedding"], {"pixels": raw})[0]
    run = load_run(run12)
    unit = raw.astype(np.float32) / 65535  # the source's scale: 16-bit / 65535, as the run trained on
    with torch.no_grad():
        ref = run.build_encoder()(torch.from_numpy((unit - run.spec.mean[0]) / run.spec.std[0])).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_the_real_image_check_reports_the_input_rounding(run12, tmp_path, cli):
    """The check compares the graph on the client's input with PyTorch on the unrounded pixels:
    uint8 on 12-bit data costs ~0.1 of the largest embedding value, and says so."""
    out = tmp_path / "u8.onnx"
    report = _export(cli, run12, out, "--input-dtype", "uint8")
    assert report["input_kind"] == "uint8" and report["input_dtype_from"].startswith(
        "--input-dtype uint8, coarser than the run's data (uint16 values")
    rounding = report["input_rounding"]
    # the reference, independently: the run's encoder on the run's pixels unrounded, the graph on them as uint8
    run = load_run(run12)
    samples, _ = real_samples(run)
    from sslkit.api import resize_square

    session, encoder = ort.InferenceSession(str(out)), run.build_encoder().eval()
    worst, peak = 0.0, 0.0
    for size in (SIZE, 64):  # the run's size and the export's second size
        unit = samples if size == SIZE else np.stack([resize_square(s, size) for s in samples])
        got = session.run(["embedding"], {"pixels": np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)})[0]
        with torch.no_grad():
            ref = encoder(torch.from_numpy((unit - run.spec.mean[0]) / run.spec.std[0])).numpy()
        worst, peak = max(worst, np.abs(got - ref).max()), max(peak, np.abs(ref).max())
    assert rounding["input"] == "uint8" and rounding["max_abs_diff"] == pytest.approx(worst, rel=1e-3)
    assert rounding["relative"] == pytest.approx(worst / peak, rel=1e-3) and rounding["relative"] > 2e-2
    assert report["max_abs_diff"] <= 1e-4 * 30  # the export itself is exact: parity on the same input
    assert _meta(out)["verification"]["input_rounding"] == rounding
    lines = report_lines({k: v for k, v in report.items()})
    assert f"input rounding (uint8 input vs the run's unrounded pixels, real inputs): max abs diff " \
           f"{rounding['max_abs_diff']:.2e} ({rounding['relative']:.2e} of max |embedding|)" in "\n".join(lines)


def test_a_narrow_range_run_whose_data_is_not_read_is_refused_without_input_dtype(run12, tmp_path, cli):
    proc = cli("export", run12, "--out", tmp_path / "n.onnx", "--with-preprocessing", "--check-data", "none")
    assert proc.exit_code == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "12-bit content in 16-bit files?" in proc.stderr and "--input-dtype uint16" in proc.stderr
    assert not (tmp_path / "n.onnx").exists()


def test_pixel_grid_and_the_default_it_gives():
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (3, 9, 7))
    assert pixel_grid((eight / 255).astype(np.float32)) == "uint8"
    assert pixel_grid((eight * 257 / 65535).astype(np.float32)) == "uint8"  # 8-bit values in 16-bit files
    assert pixel_grid((rng.integers(0, 4096, (1, 9, 7)) / 65535).astype(np.float32)) == "uint16"
    assert pixel_grid(rng.random((1, 9, 7), dtype=np.float32)) == "float"
    spec = InputSpec(1, 32, (0.5,), (0.25,), "folder", {"scale": "8-bit / 255, 16-bit / 65535, float min-max"})
    assert default_input_dtype(spec, "uint16", "8 images")[0] == "uint16"
    assert default_input_dtype(spec, "uint8", "8 images")[0] == "uint8"
    dtype, why = default_input_dtype(spec, "float", "8 images")
    assert dtype == "float32" and "neither the 8- nor the 16-bit grid" in why
    dtype, why = default_input_dtype(spec, None, "skipped: --check-data none")
    assert dtype == "uint8" and why.startswith("uint8 assumed: the run's data was not read")
    with pytest.raises(UsageError, match=r"spans only \[0\.001, 0\.06\]"):
        default_input_dtype(InputSpec(1, 32, (0.5,), (0.25,), "folder", value_range=(0.001, 0.06)), None, "none")
    window = InputSpec(1, 32, (0.5,), (0.25,), "ct", graph_preprocessing=GraphPreprocessing(
        "window", (-1350.0,), (150.0,)).to_json())
    assert default_input_dtype(window, "float", "8 images") == (None, "")  # the source fixes its graph's input


def test_the_grid_of_what_the_sources_decode(tmp_path):
    """The grid each kind of file decodes to, which the export's default input dtype follows: 8-bit
    JPEGs (colour, grey, CMYK), grey PNGs with alpha, palette and 1-bit PNGs, 8-bit TIFFs, and 8-bit
    npz arrays stay uint8; 16-bit PNGs and TIFFs uint16; float TIFFs float (their graph: float32)."""
    from sslkit.registry import create_source

    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    a8, a16 = rng.integers(0, 256, (30, 40), dtype=np.uint8), rng.integers(0, 4096, (30, 40)).astype(np.uint16)
    folder = tmp_path / "img" / "c"
    folder.mkdir(parents=True)
    rgb = Image.fromarray(np.stack([a8, 255 - a8, a8 // 2], -1))
    for name, img in {"rgb.jpg": rgb, "grey.jpg": Image.fromarray(a8), "cmyk.jpg": rgb.convert("CMYK"),
                      "la.png": Image.fromarray(np.stack([a8, 255 - a8], -1), "LA"), "pal.png": rgb.convert("P"),
                      "bw.png": Image.fromarray(a8 > 128), "g16.png": Image.fromarray(a16)}.items():
        img.save(folder / name)
    tifffile.imwrite(folder / "u8.tif", a8)
    tifffile.imwrite(folder / "u16.tif", a16)
    tifffile.imwrite(folder / "f32.tif", rng.random((30, 40), dtype=np.float32))
    source = create_source(f"folder:{tmp_path / 'img'}")
    grids = {Path(r.path).name: pixel_grid(source.load(r)) for r in source.index()}
    assert grids == {**dict.fromkeys(["rgb.jpg", "grey.jpg", "cmyk.jpg", "la.png", "pal.png", "bw.png", "u8.tif"],
                                     "uint8"), "g16.png": "uint16", "u16.tif": "uint16", "f32.tif": "float"}
    for dtype, grid in (("uint8", "uint8"), ("uint16", "uint16")):
        np.savez(tmp_path / f"{dtype}.npz", images=rng.integers(0, 4096, (2, 1, 20, 20)).astype(dtype))
        arrays = create_source(f"npz:{tmp_path / f'{dtype}.npz'}")
        assert pixel_grid(arrays.load(arrays.index()[0])) == grid


def test_a_uint16_graph_of_8_bit_data_tells_the_client_to_scale_by_257():
    spec = InputSpec(1, 32, (0.5,), (0.25,), "folder", {"scale": "8-bit / 255, 16-bit / 65535, float min-max"})
    raw, note = raw_input_for(spec, True, "uint16")
    assert "8-bit images: value x 257" in note
    v = np.arange(256, dtype=np.uint16).reshape(1, 1, 16, 16)  # what the step gives is what the run saw: v / 255
    np.testing.assert_allclose(raw.to_unit(v * 257), v / 255.0, atol=1e-7)
    raw8, note8 = raw_input_for(spec, True, "uint8")
    assert "16-bit images: round(value / 257)" in note8
    np.testing.assert_array_equal(raw8.from_unit(v * 257 / 65535.0), v)


def test_a_plain_export_of_a_per_file_window_run_says_the_source_mapping(tmp_path):
    """A plain export's client steps said only '(x - mean) / std of x in [0, 1]': not the run's per-file
    window, nor that MONOCHROME1 files are inverted after it."""
    from sslkit.registry import create_source
    from tests.test_series import write_series

    write_series(tmp_path / "s", n=2)
    source = create_source(f"dicom:{tmp_path / 's'}", window="auto")
    spec = InputSpec(1, 32, (0.5,), (0.25,), "dicom", source.describe(),
                     graph_preprocessing=source.graph_preprocessing().to_json())
    raw, note = raw_input_for(spec, False)
    assert raw.kind == "normalized" and note.startswith("client maps each image to x in [0, 1] as the run's source")
    for words in ("window: auto", "monochrome1: inverted after windowing", "normalises: (x - mean) / std"):
        assert words in note, words
    raw, note = raw_input_for(spec, True)  # the graph without the window: the client's steps say it too
    assert raw.kind == "unit" and "monochrome1: inverted after windowing" in note and "per-file" in note


def _volume_spec() -> InputSpec:
    from sslkit.data.volume import VOLUME_DECODE

    gp = {"kind": "window", "window": [{"lower": -160.0, "upper": 240.0}], "client": "client passes modality values",
          "options": ["window"]}
    return InputSpec(1, 224, (0.5,), (0.25,), "ct", {"sample": "volume", "volume_size": [8, 8, 8],
                                                    "decode": VOLUME_DECODE}, graph_preprocessing=gp)


def test_the_volume_client_line_is_printed_whole_and_a_plugins_text_stays_bounded():
    _, note = raw_input_for(_volume_spec(), False)
    assert len(note) > 300  # words() cut it to "client builds each volume a..."
    lines = report_lines({"format": "onnx", "out": "v.onnx", "client_note": note})
    assert f"client: {note}" in lines
    long = "x" * (CLIENT_NOTE_MAX + 1)  # an exporter plugin's own: bounded
    assert max(map(len, report_lines({"format": "x", "out": "o", "client_note": long}))) < 100
    # a source's own client sentence is bounded where sslkit composes the note
    spec = InputSpec(1, 32, (0.5,), (0.25,), "mine", {"how": "y" * 5000},
                     graph_preprocessing=GraphPreprocessing("unit", client="z" * 5000).to_json())
    for with_pre in (True, False):
        assert len(raw_input_for(spec, with_pre)[1]) < 1000


def test_a_plain_export_records_the_mapping_in_its_metadata(run12, tmp_path, cli):
    out = tmp_path / "plain.onnx"
    proc = cli("export", run12, "--out", out, "--check-data", "none", "--json")
    assert proc.exit_code == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "input_dtype_from" not in report and report["input_kind"] == "normalized"
    steps = _meta(out)["input"]["client_steps"]
    assert "scale: 8-bit / 255, 16-bit / 65535, float min-max" in steps and steps == report["client_note"]
    assert RawInput.from_json(_meta(out)["input"]["raw"]).kind == "normalized"


def test_a_window_graph_tells_the_client_to_clip_before_resizing():
    """The run windowed each image before resizing it; a client resizing raw modality values and
    letting the graph window them differed wherever the window clips (CT at 64 px: cosine 0.965)."""
    one = GraphPreprocessing("window", (-160.0,), (240.0,), options=("window",), client="client passes HU")
    _, note = raw_input_for(InputSpec(1, 64, (0.5,), (0.25,), "ct", graph_preprocessing=one.to_json()), True)
    assert note == ("client passes HU; clip the values to the window [-160, 240] before resizing (the run windowed "
                    "before resizing: clipped values resize exactly as its windowed pixels did)")
    stack = GraphPreprocessing("window", (-160.0, -1350.0), (240.0, 150.0), options=("window",), client="HU")
    _, note = raw_input_for(InputSpec(2, 64, (0.5,) * 2, (0.25,) * 2, "ct", graph_preprocessing=stack.to_json()), True)
    assert "differ from its pixels wherever a window clips" in note and "clip the values" not in note
    # the clip is exact: clipped values resized, then windowed, equal windowed values resized
    from sslkit.data.prepare import resize_square

    hu = np.random.default_rng(0).normal(0, 600, (1, 97, 131)).astype(np.float32)
    window = lambda v: np.clip((v + 160) / 400, 0, 1)  # noqa: E731
    run = resize_square(window(hu), 64)
    np.testing.assert_allclose(window(resize_square(np.clip(hu, -160, 240), 64)), run, atol=1e-6)
    assert np.abs(window(resize_square(hu, 64)) - run).max() > 0.05  # without the clip
