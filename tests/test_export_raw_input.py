"""The raw-input contract of `--with-preprocessing` graphs (sslkit.raw_input), without exporting."""

from __future__ import annotations

import numpy as np
import pytest

from sslkit.errors import UsageError
from sslkit.raw_input import RawInput, fixed_windows, raw_input_for
from sslkit.spec import InputSpec

DICOM_LUNG = {"modality_lut": True, "window": ["lung (W 1500, L -600)"]}
DICOM_STACK = {"window": ["lung (W 1500, L -600)", "W 350, L 50", "bone (W 1800, L 400)"]}


def _spec(source, preprocessing, channels=1):
    return InputSpec(channels, 32, (0.5,) * channels, (0.25,) * channels, source, preprocessing)


def test_fixed_windows_from_source_descriptions():
    assert fixed_windows(DICOM_LUNG) == [(-1350.0, 150.0)]
    assert fixed_windows(DICOM_STACK) == [(-1350.0, 150.0), (-125.0, 225.0), (-500.0, 1300.0)]
    assert fixed_windows({"window": ["auto"]}) is None
    assert fixed_windows({"window": ["lung (W 1500, L -600)", "minmax"]}) is None  # any per-file window
    assert fixed_windows({"window": "auto (file's first VOI window, else min-max)"}) is None
    assert fixed_windows({"scale": "8-bit / 255"}) is None


def test_what_each_run_gets():
    raw, note = raw_input_for(_spec("folder", {}, 3), False)
    assert raw.kind == "normalized" and "normalises" in note
    assert raw_input_for(_spec("folder", {}, 3), True)[0] == RawInput("uint8", 3)
    assert raw_input_for(_spec("folder", {}), True, "uint16")[0] == RawInput("uint16", 1)
    assert raw_input_for(_spec("folder", {}), True, "float32")[0] == RawInput("unit", 1)
    raw, _ = raw_input_for(_spec("dicom", DICOM_LUNG), True)
    assert raw == RawInput("window", 1, (-1350.0,), (150.0,)) and raw.dtype == "float32"
    raw, _ = raw_input_for(_spec("dicom", DICOM_STACK, 3), True)
    assert raw.kind == "window" and raw.channels == 1 and len(raw.lower) == 3
    raw, note = raw_input_for(_spec("dicom", {"window": ["auto"]}), True)
    assert raw.kind == "unit" and "per-file" in note  # honest: no fixed graph can apply it
    for bad in [(_spec("folder", {}), False, "uint8"), (_spec("dicom", DICOM_LUNG), True, "uint8"),
                (_spec("dicom", DICOM_STACK, 1), True, None)]:
        with pytest.raises(UsageError):
            raw_input_for(*bad)


@pytest.mark.parametrize("raw", [RawInput("uint8", 1), RawInput("uint16", 1), RawInput("unit", 1),
                                 RawInput("window", 1, (-1350.0,), (150.0,))])
def test_round_trip_and_json(raw):
    rng = np.random.default_rng(0)
    if raw.kind == "uint8":
        unit = rng.integers(0, 256, (2, 1, 8, 8)) / 255.0
    elif raw.kind == "uint16":
        unit = rng.integers(0, 65536, (2, 1, 8, 8)) / 65535.0
    else:
        unit = rng.random((2, 1, 8, 8))
    unit = unit.astype(np.float32)
    x = raw.from_unit(unit)
    assert x.dtype == np.dtype(raw.dtype)
    np.testing.assert_allclose(raw.to_unit(x), unit, atol=2e-6)
    assert RawInput.from_json(raw.to_json()) == raw


def test_window_stack_inverse_is_consistent_where_possible():
    raw = RawInput("window", 1, (-1350.0, -125.0, -500.0), (150.0, 225.0, 1300.0))
    hu = np.array([-2000, -1000, -300, 0, 100, 200, 700, 3000], np.float32).reshape(1, 1, 1, -1)
    unit = raw.to_unit(hu)  # (1, 3, 1, 8): what a pixel-wise windowing gives
    back = raw.from_unit(unit)
    assert back.shape == (1, 1, 1, 8)
    np.testing.assert_allclose(raw.to_unit(back), unit, atol=1e-5)
