"""Volume geometry and value order: a series with a missing slice is resampled at its slices'
real positions (interpolated across the gap), a uniform one exactly as before; fixed windows
apply after resampling, in modality values, so that a client feeding ``sslkit data dump --raw``
volumes to an exported ``--with-preprocessing`` graph gets the run's own embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from sslkit.api import SampleMode, crop_or_pad, fit_volume, resample, volume_fit
from sslkit.registry import create_source
from tests.test_series import AXIAL, CT_STORAGE, _base, write_series, write_slice

GAP = [0.0, 3.0, 9.0, 12.0, 15.0, 18.0]  # a 3 mm step, the slice at 6 mm missing
HU = [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]  # one value per slice


def profile(positions=GAP, target=1.0, size=32) -> np.ndarray:
    x = np.asarray(HU, np.float32).reshape(1, -1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)
    mode = SampleMode("volume", 1, None if target is None else (target, 0.7, 0.7), (size, 2, 2))
    return fit_volume(x, (3.0, 0.7, 0.7), mode, positions, pad=-7.0)[0, :, 0, 0]


# ---------------------------------------------------------------- geometry by hand


def test_a_missing_slice_is_interpolated_across_not_collapsed():
    """21 mm (half a step before 0 mm to half a step after 18 mm) at 1 mm: 21 voxels, centred in 32
    (5 of padding before); voxel 6 + z holds the value at z mm, linear between the nearest slices."""
    got = profile()
    assert (got[:5] == -7).all() and (got[26:] == -7).all()  # the pad value, 5 + 21 + 6
    at = {z: got[6 + z] for z in range(-1, 20)}
    for z, v in zip(GAP, HU):
        assert at[int(z)] == pytest.approx(v, abs=1e-4)  # every slice at its own depth
    assert at[6] == pytest.approx(30.0, abs=1e-4) and at[7] == pytest.approx(100 / 3, abs=1e-4)  # across the gap
    assert at[-1] == 0.0 and at[19] == 100.0  # the end slices held beyond them
    # without a target spacing: the median step (3 mm) over the true extent, 7 slices
    assert profile(target=None, size=7).tolist() == pytest.approx([0, 20, 30, 40, 60, 80, 100], abs=1e-4)


@pytest.mark.parametrize("shape,spacing,target,size", [
    ((48, 40, 36), (2.5, 0.8, 0.8), (2.0, 2.0, 2.0), (16, 8, 12)),
    ((9, 16, 20), (1.0, 1.0, 1.0), None, (4, 30, 7)),
    ((30, 7, 33), (0.5, 3.0, 0.7), (1.0, 1.5, 0.6), (5, 20, 3)),
])
def test_uniform_positions_change_nothing_bit_for_bit(shape, spacing, target, size):
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    mode = SampleMode("volume", 1, target, size)
    step = spacing[0]
    jitter = np.random.default_rng(1).uniform(-0.004, 0.004, shape[0]) * step  # within 1 % of the step
    for positions in (40.0 + step * np.arange(shape[0]), 40.0 + step * np.arange(shape[0]) + jitter):
        a, b = volume_fit(shape, spacing, mode), volume_fit(shape, spacing, mode, positions)
        assert a.region == b.region and a.placed == b.placed
        np.testing.assert_array_equal(b.apply(x[(slice(None), *b.region)]), a.apply(x[(slice(None), *a.region)]))
        np.testing.assert_array_equal(resample(x, spacing, target, positions), resample(x, spacing, target))


@pytest.mark.parametrize("positions,target,size", [
    (GAP, (1.0, 0.5, 0.9), (10, 5, 7)),  # cropped along D: only the slices the kept part reads
    (GAP, None, (3, 9, 9)),
    ([0.0, 2.0, 4.0, 9.0, 11.0, 13.5], (0.7, 1.0, 2.0), (40, 9, 3)),  # uneven steps, padded along D
])
def test_a_fit_at_positions_computes_exactly_the_kept_part(positions, target, size):
    shape, spacing = (len(positions), 8, 9), (2.0, 0.6, 0.6)
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    fit = volume_fit(shape, spacing, SampleMode("volume", 1, target, size), positions)
    whole = crop_or_pad(resample(x, spacing, target, positions), size, pad=-3.0)
    np.testing.assert_array_equal(fit.apply(x[(slice(None), *fit.region)], pad=-3.0), whole)  # bit for bit
    if size[0] == 10:
        assert fit.region[0].stop - fit.region[0].start < len(positions)


# ---------------------------------------------------------------- DICOM series


def write_gap_series(folder: Path, photometric: str = "MONOCHROME2") -> None:
    """The audit's series: slices at GAP, stored 500 + 10 k, slope 2, intercept -1000 (HU 0..100)."""
    uid = generate_uid()
    for k, z in enumerate(GAP):
        ds = _base(CT_STORAGE, np.full((16, 16), 500 + 10 * k), uid, ImagePositionPatient=[0.0, 0.0, z],
                   ImageOrientationPatient=list(AXIAL), PixelSpacing=[0.7, 0.7], SliceThickness=3.0,
                   RescaleSlope=2.0, RescaleIntercept=-1000.0, PhotometricInterpretation=photometric)
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"b{k}.dcm", enforce_file_format=True)


def gap_source(folder: Path, window: str = "auto", **opts):
    src = create_source(f"dicom:{folder}", workers=1, window=window, sample="volume", spacing="0.7,0.7,1",
                        volume_size="32,16,16", **opts)
    return src, src.index()


def test_a_gapped_series_is_resampled_at_its_positions_and_noted(tmp_path):
    write_gap_series(tmp_path)
    src, refs = gap_source(tmp_path)
    raw = src.load_raw(refs[0])[0, :, 8, 8]
    np.testing.assert_allclose(raw[[6, 9, 12, 15, 24]], [0.0, 20.0, 30.0, 40.0, 100.0], atol=1e-4)
    assert (raw[:5] == 0).all() and (raw[26:] == 0).all()  # auto: no fixed window, padded with 0 as before
    vol = src.sampler.volume_of(refs[0])
    assert vol.distances == GAP and src.spacing_of(refs[0]) == [1.0, 0.7, 0.7]
    notes = src.sampler.notes()
    assert notes == [(src.sample_id(refs[0]), "1 missing slices (gaps of a multiple of the 3 mm step): resampled "
                                              "at the slices' positions along the normal (gaps interpolated across)")]
    assert not any(".dcm" in n or str(tmp_path) in n for _, n in notes)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("window", ["100,0", "100:0,30:30,400:100"])
def test_fixed_windows_apply_after_resampling_in_modality_values(tmp_path, photometric, window):
    """load() == the windows (then MONOCHROME1's inversion) on load_raw(), whose padding is the value
    every window maps to 0 (after the inversion): what a window graph computes on it."""
    write_gap_series(tmp_path, photometric)
    src, refs = gap_source(tmp_path, window)
    raw, unit = src.load_raw(refs[0]), src.load(refs[0])
    bounds = [(-50.0, 50.0)] + ([(15.0, 45.0), (-100.0, 300.0)] if ":" in window else [])
    assert unit.shape == (len(bounds), 32, 16, 16)
    windowed = np.stack([np.clip((raw[0] - lo) / (hi - lo), 0, 1) for lo, hi in bounds])
    if photometric == "MONOCHROME1":
        windowed = 1 - windowed
    np.testing.assert_allclose(unit, windowed, atol=1e-6)
    pad = src.sampler.pad_value(src.sampler.volume_of(refs[0]))
    assert pad == (min(lo for lo, _ in bounds) if photometric == "MONOCHROME2" else max(hi for _, hi in bounds))
    assert (raw[0, 0] == pad).all() and (unit[:, 0] == 0).all()
    # 10 mm, a third of the way from 40 to 60 HU: 46.7 HU, windowed to 0.967 (windowed first, 60 HU
    # would clip to 1: 0.933)
    assert unit[0, 16, 8, 8] == pytest.approx(29 / 30 if photometric == "MONOCHROME2" else 1 / 30, abs=1e-6)


def test_a_per_file_window_still_windows_each_slice_first(tmp_path):
    """auto (the file's own window or VOI LUT, else min-max) and minmax choose a window per slice:
    each slice is decoded as a 2D file, then resampled (no graph applies it: the client does)."""
    from sslkit_plugins.sources.dicom_decode import decode, read_dataset

    write_series(tmp_path, n=4)
    src = create_source(f"dicom:{tmp_path}", workers=1, window="minmax", sample="volume", spacing="1,1,1.5",
                        volume_size="6,3,3")
    ref = src.index()[0]
    vol = src.sampler.volume_of(ref)
    slices = np.stack([decode(read_dataset(p), None, src.windows) for p, _, _ in vol.slices], axis=1)
    expected = fit_volume(slices, vol.spacing, src.sample)
    np.testing.assert_array_equal(src.load(ref), expected)
    assert src.sampler.pad_value(vol) == 0.0


def test_volume_decode_version_enters_the_cache_key(tmp_path):
    write_series(tmp_path, n=3)
    src = create_source(f"dicom:{tmp_path}", workers=1, window="400,40", sample="volume", volume_size="3,6,5")
    assert src.describe()["decode"] == "volume/2"
    slab = create_source(f"dicom:{tmp_path}", workers=1, window="400,40", sample="slab:3")
    assert "decode" not in slab.describe()  # slabs decode as before: their cache entries stay valid


# ---------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("window", ["100,0", "minmax"])
def test_nifti_volumes_resample_values_then_map_them(tmp_path, window):
    nib = pytest.importorskip("nibabel")
    values = np.random.default_rng(0).normal(0, 80, (6, 7, 5)).astype(np.float32)
    values[2, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(values, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "v.nii.gz")
    src = create_source(f"nifti:{tmp_path / 'v.nii.gz'}", window=window, sample="volume", spacing="0.8,0.8,1",
                        volume_size="16,8,8")
    ref = src.index()[0]
    raw, unit = src.load_raw(ref), src.load(ref)
    finite = values[np.isfinite(values)]
    lo, hi = (-50.0, 50.0) if window == "100,0" else (float(finite.min()), float(finite.max()))
    assert np.isfinite(raw).all() and (raw[0, 0] == lo).all()  # padding: what the mapping takes to 0
    np.testing.assert_allclose(unit, np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert (unit[0, 0] == 0).all()


# ---------------------------------------------------------------- the export contract


def test_volume_client_steps_state_the_pad_value():
    from sslkit.data.volume import VOLUME_DECODE
    from sslkit.errors import UsageError
    from sslkit.raw_input import RawInput, raw_input_for
    from sslkit.spec import InputSpec

    gp = {"kind": "window", "window": [{"lower": -160.0, "upper": 240.0}, {"lower": -1350.0, "upper": 150.0}],
          "client": "client passes modality values", "options": ["window"]}
    old = InputSpec(2, 224, (0.5,) * 2, (0.25,) * 2, "ct", {"sample": "volume", "volume_size": [8, 8, 8]},
                    graph_preprocessing=gp)
    with pytest.raises(UsageError, match="windowed each slice before resampling"):  # a run trained before volume/2
        raw_input_for(old, True)
    spec = InputSpec(2, 224, (0.5,) * 2, (0.25,) * 2, "ct", {"sample": "volume", "volume_size": [8, 8, 8],
                                                             "decode": VOLUME_DECODE}, graph_preprocessing=gp)
    raw, note = raw_input_for(spec, True)
    assert raw.pad_value == -1350.0 and "padding with -1350 (the lowest window's lower bound" in note
    assert note.startswith("client passes modality values; then stacks the slices") and "missing slice" in note
    assert raw.to_unit(np.full((1, 1, 1, 1, 1), raw.pad_value, np.float32)).max() == 0.0
    assert RawInput("unit", 1).pad_value == 0.0
    assert "normalises: (x - mean) / std" in raw_input_for(spec, False)[1]


def write_ct(root: Path) -> None:
    """Two CT series of 20 x 20 slices 2.5 mm apart (0..2000 HU), the second missing a slice."""
    rng = np.random.default_rng(0)
    for s in range(2):
        uid = generate_uid()
        for k in range(7):
            if s == 1 and k == 3:
                continue
            img = rng.integers(0, 2000, (20, 20)).astype(np.uint16)
            write_slice(root / f"s{s}" / f"{k}.dcm", img, uid, [0.0, 0.0, 2.5 * k], spacing=(0.8, 0.8))


def test_raw_dump_through_the_exported_graph_gives_the_runs_embeddings(tmp_path):
    """The contract of a volume run's ONNX graph: ``sslkit data dump --raw`` volumes (the client's
    resampled, padded HU) through the ``--with-preprocessing`` graph == ``sslkit embed RUN`` (torch).
    The window W 1000, L 0 clips most values and maps 0 HU to 0.5: windowing before resampling, or
    padding with 0 HU, breaks it."""
    import onnxruntime as ort

    from sslkit.cli import main
    from sslkit.data.dump import dump

    write_ct(tmp_path / "ct")
    opts = {"sample": "volume", "spacing": "1.1,1.1,1.7", "volume_size": "12,12,12", "window": "1000,0"}
    args = [a for k, v in opts.items() for a in ("--data-opt", f"{k}={v}")]
    run, onnx_file = tmp_path / "run", tmp_path / "pp.onnx"
    for cmd in (["pretrain", "--data", f"dicom:{tmp_path / 'ct'}", "--out", run, "--task", "simclr", "--backbone",
                 "monai:resnet10", "--max-steps", 1, "--batch-size", 2, "--no-cache", "--quiet", *args],
                ["export", run, "--out", onnx_file, "--with-preprocessing"],
                ["embed", run, "--data", f"dicom:{tmp_path / 'ct'}", "--out", tmp_path / "torch.npz", "--quiet"]):
        result = CliRunner().invoke(main, [str(a) for a in cmd], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    dump(f"dicom:{tmp_path / 'ct'}", tmp_path / "raw.npz", opts, raw=True)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["sslkit"])["input"]
    assert meta["pad_value"] == -500.0 and "padding with -500" in meta["client_steps"]
    assert "image_size" not in meta and meta["volume_size"] == [12, 12, 12]
    dumped, torch_run = np.load(tmp_path / "raw.npz"), np.load(tmp_path / "torch.npz")
    assert json.loads(str(dumped["__meta__"]))["padding"].startswith("the value the source's mapping")
    x = np.stack([dumped[i] for i in torch_run["ids"]])
    assert x.shape == (2, 1, 12, 12, 12) and (x[:, :, 0] == -500).all()  # padded along D with the pad value
    got, ref = session.run(["embedding"], {"pixels": x})[0], torch_run["embeddings"]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_pretrain_reports_a_gapped_series_in_its_data_report(tmp_path, cli):
    """The note reaches the run's data_report.json (only `data inspect` said it before), with no file name."""
    import json as _json

    write_gap_series(tmp_path / "ct")
    result = cli("pretrain", "--task", "byol", "--backbone", "monai:resnet10", "--data", f"dicom:{tmp_path / 'ct'}",
                 "--data-opt", "sample=volume", "--data-opt", "volume_size=8,8,8", "--max-steps", 1, "--batch-size", 1,
                 "--out", tmp_path / "run", "--quiet", "--no-cache")
    assert result.exit_code == 0, result.output
    notes = _json.loads((tmp_path / "run" / "data_report.json").read_text())["notes"]
    assert len(notes) == 1 and notes[0]["sample"].startswith("series:") and "missing slices" in notes[0]["note"]
    assert ".dcm" not in notes[0]["note"]
