"""DICOM decoding against pydicom's own pipeline, on the files shipped in pydicom's wheel."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from sslkit.data.source import NotAnImage
from sslkit.errors import UsageError
from sslkit.registry import create_source
from sslkit_plugins.sources.dicom import DicomSource, is_dicom_file, read_header
from sslkit_plugins.sources.dicom_window import PRESETS, parse_windows


def _source(path, **opts) -> DicomSource:
    return create_source(f"dicom:{path}", workers=1, **opts)


def pydicom_pipeline(path: str, frame: int | None) -> np.ndarray:
    """pydicom's documented pipeline (pixel_array -> modality LUT -> VOI LUT), scaled to [0, 1]."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[frame]
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        bits = ds.RedPaletteColorLookupTableDescriptor[2]
        return (apply_color_lut(arr, ds) / (2**bits - 1)).transpose(2, 0, 1)
    if ds.SamplesPerPixel == 3:
        return (arr / (2 ** ds.BitsStored - 1)).transpose(2, 0, 1)
    mod = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds:
        out = apply_voi_lut(mod, ds)
        # pydicom's output range for a window: the stored range, rescaled (PS3.3 C.11.2.1.2)
        if ds.PixelRepresentation == 0:
            lo, hi = 0, 2**ds.BitsStored - 1
        else:
            lo, hi = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            lo, hi = lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        out = (out - lo) / (hi - lo)
    else:
        out = (mod - mod.min()) / (mod.max() - mod.min())
    if pi == "MONOCHROME1":
        out = 1 - out
    return out[None]


def test_every_pydicom_file_decodes_like_pydicom_or_is_reported(pydicom_dir):
    src = _source(pydicom_dir)
    refs = src.index()
    skipped = dict(src.skipped)
    decoded = 0
    for ref in refs:
        try:
            x = src.load(ref)
        except NotAnImage:
            continue
        except Exception as exc:  # must be a clean, reportable failure that pydicom shares
            assert str(exc), ref.id
            with pytest.raises(Exception):
                pydicom_pipeline(ref.path, ref.frame)
            skipped[ref.id] = str(exc)
            continue
        expected = pydicom_pipeline(ref.path, ref.frame)
        assert x.dtype == np.float32 and x.shape == expected.shape, ref.id
        np.testing.assert_allclose(x, expected, atol=2e-5, err_msg=ref.id)
        decoded += 1
    assert decoded >= 60
    # every DICOM file is accounted for: decoded, skipped with a reason, or a non-image
    images = {r.path for r in refs}
    for f in sorted(Path(pydicom_dir).rglob("*")):
        if not f.is_file() or not is_dicom_file(f) or str(f) in images or str(f) in skipped:
            continue
        assert read_header(str(f))["kind"] == "nonimage", f.name
    assert "MR_truncated.dcm" in " ".join(skipped)
    assert all(reason for reason in skipped.values())


def test_non_images_are_skipped_silently(pydicom_dir):
    src = _source(pydicom_dir)
    names = {Path(r.path).name for r in src.index()}
    reported = {Path(p).name for p, _ in src.skipped}
    for f in ("test-SR.dcm", "rtstruct.dcm", "rtplan.dcm", "waveform_ecg.dcm", "liver_1frame.dcm"):
        assert f not in names and f not in reported


def test_lossless_transfer_syntaxes_give_identical_pixels(pydicom_dir):
    files = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
             "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"]
    src = _source(pydicom_dir)
    syntaxes = set()
    arrays = []
    for f in files:
        path = str(Path(pydicom_dir) / f)
        syntaxes.add(read_header(path)["transfer_syntax"])
        arrays.append(src.load(src_ref(path)))
    assert len(syntaxes) >= 5  # implicit LE, explicit LE/BE, RLE, JPEG 2000, JPEG-LS
    for f, a in zip(files, arrays):
        np.testing.assert_array_equal(a, arrays[0], err_msg=f)
    assert arrays[0].std() > 0.05


def src_ref(path: str, frame=None):
    from sslkit.data.source import SampleRef

    return SampleRef(path, frame=frame)


def test_rescale_and_presets_on_ct(pydicom_dir, tmp_path):
    """CT_small: HU = stored * slope + intercept, then a linear W/L window, checked by hand."""
    path = Path(pydicom_dir) / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for name in ("lung", "mediastinum", "bone", "brain", "abdomen"):
        w, level = PRESETS[name]
        x = _source(pydicom_dir, window=name).load(src_ref(str(path)))
        expected = np.clip((hu - (level - w / 2)) / w, 0, 1)
        np.testing.assert_allclose(x[0], expected, atol=1e-4, err_msg=name)
    # W,L given by hand is the same as the preset it spells
    a = _source(pydicom_dir, window="1500,-600").load(src_ref(str(path)))
    b = _source(pydicom_dir, window="lung").load(src_ref(str(path)))
    np.testing.assert_array_equal(a, b)
    # the intercept is applied before windowing: shifting it by +100 HU = lowering the level by 100
    ds.RescaleIntercept = float(ds.RescaleIntercept) + 100
    (tmp_path / "ct").mkdir()
    ds.save_as(tmp_path / "ct" / "shifted.dcm")
    shifted = _source(tmp_path / "ct", window="400,40").load(src_ref(str(tmp_path / "ct" / "shifted.dcm")))
    lower = _source(pydicom_dir, window="400,-60").load(src_ref(str(path)))
    np.testing.assert_allclose(shifted, lower, atol=1e-5)


def test_stacked_windows_become_channels(pydicom_dir):
    path = str(Path(pydicom_dir) / "CT_small.dcm")
    src = _source(pydicom_dir, window="lung,mediastinum,bone")
    x = src.load(src_ref(path))
    assert x.shape[0] == 3
    for i, name in enumerate(("lung", "mediastinum", "bone")):
        np.testing.assert_array_equal(x[i], _source(pydicom_dir, window=name).load(src_ref(path))[0])
    ref = next(r for r in src.index() if r.path == path)
    assert src.channels_of(ref) == 3


CR_MONOCHROME1 = "dicomdirtests/77654033/CR1/6154"  # a real CR, MONOCHROME1, RescaleSlope 0.684


@pytest.mark.parametrize("window", ["auto", "minmax", "lung", "400,40", "lung,mediastinum,bone"])
def test_monochrome1_is_inverted_in_every_window_mode(pydicom_dir, tmp_path, window):
    """The real MONOCHROME1 CR equals 1 - the same pixels labelled MONOCHROME2 (and back)."""
    (tmp_path / "flip").mkdir()
    for name in (CR_MONOCHROME1, "CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(Path(pydicom_dir) / name)
        before = ds.PhotometricInterpretation
        ds.PhotometricInterpretation = "MONOCHROME2" if before == "MONOCHROME1" else "MONOCHROME1"
        flipped = tmp_path / "flip" / Path(name).name
        ds.save_as(flipped)
        original = _source(pydicom_dir, window=window).load(src_ref(str(Path(pydicom_dir) / name)))
        other = _source(tmp_path / "flip", window=window).load(src_ref(str(flipped)))
        np.testing.assert_allclose(other, 1.0 - original, atol=1e-6, err_msg=name)


def test_monochrome1_cr_high_attenuation_is_bright(pydicom_dir):
    """In a MONOCHROME1 CR, low stored values are white: after decoding they must be bright."""
    path = Path(pydicom_dir) / CR_MONOCHROME1
    ds = pydicom.dcmread(path)
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    x = _source(pydicom_dir, window="minmax").load(src_ref(str(path)))[0]
    np.testing.assert_allclose(x, 1 - (values - values.min()) / (values.max() - values.min()), atol=1e-6)
    assert x.flat[values.argmin()] == 1.0 and x.flat[values.argmax()] == 0.0


def test_multi_frame_gives_one_sample_per_frame(pydicom_dir, tmp_path):
    shutil.copy(Path(pydicom_dir) / "examples_ybr_color.dcm", tmp_path / "cine.dcm")
    src = _source(tmp_path)
    refs = src.index()
    assert [r.frame for r in refs] == list(range(30))
    assert len({r.group for r in refs}) == 1  # all frames of one file share a split group
    frames = pydicom.dcmread(tmp_path / "cine.dcm").pixel_array  # (30, H, W, 3) RGB
    for ref in (refs[0], refs[17], refs[29]):
        np.testing.assert_allclose(src.load(ref), frames[ref.frame].transpose(2, 0, 1) / 255.0, atol=1e-6)
    middle = _source(tmp_path, frames="middle").index()
    assert [r.frame for r in middle] == [15]


def test_colour_is_rgb(pydicom_dir):
    """YBR_FULL / YBR_FULL_422 / RGB encodings of one picture decode to (nearly) the same RGB."""
    src = _source(pydicom_dir)
    rgb = src.load(src_ref(str(Path(pydicom_dir) / "SC_rgb_rle.dcm")))
    ybr = src.load(src_ref(str(Path(pydicom_dir) / "SC_rgb_dcmtk_+eb+cy+s4.dcm")))  # YBR_FULL JPEG
    assert rgb.shape == ybr.shape == (3, 100, 100)
    assert np.abs(rgb - ybr).mean() < 0.02  # lossy JPEG, but the colours are right (not YCbCr)


def test_modality_and_series_filters(pydicom_dir, tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm"):
        shutil.copy(Path(pydicom_dir) / name, tmp_path / name)
    ds = pydicom.dcmread(tmp_path / "CT_small.dcm")
    ds.SeriesDescription = "Chest AXIAL 1mm"
    ds.save_as(tmp_path / "CT_small.dcm")
    names = lambda **o: sorted(Path(r.path).name for r in _source(tmp_path, **o).index())  # noqa: E731
    assert names(modality="CT,MR") == ["CT_small.dcm", "MR_small.dcm"]
    assert names(modality="us") == ["examples_rgb_color.dcm"]
    assert names(series_description="*axial*") == ["CT_small.dcm"]


def test_files_without_meta_are_read(pydicom_dir, tmp_path):
    """A data set written without preamble and file meta (force=True) still decodes."""
    ds = pydicom.dcmread(Path(pydicom_dir) / "MR_small.dcm")
    del ds.file_meta
    ds.preamble = None
    ds.save_as(tmp_path / "raw.dcm", enforce_file_format=False, implicit_vr=True, little_endian=True)
    with open(tmp_path / "raw.dcm", "rb") as f:
        assert f.read(132)[128:132] != b"DICM"
    src = _source(tmp_path)
    refs = src.index()
    assert len(refs) == 1 and not src.skipped
    np.testing.assert_array_equal(src.load(refs[0]), _source(pydicom_dir).load(src_ref(str(Path(pydicom_dir) / "MR_small.dcm"))))


@pytest.mark.parametrize("glob", ["[", "ax[ial", "*[!]*", "[]", "*[a]*["])
def test_series_glob_with_an_unclosed_bracket_is_refused_before_any_header(pydicom_dir, tmp_path, cli, monkeypatch,
                                                                             glob):
    """fnmatch would take an unclosed '[' literally: refused in one line (exit 2), no file read."""
    shutil.copy(Path(pydicom_dir) / "CT_small.dcm", tmp_path / "CT_small.dcm")
    with pytest.raises(UsageError, match=r"series_description=.*unclosed '\['.*\[\[\]"):
        _source(tmp_path, series_description=glob)

    def read(*_):
        raise AssertionError("a header was read")

    monkeypatch.setattr("sslkit_plugins.sources.dicom.read_header", read)
    r = cli("data", "inspect", f"dicom:{tmp_path}", "--series-description", glob)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "--series-description" in r.output and "[[]" in r.output and "Traceback" not in r.output


def test_series_glob_brackets_that_close_still_match(pydicom_dir, tmp_path):
    shutil.copy(Path(pydicom_dir) / "CT_small.dcm", tmp_path / "CT_small.dcm")
    ds = pydicom.dcmread(tmp_path / "CT_small.dcm")
    ds.SeriesDescription = "Chest [AXIAL] 1mm"
    ds.save_as(tmp_path / "CT_small.dcm")
    for glob in ("*[[]axial]*", "*[]]*", "chest [!x]*", "*[a-c]xial*"):
        assert len(_source(tmp_path, series_description=glob).index()) == 1, glob
    assert _source(tmp_path, series_description="*[[]coronal]*").index() == []


@pytest.mark.parametrize("bad", ["lungs", "400", "1,2,3,4", "lung,bone", "-5,40"])
def test_bad_window_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        parse_windows(bad)


def test_enhanced_multiframe_per_frame_rescale_and_windows(tmp_path):
    """Rescale and windows in functional groups (enhanced CT/MR) are applied frame by frame."""
    from pydicom.dataset import Dataset

    from tests.dicom_factory import write_dicom

    stored = (np.random.default_rng(0).random((3, 24, 24)) * 2000).astype(np.uint16)
    path = write_dicom(tmp_path / "enh.dcm", stored, patient_id="E", modality="CT")
    ds = pydicom.dcmread(path)
    shared, pvt = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 2, -1000, "HU"
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for c, w in ((0, 400), (-600, 1500), (300, 1800)):
        group, voi = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = c, w
        group.FrameVOILUTSequence = [voi]
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.save_as(path)
    src = _source(tmp_path)
    refs = src.index()
    for ref, (c, w) in zip(refs, ((0, 400), (-600, 1500), (300, 1800))):
        hu = stored[ref.frame] * 2.0 - 1000
        auto = src.load(ref)[0]  # the frame's own window, DICOM LINEAR: centre - 0.5, width - 1
        np.testing.assert_allclose(auto, np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-5)
        fixed = _source(tmp_path, window="400,40").load(ref)[0]  # HU, so the intercept was applied
        np.testing.assert_allclose(fixed, np.clip((hu + 160) / 400, 0, 1), atol=1e-5)
