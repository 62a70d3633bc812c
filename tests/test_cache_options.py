"""A source's options are in the decoded-pixel cache key, whatever its ``describe()`` returns."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import sslkit.data.prepare as prep
from sslkit.api import SampleRef, Source, Undecodable
from sslkit.data.cache import cache_key, keyed_options


@dataclass
class ArrayOptions:
    max_value: float = 0.0  # divide by this; 0: each array's own min-max
    workers: int = 0  # reads no pixels: declared in options_not_in_cache_key by the sources below


class ArraySource(Source):
    """What a plugin author writes from the docs: ``describe()`` left at its default ``{}``."""

    scheme = "arrays"
    Options = ArrayOptions
    parallel_decode = False
    options_not_in_cache_key = frozenset({"workers"})
    loads: list[str] = []

    def __init__(self, location: str, options: ArrayOptions | None = None) -> None:
        super().__init__(location, options or ArrayOptions())

    def index(self) -> list[SampleRef]:
        return [SampleRef(str(p)) for p in sorted(Path(self.location).glob("*.npy"))]

    def load(self, ref: SampleRef) -> np.ndarray:
        ArraySource.loads.append(ref.path)
        try:
            x = np.load(ref.path, allow_pickle=False).astype(np.float32)[None]
        except (OSError, ValueError) as exc:
            raise Undecodable(f"unreadable .npy ({type(exc).__name__})") from None
        if self.options.max_value > 0:
            return np.clip(x / self.options.max_value, 0.0, 1.0)
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


class WrongSource(ArraySource):
    """Declares a pixel-changing option as not in the key: what ``check_source`` must catch."""

    options_not_in_cache_key = frozenset({"max_value"})


class Typo(ArraySource):
    options_not_in_cache_key = frozenset({"worker"})


@pytest.fixture
def arrays(tmp_path) -> Path:
    root = tmp_path / "arrays"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(root / f"a{i}.npy", (rng.random((12, 12)) * 1000 + 500 * i).astype(np.uint16))
    return root


def _prepare(source: Source, cache: Path) -> prep.Prepared:
    return prep.prepare(source, source.index(), 1, 8, cache_dir=cache, progress=False, workers=1)


def test_another_option_value_is_decoded_again_not_read_from_the_old_entry(arrays, tmp_path):
    cache = tmp_path / "cache"
    ArraySource.loads.clear()
    minmax = _prepare(ArraySource(str(arrays)), cache)
    assert len(ArraySource.loads) == 4
    ArraySource.loads.clear()
    scaled = _prepare(ArraySource(str(arrays), ArrayOptions(max_value=4000.0)), cache)
    assert len(ArraySource.loads) == 4  # decoded with the new value, not served from the first entry
    assert scaled.cache_path != minmax.cache_path
    fresh = prep.prepare(ArraySource(str(arrays), ArrayOptions(max_value=4000.0)), ArraySource(str(arrays)).index(),
                         1, 8, cache_dir=False, progress=False, workers=1)
    np.testing.assert_array_equal(np.asarray(scaled.pixels), fresh.pixels)  # what --no-cache gives
    assert not np.array_equal(np.asarray(scaled.pixels), np.asarray(minmax.pixels))
    ArraySource.loads.clear()
    again = _prepare(ArraySource(str(arrays), ArrayOptions(max_value=4000.0)), cache)
    assert ArraySource.loads == [] and again.cache_path == scaled.cache_path  # the same value: reused


def test_options_declared_pixel_neutral_share_the_entry(arrays):
    refs = ArraySource(str(arrays)).index()
    key = cache_key(ArraySource(str(arrays)), refs, 1, 8)
    assert cache_key(ArraySource(str(arrays), ArrayOptions(workers=7)), refs, 1, 8) == key
    assert cache_key(ArraySource(str(arrays), ArrayOptions(max_value=255.0)), refs, 1, 8) != key


def test_check_source_catches_an_option_wrongly_left_out_of_the_key(arrays, tmp_path):
    from sslkit.testing import check_source

    report = check_source(ArraySource, str(arrays), tmp_path=tmp_path, other_options={"max_value": 4000.0})
    assert report["cache_key"] == "another options value, other pixels: another cache key"
    with pytest.raises(AssertionError, match=r"WrongSource: options \['max_value'\] change the pixels"):
        check_source(WrongSource, str(arrays), tmp_path=tmp_path, other_options={"max_value": 4000.0})


def test_check_source_refuses_a_pixel_neutral_name_that_is_no_option(arrays, tmp_path):
    from sslkit.testing import check_source

    with pytest.raises(AssertionError, match=r"options_not_in_cache_key names \['worker'\], not fields of"):
        check_source(Typo, str(arrays), tmp_path=tmp_path)


WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")


@dataclass
class SetOptions(ArrayOptions):
    skip: frozenset = frozenset(WORDS)  # iterated in an order PYTHONHASHSEED decides
    pairs: tuple = (("b", 2), ("a", 1))
    nested: dict = field(default_factory=lambda: {"z": set(WORDS[:6]), "a": ["x", ("y",)]})


class SetSource(ArraySource):
    Options = SetOptions


KEY_IN_A_PROCESS = """
import sys
from tests.test_cache_options import WORDS, SetOptions, SetSource, cache_key
source = SetSource(sys.argv[1], SetOptions())
print(cache_key(source, source.index(), 1, 8), ",".join(frozenset(WORDS)))
"""


def test_a_set_option_gives_one_key_in_every_process(arrays):
    root = Path(__file__).resolve().parent.parent
    runs = [subprocess.run([sys.executable, "-c", KEY_IN_A_PROCESS, str(arrays)], cwd=root, capture_output=True,
                           text=True, env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout.split()
            for seed in ("1", "2")]
    assert runs[0][1] != runs[1][1]  # the two processes iterate the set in different orders
    source = SetSource(str(arrays), SetOptions())
    assert runs[0][0] == runs[1][0] == cache_key(source, source.index(), 1, 8)
    assert keyed_options(source)["skip"] == sorted(WORDS)
    assert keyed_options(source)["nested"] == {"z": sorted(WORDS[:6]), "a": ["x", ["y"]]}
    assert keyed_options(source)["pairs"] == [["b", 2], ["a", 1]]
